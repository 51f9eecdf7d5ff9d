"""How late the event loop runs: the one signal that the machine, not a call, is the limit.

Every call's paced writer, its websocket and its PBX leg share one event loop. When the
machine is saturated (too many calls, or another process taking the CPU), everything that is
due runs late by about the same amount: the loop's lag. A watcher task samples it
(:func:`watch_event_loop`: sleep a known interval, see how much longer it took) into
:class:`EventLoopLag`, which answers two questions:

- the *sustained* lag, the least of the last second's samples: late on every sample means the
  machine is saturated, while one late sample is a burst (a garbage collection, ten offers at
  once) that the calls already up absorb. Only a second the samples cover entirely counts: the
  first late sample of a service that just started (imports, the first offers) is a burst too.
  The call flow refuses new calls while it is over ``service.max_event_loop_lag_ms``, so that
  the calls already up keep their audio;
- the *peak* lag of the last few seconds, for ``/health`` and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

# One sample per interval: cheap (a timer per 100 ms for the whole process) and fine enough
# for a threshold in the tens of milliseconds.
SAMPLE_INTERVAL_S = 0.1
# Saturation is lag on every sample for this long (10 samples).
SUSTAINED_S = 1.0
# The peak reported covers this window.
WINDOW_S = 3.0


class EventLoopLag:
    """Event-loop lag samples of the last ``window_s`` seconds (pure: time comes in)."""

    def __init__(self, window_s: float = WINDOW_S, sustained_s: float = SUSTAINED_S) -> None:
        self.window_s = window_s
        self.sustained_s = sustained_s
        # (started, when, lag), oldest first: a sample covers [started, when].
        self._samples: deque[tuple[float, float, float]] = deque()

    def observe(self, lag_s: float, now: float, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        """Records a lag sampled at ``now`` by a sleep of ``interval_s``."""
        lag_s = max(0.0, lag_s)
        self._samples.append((now - interval_s - lag_s, now, lag_s))
        while self._samples and self._samples[0][1] < now - self.window_s:
            self._samples.popleft()

    def peak(self, now: float) -> float:
        """The largest lag sampled in the last ``window_s`` (0 with no sample)."""
        return max(
            (lag for _, when, lag in self._samples if when >= now - self.window_s), default=0.0
        )

    def sustained(self, now: float) -> float:
        """The least lag sampled in the last ``sustained_s``: how late the loop runs all the
        time. 0 with no sample (the watcher itself was not run for that long), or when the
        samples do not cover the whole of it (the watcher started less than that ago)."""
        since = now - self.sustained_s
        recent = [(started, lag) for started, when, lag in self._samples if when >= since]
        if not recent or recent[0][0] > since:
            return 0.0
        return min(lag for _, lag in recent)


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
        lag.observe(now - before - interval_s, now, interval_s)
        on_sample(lag.peak(now))
