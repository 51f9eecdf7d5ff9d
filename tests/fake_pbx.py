"""A recording stand-in for a PBX adapter (the ``PbxControl`` interface) in call-flow tests.

The real adapters are tested against real Asterisk and the captured FreeSWITCH peer; this one only
lets the PBX-neutral call flow be tested without a PBX.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bridge.errors import PbxActionError
from bridge.events import InviteFacts, OutboundDial, PbxKind


@dataclass
class FakePbx:
    kind: PbxKind = "test"
    actions: list[tuple[str, Any]] = field(default_factory=list)
    fail: set[str] = field(default_factory=set)
    # Runs inside transfer() before it returns (what the PBX does meanwhile, e.g. close a leg).
    during_transfer: Callable[[], Awaitable[None]] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def _record(self, action: str, detail: Any) -> None:
        self.actions.append((action, detail))
        self._changed.set()
        if action in self.fail:
            raise PbxActionError(f"{action} failed (scripted)")

    async def reject(self, facts: InviteFacts, sip_status: int) -> None:
        self._record("reject", sip_status)

    async def transfer(self, facts: InviteFacts, destination: Mapping[str, Any]) -> None:
        self._record("transfer", dict(destination))
        if self.during_transfer is not None:
            await self.during_transfer()

    async def connect_media(self, facts: InviteFacts, call_id: str) -> None:
        self._record("connect_media", call_id)

    def check_dial(self, dial: OutboundDial) -> str | None:
        return "scripted: cannot dial" if "check_dial" in self.fail else None

    async def originate(self, facts: InviteFacts, call_id: str, dial: OutboundDial) -> None:
        self._record("originate", (call_id, dial))

    async def hangup(self, facts: InviteFacts) -> None:
        self._record("hangup", facts.pbx_call_id)

    async def send_dtmf(self, facts: InviteFacts, digits: str) -> None:
        self._record("send_dtmf", digits)

    async def wait_for(self, action: str, timeout: float = 5.0, nth: int = 1) -> Any:
        """The detail of the ``nth`` ``action`` the PBX was asked for (waits for it)."""

        async def wait() -> Any:
            while True:
                details = [detail for name, detail in self.actions if name == action]
                if len(details) >= nth:
                    return details[nth - 1]
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(wait(), timeout)

    def names(self) -> list[str]:
        return [name for name, _ in self.actions]
