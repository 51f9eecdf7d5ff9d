"""PBX-neutral facts and events: what Asterisk and FreeSWITCH adapters both report.

A PBX backend turns its PBX's wire events (AMI ``UserEvent``/``Hangup``, ESL ``CHANNEL_PARK``/
``CHANNEL_HANGUP_COMPLETE``) into these, so the call flow above them is written once, and
carries a call's audio as a :class:`MediaLeg`. Everything in :class:`InviteFacts` is untrusted
input that came from a caller's INVITE; :func:`invite_facts` is the one place it is cleaned.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

log = logging.getLogger(__name__)

PbxKind = Literal["asterisk", "freeswitch", "test"]

MAX_X_HEADERS = 64
MAX_HEADER_NAME_CHARS = 64
MAX_VALUE_CHARS = 1024
_HEADER_NAME = re.compile(r"^[Xx]-[A-Za-z0-9!#$%&'*+.^_`|~-]{1,62}$")
# C0 controls and DEL never reach templates, logs or the PBX: no CR/LF injection, no NULs.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class InviteFacts:
    """What an inbound INVITE tells us, after :func:`invite_facts` cleaned it.

    Attributes:
        pbx: which PBX saw the call.
        pbx_call_id: the PBX's id of the call (Asterisk Uniqueid, FreeSWITCH Unique-ID).
        channel: the handle the adapter controls the call by (Asterisk channel name, FS uuid).
        request_user: user part of the request-URI (the dialed "number").
        request_host: host of the request-URI, lowercase, without port.
        to_uri: the To header's URI, when known.
        from_number: user part of the From URI (the caller id number).
        from_name: display name of the From header.
        from_uri: the From URI.
        headers: the X- headers, names as received, in order; a repeated name appears twice.
        sip_call_id: the SIP Call-ID, when known.
        outbound: the call was placed by sipbridge (``POST /call``): the customer is the one
            dialled (``from_*`` describe them all the same), the request-URI is the SIP
            number the call comes from, and ``headers`` are those sent on the INVITE.
    """

    pbx: PbxKind
    pbx_call_id: str
    channel: str
    request_user: str
    request_host: str
    to_uri: str | None = None
    from_number: str | None = None
    from_name: str | None = None
    from_uri: str | None = None
    headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    sip_call_id: str | None = None
    outbound: bool = False

    @property
    def request_uri(self) -> str:
        """``sip:user@host`` as dialed."""
        return f"sip:{self.request_user}@{self.request_host}"

    @property
    def call_type(self) -> str:
        """Vapi's ``call.type``."""
        return "outboundPhoneCall" if self.outbound else "inboundPhoneCall"

    def customer(self) -> dict[str, str]:
        """Vapi's ``customer``: the From number, display name and URI of an inbound call; who
        an outbound call dials."""
        customer: dict[str, str] = {}
        if self.from_number:
            customer["number"] = self.from_number
        if self.from_name:
            customer["name"] = self.from_name
        if self.from_uri:
            customer["sipUri"] = self.from_uri
        return customer

    def header_map(self) -> dict[str, str]:
        """X- headers as an object (first value of a repeated name), names as received."""
        result: dict[str, str] = {}
        seen: set[str] = set()
        for name, value in self.headers:
            if name.lower() not in seen:
                seen.add(name.lower())
                result[name] = value
        return result


def clean_text(value: str | None, limit: int = MAX_VALUE_CHARS) -> str | None:
    """Drops control characters and caps the length of one untrusted string."""
    if value is None:
        return None
    cleaned = _CONTROL.sub("", value)
    return cleaned[:limit]


def invite_facts(
    *,
    pbx: PbxKind,
    pbx_call_id: str,
    channel: str,
    request_user: str,
    request_host: str,
    headers: Iterable[tuple[str, str]] = (),
    to_uri: str | None = None,
    from_number: str | None = None,
    from_name: str | None = None,
    from_uri: str | None = None,
    sip_call_id: str | None = None,
    outbound: bool = False,
) -> InviteFacts:
    """Builds :class:`InviteFacts` from raw PBX values, cleaning every caller-controlled field.

    Header names that are not ``X-`` tokens are dropped; values lose control characters (CR, LF,
    NUL, ...) and are capped at 1024 characters; at most 64 headers are kept. Each drop is logged.
    """
    kept: list[tuple[str, str]] = []
    for name, value in headers:
        if not _HEADER_NAME.match(name):
            log.warning("dropped SIP header with an invalid name %r", clean_text(name, 80))
            continue
        if len(kept) >= MAX_X_HEADERS:
            log.warning("dropped X- headers beyond the first %d", MAX_X_HEADERS)
            break
        cleaned = clean_text(value) or ""
        if cleaned != value:
            log.warning("cleaned control characters or excess length from header %s", name)
        kept.append((name, cleaned))
    host = (clean_text(request_host, 255) or "").strip().lower()
    if host.startswith("[") and "]" in host:
        host = host[: host.index("]") + 1]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return InviteFacts(
        pbx=pbx,
        pbx_call_id=clean_text(pbx_call_id, 128) or "",
        channel=clean_text(channel, 256) or "",
        request_user=clean_text(request_user, 128) or "",
        request_host=host,
        to_uri=clean_text(to_uri, 512),
        from_number=clean_text(from_number, 128),
        from_name=clean_text(from_name, 128),
        from_uri=clean_text(from_uri, 512),
        headers=tuple(kept),
        sip_call_id=clean_text(sip_call_id, 256),
        outbound=outbound,
    )


# ---- what a PBX backend reports to the call flow -------------------------------------------------


@dataclass(frozen=True)
class CallOffered:
    """A new inbound call waits for a decision (it rings)."""

    facts: InviteFacts


@dataclass(frozen=True)
class CallGone:
    """The PBX reports that the call's channel is gone.

    Attributes:
        pbx: the PBX that had the call.
        pbx_call_id: the PBX's id of the call.
        by_caller: the caller's side ended it (a BYE or CANCEL from the caller); False when the
            PBX ended it itself (a shutdown, an operator, a dialplan timeout).
        cause: the Q.850 cause as reported (16 normal clearing), 0 when unknown.
        ended_at: when the channel ended, if the PBX said (a hangup learnt late, after a lost
            link, keeps its real time); None: now.
    """

    pbx: PbxKind
    pbx_call_id: str
    by_caller: bool = True
    cause: int = 0
    ended_at: datetime | None = None
    # An outbound call the customer never answered: how the PBX's dial ended (Asterisk's
    # DIALSTATUS: BUSY, NOANSWER, CONGESTION, ...) and the customer's final SIP response.
    dial_status: str | None = None
    sip_status: int | None = None
    detail: str = ""


@dataclass(frozen=True)
class OutboundDial:
    """How to reach an outbound call's customer (``POST /call``).

    Attributes:
        customer: a Vapi destination: ``{"type": "sip", "sipUri": ...}`` or
            ``{"type": "number", "number": ...}``.
        caller_id: the caller id number the customer sees (the SIP number's user part).
        caller_name: the caller id name (the SIP number's name), may be empty.
        headers: X- headers for the INVITE, in order.
        ring_timeout_s: how long the customer's phone may ring.
    """

    customer: dict[str, str]
    caller_id: str
    caller_name: str
    headers: tuple[tuple[str, str], ...]
    ring_timeout_s: int


@dataclass(frozen=True)
class LegConnected:
    """The PBX connected an accepted call's audio (an AudioSocket connection, the first
    unicast datagram). The flow runs the call's conversation over ``leg``, or closes it."""

    call_id: str
    leg: MediaLeg


@dataclass(frozen=True)
class LinkChanged:
    """The control link to the PBX went up or down."""

    pbx: PbxKind
    up: bool
    detail: str = ""


PbxEvent = CallOffered | CallGone | LegConnected | LinkChanged


class CallEvents(Protocol):
    """Where a PBX backend reports: one channel of events, and one question for resyncs."""

    def post(self, event: PbxEvent) -> None:
        """Hands one event to the flow (never blocks, never raises)."""

    def live_calls(self, pbx: PbxKind) -> set[str]:
        """The PBX call ids of this PBX's calls that the flow still considers live."""


# ---- a call's audio, as a PBX backend carries it ------------------------------------------------


@dataclass(frozen=True)
class LegAudio:
    """Caller audio: 16-bit PCM at the leg's rate."""

    pcm: bytes


@dataclass(frozen=True)
class LegDtmf:
    """The caller pressed a key."""

    digit: str


@dataclass(frozen=True)
class LegClosed:
    """The leg is gone: ``by_caller`` for a hangup, else a failure described by ``detail``."""

    by_caller: bool
    detail: str = ""


LegEvent = LegAudio | LegDtmf | LegClosed
# Takes a leg's events as they arrive: called from the socket's callback, it must not block.
LegSink = Callable[[LegEvent], None]


class MediaLeg(Protocol):
    """A call's audio connection to the PBX (AudioSocket, unicast L16)."""

    rate: int

    def deliver(self, sink: LegSink | None) -> None:
        """From now on the leg's events go to ``sink`` as they arrive, those kept so far
        first (``None``: they are kept for :meth:`receive` again). A running session takes
        them this way: no task woken per frame."""

    async def receive(self) -> list[LegEvent]:
        """The next events; ends with a :class:`LegClosed`."""

    def send_audio(self, pcm: bytes) -> bool:
        """Queues one frame for the PBX; False if it was dropped (the PBX is not reading)."""

    async def aclose(self) -> None:
        """The conversation is done with the leg: frees its socket (the call itself is ended
        through the backend, not here)."""
