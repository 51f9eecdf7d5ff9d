"""A media leg's events on their way to the call's session: pushed as they arrive, or kept.

The PBX's audio arrives 50 times a second per call. Waking a reader task for each frame (a
future resolved, a task step, a list built) cost more than the frame's own work, so a session
that is running takes the events synchronously, straight from the socket's callback
(:meth:`LegOutlet.attach`): one function call per frame. Until it attaches (the leg connected,
the call flow has not handed it to the conversation yet) and after it detaches, the outlet
keeps the events, at most ``max_kept`` of them (the oldest audio gives way), for
:meth:`LegOutlet.receive` or the next sink. The final :class:`~bridge.events.LegClosed` is
never dropped and is repeated to whoever asks again.
"""

from __future__ import annotations

import asyncio
from collections import deque

from bridge.events import LegClosed, LegEvent, LegSink

# 5 s of 20 ms frames: a session that is not attached by then is not coming.
MAX_KEPT_EVENTS = 250


class LegOutlet:
    """Where a leg puts its events (see the module's docstring)."""

    def __init__(self, max_kept: int = MAX_KEPT_EVENTS) -> None:
        self._max_kept = max_kept
        self._kept: deque[LegEvent] = deque()
        self._sink: LegSink | None = None
        self._arrived: asyncio.Event | None = None
        self.final: LegClosed | None = None
        # Events that gave way to newer ones while nobody took them.
        self.dropped = 0

    @property
    def closed(self) -> bool:
        """The leg's final event was put."""
        return self.final is not None

    def put(self, event: LegEvent) -> None:
        """An event from the leg; nothing after the leg's :class:`LegClosed` is kept."""
        if self.final is not None:
            return
        if isinstance(event, LegClosed):
            self.final = event
        if self._sink is not None:
            self._sink(event)
            return
        if len(self._kept) >= self._max_kept and not isinstance(event, LegClosed):
            self._kept.popleft()
            self.dropped += 1
        self._kept.append(event)
        if self._arrived is not None:
            self._arrived.set()

    def attach(self, sink: LegSink | None) -> None:
        """From now on events go to ``sink`` as they arrive, the kept ones first (``None``:
        they are kept again)."""
        self._sink = sink
        while sink is not None and self._kept and self._sink is sink:
            sink(self._kept.popleft())

    async def receive(self) -> list[LegEvent]:
        """The events kept so far, waiting for one; once the leg closed, its final event."""
        while not self._kept:
            if self.final is not None:
                return [self.final]
            if self._arrived is None:
                self._arrived = asyncio.Event()
            self._arrived.clear()
            await self._arrived.wait()
        events = list(self._kept)
        self._kept.clear()
        return events
