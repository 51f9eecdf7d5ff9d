"""One 20 ms tick for every call's paced writer.

A writer of its own per call sleeps once per frame: one timer, one future and one task step per
call every 20 ms (10,000 wake-ups a second at 200 calls), each costing more than the frame's own
work. A shared clock arms one timer per tick for all calls and runs every writer in it, back to
back; a writer's work per tick is plain synchronous code (take a frame from the playout buffer,
write it to the leg's transport).

Ticks keep an absolute schedule on the loop's clock (tick n is due at ``start + n * period``).
A tick that comes late (a busy or starved loop) does not make the clock tick again at once to
catch up: each writer sees from its own schedule how many frames are due and sends or sheds
them. The clock stops when its last writer leaves and restarts with the next one.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable

from bridge.audio import FRAME_MS

log = logging.getLogger(__name__)

# A writer, called at each tick with the loop's time.
TickWriter = Callable[[float], None]


class FrameClock:
    """Calls every subscribed writer once per ``period_s`` on the running loop."""

    def __init__(self, period_s: float = FRAME_MS / 1000) -> None:
        self.period_s = period_s
        self._writers: dict[int, TickWriter] = {}
        self._next_id = 0
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due = 0.0
        self.ticks = 0
        self.late_ticks = 0  # ticks that found one or more whole periods already passed

    @property
    def due(self) -> float:
        """When the running tick was due (inside a writer), else when the next one is."""
        return self._due

    def __len__(self) -> int:
        return len(self._writers)

    def subscribe(self, writer: TickWriter) -> tuple[int, float]:
        """Adds ``writer``; returns its subscription and when its first tick is due.

        A writer must not raise (the clock would log it and drop it) and must not block.
        """
        loop = asyncio.get_running_loop()
        if self._handle is None or self._loop is not loop:
            self._loop = loop
            self._due = loop.time()
            self._handle = loop.call_at(self._due, self._tick)
        subscription = self._next_id
        self._next_id += 1
        self._writers[subscription] = writer
        return subscription, self._due

    def unsubscribe(self, subscription: int) -> None:
        """Removes a writer (once it is gone, it is not called again); idempotent."""
        self._writers.pop(subscription, None)
        if not self._writers and self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        self.ticks += 1
        # A copy: writers may unsubscribe (their session ended) while the tick runs.
        for subscription, writer in list(self._writers.items()):
            if subscription not in self._writers:
                continue
            try:
                writer(now)
            except Exception:
                # One call's bug must not stop every call's audio.
                log.exception("a paced writer failed; it no longer gets ticks")
                self._writers.pop(subscription, None)
        if not self._writers:
            self._handle = None
            return
        self._due += self.period_s
        now = loop.time()  # the writers took time too
        if self._due <= now:
            # Whole periods passed during the tick or before it: go on from the next tick of
            # the same schedule; the writers send or shed what fell due meanwhile.
            self.late_ticks += 1
            self._due += math.ceil((now - self._due) / self.period_s + 1e-9) * self.period_s
        self._handle = loop.call_at(self._due, self._tick)
