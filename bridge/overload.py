"""How late the event loop runs: the one signal that the machine, not a call, is the limit.

Every call's paced writer, its websocket and its PBX leg share one event loop. When the
machine is saturated (too many calls, or another process taking the CPU), everything that is
due runs late by the same amount: the loop's lag. :class:`EventLoopLag` keeps the largest lag
of the last few seconds from samples a watcher task takes (:func:`watch_event_loop`: sleep a
known interval, see how much longer it took). The call flow refuses new calls while the lag is
over a threshold (``service.max_event_loop_lag_ms``), so that the calls already up keep their
audio; ``/health`` and ``/metrics`` show it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

# One sample per interval: cheap (a timer per 100 ms for the whole process) and fine enough
# for a threshold in the hundreds of milliseconds.
SAMPLE_INTERVAL_S = 0.1
# The lag reported is the largest of this window, so that one quiet sample between busy ones
# does not open the door to new calls; short enough to reopen soon after a burst.
WINDOW_S = 3.0


class EventLoopLag:
    """The largest event-loop lag sampled within the last ``window_s`` seconds (pure)."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()  # (when, lag), maxima kept only

    def observe(self, lag_s: float, now: float) -> None:
        """Records a lag sampled at ``now``."""
        lag_s = max(0.0, lag_s)
        # A monotonic deque: a sample no larger than a newer one can never be the maximum.
        while self._samples and self._samples[-1][1] <= lag_s:
            self._samples.pop()
        self._samples.append((now, lag_s))
        self._expire(now)

    def current(self, now: float) -> float:
        """The largest lag seen in the window ending at ``now`` (0 with no sample)."""
        self._expire(now)
        return self._samples[0][1] if self._samples else 0.0

    def _expire(self, now: float) -> None:
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()


async def watch_event_loop(
    lag: EventLoopLag,
    on_sample: Callable[[float], None] = lambda _: None,
    interval_s: float = SAMPLE_INTERVAL_S,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Samples the loop's lag forever (run it as a task; cancel it to stop)."""
    while True:
        before = clock()
        await asyncio.sleep(interval_s)
        now = clock()
        lag.observe(now - before - interval_s, now)
        on_sample(lag.current(now))
