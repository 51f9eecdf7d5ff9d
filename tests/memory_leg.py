"""A PBX audio leg in memory (the MediaLeg interface), whose caller side a test drives."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from bridge.audio import tone_share
from bridge.events import LegEvent, LegSink
from bridge.legs import LegOutlet


@dataclass
class MemoryLeg:
    """A PBX leg whose caller side the test drives."""

    rate: int = 8000
    # What the caller's side sends (``inbox.put(event)``), taken as the service's legs are.
    inbox: LegOutlet = field(default_factory=LegOutlet)
    sent: list[bytes] = field(default_factory=list)
    closed: bool = False
    # Called when the leg's owner closes it (a test records what had happened by then).
    on_close: Callable[[], None] = lambda: None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def deliver(self, sink: LegSink | None) -> None:
        self.inbox.attach(sink)

    async def receive(self) -> list[LegEvent]:
        return await self.inbox.receive()

    def send_audio(self, pcm: bytes) -> bool:
        self.sent.append(pcm)
        self.changed.set()
        return True

    async def aclose(self) -> None:
        if not self.closed:
            self.on_close()
        self.closed = True
        self.changed.set()

    async def wait_closed(self, timeout: float = 10.0) -> None:
        async def wait() -> None:
            while not self.closed:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)

    async def wait_sent(self, count: int, timeout: float = 10.0) -> None:
        async def wait() -> None:
            while len(self.sent) < count:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)

    def tone_frames(self, frequency: float) -> int:
        return sum(1 for frame in self.sent if tone_share(frame, self.rate, frequency) > 0.5)
