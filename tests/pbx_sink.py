"""What a PBX adapter reports, recorded: the event sink both adapters' tests hand them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bridge.events import (
    CallGone,
    CallOffered,
    InviteFacts,
    LegConnected,
    LinkChanged,
    MediaLeg,
    PbxEvent,
    PbxKind,
)


@dataclass
class RecordingSink:
    """Records what a backend posts (the flow's CallEvents); ``known`` plays the flow's live
    calls."""

    offers: list[InviteFacts] = field(default_factory=list)
    hangups: list[tuple[str, int]] = field(default_factory=list)
    digits: list[tuple[str, str]] = field(default_factory=list)
    links: list[bool] = field(default_factory=list)
    link_times: list[float] = field(default_factory=list)
    known: set[str] = field(default_factory=set)
    legs: list[tuple[str, MediaLeg]] = field(default_factory=list)
    gone: list[CallGone] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def post(self, event: PbxEvent) -> None:
        if isinstance(event, CallOffered):
            self.offered(event.facts)
        elif isinstance(event, CallGone):
            self.gone.append(event)
            self.hung_up(event.pbx_call_id, event.cause)
        elif isinstance(event, LegConnected):
            self.legs.append((event.call_id, event.leg))
            self.changed.set()
        elif isinstance(event, LinkChanged):
            self.link_changed(event.up, event.detail)

    def live_calls(self, pbx: PbxKind) -> set[str]:
        return set(self.known)

    def offered(self, facts: InviteFacts) -> None:
        self.offers.append(facts)
        self.changed.set()

    def hung_up(self, pbx_call_id: str, cause: int) -> None:
        self.hangups.append((pbx_call_id, cause))
        self.changed.set()

    def dtmf(self, pbx_call_id: str, digit: str) -> None:
        self.digits.append((pbx_call_id, digit))
        self.changed.set()

    def link_changed(self, up: bool, detail: str) -> None:
        self.links.append(up)
        self.link_times.append(time.monotonic())
        self.changed.set()

    async def wait_for(
        self, predicate: Callable[[RecordingSink], object], timeout: float = 5.0
    ) -> None:
        async def wait() -> None:
            while not predicate(self):
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)
