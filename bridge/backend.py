"""What a PBX backend is: the one interface between the call flow and a PBX.

A backend is everything sipbridge needs for one kind of PBX: its control link (AMI, the Event
Socket), its media transport (AudioSocket, unicast L16) and its settings section. It reports
calls to the flow through :class:`bridge.events.CallEvents` (offers, hangups, connected audio
legs, link changes) and carries out the flow's decisions through :class:`PbxControl`. The
composition root builds the enabled backends with one factory (:mod:`bridge.pbx`) and knows no
PBX by name; ``docs/architecture.md`` says how to add one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from bridge.events import CallEvents, InviteFacts, OutboundDial, PbxKind


class PbxControl(Protocol):
    """What the call flow asks of a PBX. Every method may raise :class:`PbxError`."""

    kind: PbxKind

    async def reject(self, facts: InviteFacts, sip_status: int) -> None:
        """Refuses the (unanswered) call with this final SIP status."""

    async def transfer(self, facts: InviteFacts, destination: Mapping[str, Any]) -> None:
        """Blind-transfers the call to a Vapi transfer destination (``number`` or ``sip``).

        Returns once the transfer worked, raises if it failed, and settles as soon as the
        channel ends: the flow waits for this answer even after ``CallGone`` (which may reach it
        first), for ``callflow.TRANSFER_SETTLE_S`` at most.
        """

    async def connect_media(self, facts: InviteFacts, call_id: str) -> None:
        """Answers the call and connects its audio to sipbridge, tagged ``call_id`` (the leg
        arrives later as a :class:`bridge.events.LegConnected`)."""

    def check_dial(self, dial: OutboundDial) -> str | None:
        """Why this PBX could not dial ``dial`` as it is (checked before the call is placed:
        a request it can never carry out is refused at once), or None."""

    async def originate(self, facts: InviteFacts, call_id: str, dial: OutboundDial) -> None:
        """Dials an outbound call's customer; returns once the PBX has taken the dial (it is
        dialling; the customer's phone rings a moment later). ``facts.channel`` is the handle
        the call is controlled by from then on. The customer's answer arrives as the call's
        :class:`bridge.events.LegConnected`; a dial that fails, and a hangup, as
        :class:`bridge.events.CallGone` (with ``dial_status`` when it was never answered).

        Raises:
            PbxActionError: the PBX refused the dial, or this PBX cannot place calls.
        """

    async def hangup(self, facts: InviteFacts) -> None:
        """Ends the call; a call that is already gone counts as done."""

    async def send_dtmf(self, facts: InviteFacts, digits: str) -> None:
        """Plays DTMF digits to the caller."""


class PbxBackend(PbxControl, Protocol):
    """A PBX's control link and media transport, started and stopped as one."""

    async def start(self, events: CallEvents) -> None:
        """Opens the media transport, then connects to the PBX (retrying in the background).

        Raises:
            PbxAuthError: the PBX refused sipbridge's credentials (not retried).
        """

    async def aclose(self) -> None:
        """Stops the link and the media transport; a second call does nothing."""

    def describe(self) -> dict[str, Any]:
        """What ``/health`` shows of this backend beyond its link."""
