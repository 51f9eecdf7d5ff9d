"""An Event Socket link connected to the capture-built peer, recording what it hands over."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from bridge.pbx.freeswitch.backend import SUBSCRIPTION
from bridge.pbx.freeswitch.link import EslLink
from bridge.protocol import esl
from tests.esl_peer import EslPeer
from tests.test_pbx_freeswitch_backend import settings


@dataclass
class LinkRig:
    peer: EslPeer
    link: EslLink | None = None
    events: list[esl.EslEvent] = field(default_factory=list)
    links: list[bool] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_event(self, event: esl.EslEvent) -> None:
        self.events.append(event)
        self.changed.set()

    def on_link(self, up: bool, detail: str) -> None:
        self.links.append(up)
        self.changed.set()

    async def wait_for(self, predicate: Callable[[LinkRig], object], timeout: float = 5.0) -> None:
        async def wait() -> None:
            while not predicate(self):
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)


@asynccontextmanager
async def link_rig() -> AsyncIterator[LinkRig]:
    """A link up on a fresh peer (a long ping interval: nothing but the test talks)."""
    peer = EslPeer()
    await peer.start()
    rig = LinkRig(peer)
    link = EslLink(
        settings(peer.port, ping_interval_s=10.0, action_timeout_s=5.0),
        SUBSCRIPTION,
        rig.on_event,
        rig.on_link,
    )
    rig.link = link
    try:
        await link.start()
        await rig.wait_for(lambda r: r.links == [True])
        yield rig
    finally:
        await link.aclose()
        await peer.stop()
    assert not [t for t in threading.enumerate() if t.name == "freeswitch-esl"]
