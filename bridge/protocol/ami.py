"""sipbridge's AMI vocabulary with its dialplan (``dialplan/sipbridge.conf``), sans I/O.

AMI framing itself is panoramisk's job; this module knows what the events and actions that
sipbridge exchanges with its dialplan mean:

- ``UserEvent: SipbridgeOffer`` announces a call. Every caller-controlled field in it was
  encoded by the dialplan's ``sipbridge-encode`` (``%``, ``(``, ``)`` escaped, then URIENCODE),
  so it is URI-decoded twice here.
- Decisions are carried out with ``PJSIPHangup`` (reject with an exact SIP status), ``Setvar`` +
  ``Redirect`` to ``sipbridge-media`` (answer, AudioSocket) or ``sipbridge-transfer`` (dial the
  destination), and ``Hangup``.

An AMI message is ``Key: value`` lines, so a CR or LF in a value would inject fields: every
action built here is checked and refused with :class:`LocalProtocolError` before it can be sent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import quote, unquote

from bridge.errors import LocalProtocolError, PbxActionError, RemoteProtocolError
from bridge.events import InviteFacts, invite_facts
from bridge.protocol.decimals import ascii_decimal

OFFER_EVENT = "SipbridgeOffer"
# The only events sipbridge acts on, and their classes: the login asks for these classes alone
# (no privilege needed), so a manager user that reads everything (``read = all``) is not sent
# the dialplan's per-priority Newexten and VarSet events, RTCP reports, CEL and the rest, which
# sipbridge would parse and drop: 125 events for a 3-second call, 6 with the classes.
EVENTS_USED = ("UserEvent", "Hangup")
EVENT_CLASSES = "call,user"
HEARTBEAT_VARIABLE = "SIPBRIDGE_HEARTBEAT"
NORMAL_CLEARING = 16

_SIP_USER = re.compile(r"^sips?:(?P<user>[^@;>]+)@", re.IGNORECASE)
# What may appear in a Dial() target built from a destination: no argument separators
# (, & |), no parentheses, quotes, braces, $ or whitespace.
_DIAL_SAFE_URI = re.compile(r"^sips?:[A-Za-z0-9.\-_~+!*'%:@;=?/]{3,300}$")
_CALLER_ID = re.compile(r"^\+?[A-Za-z0-9*#]{1,32}$")
_DIAL_DIGITS = re.compile(r"^[0-9*#wW]{1,20}$")
_DIAL_NUMBER = re.compile(r"^\+?[A-Za-z0-9]{1,32}$")


def decode(text: str | None) -> str:
    """Reverses ``sipbridge-encode``: URI-decodes twice (UTF-8)."""
    return unquote(unquote(text or ""))


def decode_headers(text: str | None) -> list[tuple[str, str]]:
    """``&name=value&name=value`` (each part encoded) to (name, value) pairs, in order."""
    pairs: list[tuple[str, str]] = []
    for part in (text or "").split("&"):
        if not part:
            continue
        name, separator, value = part.partition("=")
        if not separator:
            continue
        pairs.append((decode(name), decode(value)))
    return pairs


def parse_name_addr(value: str) -> tuple[str | None, str | None]:
    """(display name, URI) of a From/To header value such as ``"Ann" <sip:ann@x>;tag=1``.

    RFC 3261 section 25.1: ``name-addr = [ display-name ] LAQUOT addr-spec RAQUOT``, the display
    name a quoted-string (backslash escapes) or tokens; a value that is not a name-addr is taken
    as a bare addr-spec, up to its first ``;`` parameter.

    A hand scanner, linear in the length: each character is read once by one of the steps
    below. The caller controls this text, and the regex it replaces (``\\s*``, a lazy token and
    ``\\s*`` again before ``<``) backtracked cubically: 1,600 spaces took two seconds.
    """
    name_addr = _scan_name_addr(value)
    if name_addr is None:
        uri = value.split(";", 1)[0].strip()
        return None, uri or None
    name, uri = name_addr
    return name or None, uri.strip() or None


def _skip_space(value: str, position: int) -> int:
    while position < len(value) and value[position].isspace():
        position += 1
    return position


def _scan_name_addr(value: str) -> tuple[str | None, str] | None:
    """(display name, URI between ``<`` and ``>``), or None when ``value`` is no name-addr."""
    position = _skip_space(value, 0)
    if value.startswith('"', position):
        quoted = _scan_quoted(value, position + 1)
        if quoted is None:
            return None
        name: str | None
        name, position = quoted
        position = _skip_space(value, position)
        if not value.startswith("<", position):
            return None
        opening = position
    else:
        # Tokens up to the "<"; a quote before it makes this no name-addr.
        opening = value.find("<", position)
        quote_at = value.find('"', position)
        if opening < 0 or 0 <= quote_at < opening:
            return None
        name = value[position:opening].strip() or None
    closing = value.find(">", opening + 1)
    if closing < 0:
        return None
    return name, value[opening + 1 : closing]


def _scan_quoted(value: str, position: int) -> tuple[str, int] | None:
    """A quoted-string's text (escapes undone) from just after its opening quote, and the
    position after its closing one; None when it never closes or escapes a line break."""
    text: list[str] = []
    while position < len(value):
        char = value[position]
        if char == '"':
            return "".join(text), position + 1
        if char == "\\":
            # quoted-pair: a backslash and any character but CR or LF (RFC 3261 section 25.1).
            if position + 1 >= len(value) or value[position + 1] in "\r\n":
                return None
            char = value[position + 1]
            position += 1
        text.append(char)
        position += 1
    return None


def uri_user(uri: str | None) -> str | None:
    """The user part of a SIP URI (``sip:+1555@host:5060`` gives ``+1555``)."""
    if not uri:
        return None
    match = _SIP_USER.match(uri.strip())
    return unquote(match.group("user")) if match else None


def _field(event: Mapping[str, Any], key: str) -> str:
    value = event.get(key, "")
    if isinstance(value, list):  # a repeated key; the first is the dialplan's
        value = value[0] if value else ""
    return str(value)


@dataclass(frozen=True)
class Offer:
    """A decoded SipbridgeOffer event."""

    facts: InviteFacts
    truncated: bool


def decode_offer(event: Mapping[str, Any]) -> Offer:
    """The call a ``SipbridgeOffer`` UserEvent announces.

    Raises:
        RemoteProtocolError: the event lacks the channel or its unique id.
    """
    uniqueid, channel = _field(event, "Uniqueid"), _field(event, "Channel")
    if not uniqueid or not channel:
        raise RemoteProtocolError("SipbridgeOffer event without Uniqueid or Channel")
    from_name, from_uri = parse_name_addr(decode(_field(event, "SbFrom")))
    _, to_uri = parse_name_addr(decode(_field(event, "SbTo")))
    from_number = uri_user(from_uri) or _field(event, "CallerIDNum") or None
    if from_number in ("<unknown>", ""):
        from_number = None
    facts = invite_facts(
        pbx="asterisk",
        pbx_call_id=uniqueid,
        channel=channel,
        request_user=decode(_field(event, "SbDialed")),
        request_host=decode(_field(event, "SbDomain")),
        headers=decode_headers(_field(event, "SbHeaders")),
        to_uri=to_uri,
        from_number=from_number,
        from_name=from_name,
        from_uri=from_uri,
        sip_call_id=decode(_field(event, "SbCallId")) or None,
    )
    return Offer(facts, _field(event, "SbTruncated") == "1")


def hangup_cause(event: Mapping[str, Any]) -> int:
    """The Q.850 cause of a Hangup event (0 when absent or not a number)."""
    # ASCII digits only: int() also takes " 16", "+16", "1_6" and "١٦" (Arabic-Indic digits).
    return ascii_decimal(_field(event, "Cause"), 3) or 0


# ---- actions ------------------------------------------------------------------------------------

Action = dict[str, str]
# An action with a repeated field (Originate's Variable: one line per variable).
MultiAction = dict[str, str | list[str]]
# manager.c reads one line of an action into 1025 bytes; a longer one refuses the action.
MAX_LINE_BYTES = 1024


def checked(action: Mapping[str, str]) -> Action:
    """The action, after making sure no key or value could inject AMI fields.

    Raises:
        LocalProtocolError: a CR, LF or NUL in a key or value, or an empty key.
    """
    for key, value in action.items():
        _check_field(key, value)
    return dict(action)


def checked_fields(action: Mapping[str, str | list[str]]) -> MultiAction:
    """:func:`checked` for actions with repeated fields (a list sends one line each)."""
    for key, value in action.items():
        for item in value if isinstance(value, list) else [value]:
            _check_field(key, item)
    return dict(action)


def _check_field(key: str, value: str) -> None:
    if not key or any(c in key + value for c in "\r\n\x00") or ":" in key:
        raise LocalProtocolError(f"refusing to send AMI field {key!r}: {value!r}")
    if len(f"{key}: {value}".encode()) > MAX_LINE_BYTES:
        raise LocalProtocolError(
            f"AMI field {key} is {len(value.encode())} bytes: Asterisk takes at most "
            f"{MAX_LINE_BYTES} per line"
        )


def setvar(channel: str | None, variable: str, value: str) -> Action:
    """``Setvar`` on a channel, or a global variable when ``channel`` is None."""
    action = {"Action": "Setvar", "Variable": variable, "Value": value}
    if channel is not None:
        action["Channel"] = channel
    return checked(action)


def heartbeat(unix_time: int) -> Action:
    """Refreshes the global the dialplan checks before holding a call for sipbridge."""
    return setvar(None, HEARTBEAT_VARIABLE, str(unix_time))


def event_filters() -> list[Action]:
    """Session filters passing only :data:`EVENTS_USED`: within the ``call`` class, Newstate,
    Newchannel, Dial*, Bridge* and the like are left out too. Asterisk 21+'s advanced filter
    (``name(...)``) matches the event name by hash instead of a regex over the whole payload.
    ``Filter`` needs ``write = system``; without it the login's event classes still apply."""
    return [
        checked(
            {
                "Action": "Filter",
                "Operation": "Add",
                "MatchCriteria": f"action(include),name({name})",
            }
        )
        for name in EVENTS_USED
    ]


def reject(channel: str, sip_status: int) -> Action:
    """Hang up an unanswered PJSIP channel with this final SIP status (``PJSIPHangup``)."""
    if not 400 <= sip_status <= 699:
        raise LocalProtocolError(f"{sip_status} is not a final error status")
    return checked({"Action": "PJSIPHangup", "Channel": channel, "Cause": str(sip_status)})


def hangup(channel: str, cause: int = NORMAL_CLEARING) -> Action:
    """Hang up a channel."""
    return checked({"Action": "Hangup", "Channel": channel, "Cause": str(cause)})


def redirect(channel: str, context: str, exten: str = "s", priority: int = 1) -> Action:
    """Move a channel to another place in the dialplan."""
    return checked(
        {
            "Action": "Redirect",
            "Channel": channel,
            "Context": context,
            "Exten": exten,
            "Priority": str(priority),
        }
    )


def connect_media(channel: str, call_id: str, audiosocket: str, media_context: str) -> list[Action]:
    """Answer and run ``AudioSocket(<call id>, <audiosocket>)`` in the media context."""
    return [
        setvar(channel, "SIPBRIDGE_CALL_ID", call_id),
        setvar(channel, "SIPBRIDGE_AUDIOSOCKET", audiosocket),
        redirect(channel, media_context),
    ]


def encode_sip_headers(headers: Mapping[str, str]) -> str:
    """``name=value&...``, each part URI-encoded (the transfer pre-dial handler decodes once)."""
    return "&".join(
        f"{quote(name, safe='')}={quote(value, safe='')}" for name, value in headers.items()
    )


@dataclass(frozen=True)
class TransferPlan:
    """The actions of a blind transfer, and what had to be left out of it."""

    actions: list[Action]
    notes: list[str]


def dial_target(destination: Mapping[str, Any], endpoint: str, purpose: str) -> str:
    """The ``Dial()`` target of a Vapi destination or customer: ``sip`` (a ``sipUri``) dials
    ``PJSIP/<endpoint>/<sipUri>``, ``number`` dials ``PJSIP/<number>@<endpoint>`` (point that
    endpoint at your trunk).

    Raises:
        PbxActionError: the destination cannot be dialled safely.
    """
    kind = destination.get("type")
    if kind == "sip":
        uri = str(destination.get("sipUri", ""))
        if not _DIAL_SAFE_URI.match(uri):
            raise PbxActionError(f"{purpose} SIP URI {uri!r} has characters Dial() cannot take")
        return f"PJSIP/{endpoint}/{uri}"
    if kind == "number":
        number = str(destination.get("number", ""))
        if not _DIAL_NUMBER.match(number):
            raise PbxActionError(f"{purpose} number {number!r} is not dialable")
        return f"PJSIP/{number}@{endpoint}"
    raise PbxActionError(f"{purpose} destination type {kind!r} is not supported")


def transfer(
    channel: str,
    destination: Mapping[str, Any],
    *,
    endpoint: str,
    transfer_context: str,
) -> TransferPlan:
    """Dial a Vapi transfer destination from the transfer context.

    ``sip`` destinations dial ``PJSIP/<endpoint>/<sipUri>``; ``number`` destinations dial
    ``PJSIP/<number>@<endpoint>`` (point that endpoint at your trunk). ``sipHeaders`` go on the
    new INVITE, ``extension`` is dialled as DTMF once answered, ``callerId`` sets the caller id.

    Raises:
        PbxActionError: the destination cannot be dialled safely.
    """
    notes: list[str] = []
    target = dial_target(destination, endpoint, "transfer")
    options = ""
    extension = destination.get("extension")
    if extension:
        if not _DIAL_DIGITS.match(str(extension)):
            raise PbxActionError(f"extension {extension!r} is not dialable")
        options = f"D({extension})"
    caller_id = destination.get("callerId") or ""
    if caller_id and not _CALLER_ID.match(str(caller_id)):
        notes.append(f"callerId {caller_id!r} is not a dialable number; the caller's own is kept")
        caller_id = ""
    plan = destination.get("transferPlan")
    if isinstance(plan, Mapping) and plan.get("sipVerb") not in (None, "dial"):
        notes.append(
            f"transferPlan.sipVerb {plan.get('sipVerb')!r}: Asterisk dials the destination"
        )
    headers = destination.get("sipHeaders") or {}
    actions = [
        setvar(channel, "SIPBRIDGE_XFER_DIAL", target),
        setvar(channel, "SIPBRIDGE_XFER_CALLERID", str(caller_id)),
        setvar(channel, "SIPBRIDGE_XFER_OPTIONS", options),
        # "__" makes the variable reach the outgoing channel, where the pre-dial handler runs.
        setvar(channel, "__SIPBRIDGE_XFER_HEADERS", encode_sip_headers(headers)),
        redirect(channel, transfer_context),
    ]
    return TransferPlan(actions, notes)


OUTBOUND_EVENT = "SipbridgeDialed"


def originate(
    call_id: str,
    *,
    target: str,
    caller_id: str,
    caller_name: str,
    headers: Mapping[str, str],
    ring_timeout_s: int,
    audiosocket: str,
    outbound_context: str,
    media_context: str,
    customer_id: str = "",
) -> MultiAction:
    """An outbound call (``Originate``, asynchronous): a Local channel whose second half dials
    ``target`` from the outbound context (caller id, X- headers, ring timeout) and reports how
    the dial ended (``UserEvent: SipbridgeDialed``); once the customer answers, the first half
    runs AudioSocket from the media context like an answered inbound call.

    The first half's Uniqueid is the call id (``ChannelId``), so its Hangup names the call and
    AMI actions reach it by that id. Its caller id is the customer's (``customer_id``, when
    dialable): a transfer of the call presents the customer, as for an inbound call.

    Raises:
        LocalProtocolError: a value that could inject AMI fields or split Asterisk's argument
            parsing, or a line longer than Asterisk takes (long X- headers).
    """
    if not _CALLER_ID.match(caller_id):
        raise LocalProtocolError(f"caller id {caller_id!r} is not a dialable number")
    variables = {
        "SIPBRIDGE_CALL_ID": call_id,
        "SIPBRIDGE_AUDIOSOCKET": audiosocket,
        "SIPBRIDGE_OUT_DIAL": target,
        "SIPBRIDGE_OUT_RING_S": str(ring_timeout_s),
        "SIPBRIDGE_OUT_CALLERID": caller_id,
        # URI-encoded: a display name may hold anything; the dialplan decodes it into Set().
        "SIPBRIDGE_OUT_CALLERNAME": quote(caller_name, safe=""),
        # "__" makes it reach the customer's channel, where the pre-dial handler adds them.
        "__SIPBRIDGE_XFER_HEADERS": encode_sip_headers(headers),
    }
    for name, value in variables.items():
        # Asterisk splits each Variable line at commas (minding quotes and parentheses).
        if any(c in value for c in ',"()\\'):
            raise LocalProtocolError(f"refusing to originate with {name}={value!r}")
    action: MultiAction = {
        "Action": "Originate",
        "Channel": f"Local/s@{outbound_context}",
        "ChannelId": call_id,
        "OtherChannelId": f"{call_id}-dial",
        "Context": media_context,
        "Exten": "s",
        "Priority": "1",
        # How long Asterisk waits for the first half to answer: the ring timeout, plus the
        # time the dial takes to start.
        "Timeout": str((ring_timeout_s + 10) * 1000),
        "Async": "true",
        # One line per variable: a line is at most 1024 bytes.
        "Variable": [f"{name}={value}" for name, value in variables.items()],
    }
    if _CALLER_ID.match(customer_id):
        action["CallerID"] = customer_id
    return checked_fields(action)


@dataclass(frozen=True)
class DialResult:
    """How an outbound dial ended before the customer answered (``SipbridgeDialed``).

    Attributes:
        call_id: sipbridge's call id (the first half's Uniqueid).
        status: ``DIALSTATUS``: BUSY, NOANSWER, CONGESTION, CHANUNAVAIL, CANCEL, ANSWER ...
        sip_status: the customer's final SIP response, when Asterisk knew it (486, 603, ...).
        detail: that response as reported (``SIP 486 Busy Here``).
    """

    call_id: str
    status: str
    sip_status: int | None
    detail: str


def decode_dial_result(event: Mapping[str, Any]) -> DialResult | None:
    """The ``SipbridgeDialed`` user event, or None if ``event`` is another one."""
    if _field(event, "Event") != "UserEvent" or _field(event, "UserEvent") != OUTBOUND_EVENT:
        return None
    detail = decode(_field(event, "SbSip"))
    found = re.match(r"^SIP (\d{3})\b", detail)
    sip_status = int(found.group(1)) if found else None
    if sip_status is not None and sip_status < 300:
        # A dial that timed out while ringing last heard "SIP 180 Ringing": not an answer.
        sip_status, detail = None, ""
    return DialResult(
        call_id=decode(_field(event, "SbCall")),
        status=_field(event, "SbStatus").strip().upper(),
        sip_status=sip_status,
        detail=detail,
    )


@dataclass(frozen=True)
class ChannelState:
    """One row of ``CoreShowChannels``."""

    channel: str
    uniqueid: str
    context: str
    application: str


def channel_state(event: Mapping[str, Any]) -> ChannelState | None:
    """A ``CoreShowChannel`` list entry, or None for the other events of the list."""
    if _field(event, "Event") != "CoreShowChannel":
        return None
    return ChannelState(
        channel=_field(event, "Channel"),
        uniqueid=_field(event, "Uniqueid"),
        context=_field(event, "Context"),
        application=_field(event, "Application"),
    )


class Redirected(StrEnum):
    """What became of a ``Redirect`` whose answer was lost with the AMI link."""

    DONE = "done"  # the channel is in the target context: Asterisk carried it out
    NOT_DONE = "not done"  # still where it waited: Asterisk never got it, sending it is safe
    GONE = "gone"  # the channel has ended
    ELSEWHERE = "elsewhere"  # somewhere else: nothing to conclude, nothing to send


def redirect_outcome(state: ChannelState | None, *, waiting: str, target: str) -> Redirected:
    """Where the channel is now says what a lost ``Redirect`` from ``waiting`` to ``target``
    did, once AMI is back on a new session.

    Asterisk runs each action it read before it notices its AMI session closed, and a
    redirected channel leaves ``Wait()`` at once; the new session is at least one reconnect
    delay later. So a channel still in ``waiting`` never got the Redirect (AMI sessions never
    replay actions), and one in ``target`` did.
    """
    if state is None:
        return Redirected.GONE
    if state.context == target:
        return Redirected.DONE
    if state.context == waiting:
        return Redirected.NOT_DONE
    return Redirected.ELSEWHERE
