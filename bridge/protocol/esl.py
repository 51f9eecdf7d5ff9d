"""FreeSWITCH's Event Socket (ESL), sans I/O: a byte stream in, messages and events out.

Built from real FreeSWITCH 1.10.12 captures (``tests/data/freeswitch/``, their README has the
scenarios). What the wire looks like there:

- A message is a block of ``Name: value`` lines ended by an empty line, then, when the block
  has ``Content-Length``, exactly that many bytes of body with no terminator: the next message
  follows at once (``...\\n\\nJohnContent-Type: api/response``).
- ``Content-Type`` tells the kind: ``auth/request``, ``command/reply`` (``Reply-Text``),
  ``api/response``, ``text/event-plain``, ``text/event-json``, ``text/disconnect-notice``.
  The outbound socket's answer to ``connect`` is one block of the channel's variables with
  ``Content-Type: command/reply`` near its end, and no body.
- A plain event's body is itself a header block with url-encoded values, optionally followed
  by an inner body sized by its own ``Content-Length`` (``BACKGROUND_JOB``'s result). A CUSTOM
  event carried ``Content-Length`` twice, with the same value.

Values are url-decoded one line at a time, after splitting: decoding the whole block first (as
greenswitch 0.0.19 does: ``ESLEvent.parse_data`` in ``greenswitch/esl.py`` calls ``unquote`` on
the block, then ``splitlines``) lets ``%0A`` in a caller's header inject a line.

Everything built to be sent is checked: a CR or LF inside a command or a ``sendmsg`` header
would start another command, so :func:`command` and :func:`sendmsg` refuse them with
:class:`LocalProtocolError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from bridge.errors import LocalProtocolError, RemoteProtocolError
from bridge.events import InviteFacts, invite_facts
from bridge.protocol.decimals import ascii_decimal

AUTH_REQUEST = "auth/request"
COMMAND_REPLY = "command/reply"
API_RESPONSE = "api/response"
EVENT_PLAIN = "text/event-plain"
EVENT_JSON = "text/event-json"
DISCONNECT_NOTICE = "text/disconnect-notice"

# The biggest block seen is an outbound connect reply of 142 channel variables (about 9 KB);
# uuid_dump bodies are about 6 KB. These leave room for SDPs and many X- headers.
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024
_SIP_HEADER_VARIABLE = "variable_sip_h_"
# Enough for any length under a limit of a terabyte and leading zeros; more is not a length.
CONTENT_LENGTH_DIGITS = 15


def _decode_value(raw: bytes) -> str:
    return unquote(raw.decode("utf-8", errors="replace"))


def parse_header_block(block: bytes) -> list[tuple[str, str]]:
    """``Name: value`` lines to (name, url-decoded value) pairs, in order.

    Raises:
        RemoteProtocolError: a line is not ``Name: value``.
    """
    headers: list[tuple[str, str]] = []
    for line in block.split(b"\n"):
        if not line:
            continue
        name, separator, value = line.partition(b": ")
        if not separator:
            # "Name:" with an empty value ends in ":" with no space.
            if line.endswith(b":"):
                name, value = line[:-1], b""
            else:
                raise RemoteProtocolError(f"ESL header line without ': ': {line[:60]!r}")
        headers.append((name.decode("ascii", errors="replace"), _decode_value(value)))
    return headers


@dataclass(frozen=True)
class EslMessage:
    """One message of the stream: its envelope headers and its body (maybe empty)."""

    headers: tuple[tuple[str, str], ...]
    body: bytes = b""

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of a header (names compared case-insensitively)."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return default

    @property
    def content_type(self) -> str:
        """``Content-Type``, empty when the block has none."""
        return self.get("Content-Type") or ""

    @property
    def reply_text(self) -> str:
        """A ``command/reply``'s ``Reply-Text`` (``+OK accepted``, ``-ERR invalid``)."""
        return self.get("Reply-Text") or ""

    @property
    def ok(self) -> bool:
        """A command reply or api response that starts with ``+OK``."""
        text = self.reply_text if self.content_type == COMMAND_REPLY else self.text
        return text.startswith("+OK")

    @property
    def text(self) -> str:
        """The body as text."""
        return self.body.decode("utf-8", errors="replace")


class EslDecoder:
    """Cuts an ESL byte stream into :class:`EslMessage` objects.

    Feed it with :meth:`receive_data` in chunks of any size, take what is complete with
    :meth:`next_message`, and tell it the peer closed with :meth:`receive_eof`.

    Args:
        max_header_bytes: the largest header block accepted.
        max_body_bytes: the largest ``Content-Length`` accepted.
    """

    def __init__(
        self, max_header_bytes: int = MAX_HEADER_BYTES, max_body_bytes: int = MAX_BODY_BYTES
    ) -> None:
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self._buffer = bytearray()
        self._headers: tuple[tuple[str, str], ...] | None = None
        self._body_length = 0
        self._scanned = 0  # how much of the buffer is known to hold no block end
        self._eof = False

    def receive_data(self, data: bytes) -> None:
        """Adds bytes received from the socket."""
        if self._eof:
            raise RemoteProtocolError("ESL data after the end of the stream")
        self._buffer += data

    def receive_eof(self) -> None:
        """The peer closed the connection.

        Raises:
            RemoteProtocolError: it closed in the middle of a message.
        """
        self._eof = True
        if self._headers is not None or self._buffer.strip(b"\n"):
            raise RemoteProtocolError(
                f"ESL stream closed in the middle of a message ({len(self._buffer)} bytes held)"
            )

    @property
    def pending_bytes(self) -> int:
        """Bytes received that do not make a whole message yet."""
        return len(self._buffer)

    def next_message(self) -> EslMessage | None:
        """The next complete message, or None until more data arrives.

        Raises:
            RemoteProtocolError: a malformed header block, a bad or oversized Content-Length.
        """
        if self._headers is None:
            # Stray newlines between messages carry nothing.
            if self._buffer.startswith(b"\n"):
                del self._buffer[: len(self._buffer) - len(self._buffer.lstrip(b"\n"))]
            # From where the last search stopped: a block arriving a byte at a time is scanned
            # once, not once per byte (quadratic up to max_header_bytes).
            end = self._buffer.find(b"\n\n", self._scanned)
            if end < 0:
                self._scanned = max(0, len(self._buffer) - 1)
                if len(self._buffer) > self.max_header_bytes:
                    raise RemoteProtocolError(
                        f"ESL header block longer than {self.max_header_bytes} bytes"
                    )
                return None
            if end > self.max_header_bytes:
                raise RemoteProtocolError(
                    f"ESL header block longer than {self.max_header_bytes} bytes"
                )
            headers = tuple(parse_header_block(bytes(self._buffer[:end])))
            del self._buffer[: end + 2]
            self._scanned = 0
            self._body_length = content_length(headers, self.max_body_bytes)
            self._headers = headers
        if len(self._buffer) < self._body_length:
            return None
        body = bytes(self._buffer[: self._body_length])
        del self._buffer[: self._body_length]
        message = EslMessage(self._headers, body)
        self._headers = None
        return message

    def messages(self) -> list[EslMessage]:
        """Every complete message now available."""
        found = []
        while (message := self.next_message()) is not None:
            found.append(message)
        return found


def content_length(headers: Iterable[tuple[str, str]], limit: int = MAX_BODY_BYTES) -> int:
    """A header block's ``Content-Length`` (0 without one).

    Raises:
        RemoteProtocolError: not a number, over ``limit``, or given twice with two values.
    """
    values = {value for name, value in headers if name.lower() == "content-length"}
    if not values:
        return 0
    if len(values) > 1:
        raise RemoteProtocolError(f"ESL message with conflicting Content-Length {sorted(values)}")
    text = values.pop()
    # ASCII digits only: "²".isdigit() is true and int("²") raises a bare ValueError.
    length = ascii_decimal(text, CONTENT_LENGTH_DIGITS)
    if length is None:
        raise RemoteProtocolError(f"ESL Content-Length is not a number: {text[:20]!r}")
    if length > limit:
        raise RemoteProtocolError(f"ESL body of {length} bytes is over the {limit}-byte limit")
    return length


# ---- events --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EslEvent:
    """A FreeSWITCH event: its headers (decoded) and its inner body, if any."""

    headers: Mapping[str, str]
    body: str | None = None

    @property
    def name(self) -> str:
        """``Event-Name`` (``CHANNEL_PARK``, ``BACKGROUND_JOB``, ``CUSTOM``...)."""
        return self.headers.get("Event-Name", "")

    @property
    def subclass(self) -> str | None:
        """``Event-Subclass`` of a CUSTOM event."""
        return self.headers.get("Event-Subclass")

    @property
    def unique_id(self) -> str | None:
        """The channel's ``Unique-ID``."""
        return self.headers.get("Unique-ID")

    @property
    def job_uuid(self) -> str | None:
        """A ``BACKGROUND_JOB``'s ``Job-UUID`` (matches the bgapi reply)."""
        return self.headers.get("Job-UUID")


def _first_values(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    result: dict[str, str] = {}
    for name, value in pairs:
        result.setdefault(name, value)
    return result


def parse_event(message: EslMessage) -> EslEvent:
    """The event a ``text/event-plain`` or ``text/event-json`` message carries.

    Raises:
        RemoteProtocolError: not an event message, or a malformed event body.
    """
    if message.content_type == EVENT_PLAIN:
        head, separator, rest = message.body.partition(b"\n\n")
        pairs = parse_header_block(head)
        headers = _first_values(pairs)
        inner: str | None = None
        if separator and rest:
            length = content_length(pairs, MAX_BODY_BYTES)
            inner = rest[:length].decode("utf-8", errors="replace") if length else None
        return EslEvent(headers, inner)
    if message.content_type == EVENT_JSON:
        try:
            # Bytes that are not UTF-8 (a caller's Latin-1 header, copied as is) become U+FFFD
            # rather than losing the whole event.
            decoded: Any = json.loads(message.body.decode("utf-8", errors="replace"))
        except (ValueError, RecursionError) as exc:
            raise RemoteProtocolError(f"ESL JSON event is not JSON: {exc}") from None
        if not isinstance(decoded, dict):
            raise RemoteProtocolError("ESL JSON event is not an object")
        body = decoded.pop("_body", None)
        headers = {str(k): str(v) for k, v in decoded.items()}
        return EslEvent(headers, str(body) if body is not None else None)
    raise RemoteProtocolError(f"not an ESL event: Content-Type {message.content_type!r}")


def channel_data(message: EslMessage) -> EslEvent:
    """The channel an outbound socket's ``connect`` reply describes (no body, one block)."""
    return EslEvent(_first_values(message.headers))


# ---- the call a channel is -----------------------------------------------------------------------


def sip_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """The INVITE's X- headers from the channel variables (``variable_sip_h_X-First_Name``)."""
    return [
        (name[len(_SIP_HEADER_VARIABLE) :], value)
        for name, value in headers.items()
        if name.startswith(_SIP_HEADER_VARIABLE)
    ]


def _sip_uri(value: str | None) -> str | None:
    if not value:
        return None
    return value if value.lower().startswith(("sip:", "sips:")) else f"sip:{value}"


def invite_facts_of(event: EslEvent) -> InviteFacts:
    """The PBX-neutral facts of the inbound call a channel event (``CHANNEL_PARK``) describes.

    The request-URI comes from ``variable_sip_req_user``/``_host`` (the dialled user even when
    the dialplan rewrote ``Caller-Destination-Number``), the caller from the ``Caller-*``
    profile, the X- headers from the ``variable_sip_h_*`` variables.

    Raises:
        RemoteProtocolError: the event names no channel.
    """
    headers = event.headers
    unique_id = headers.get("Unique-ID") or headers.get("Channel-Call-UUID")
    if not unique_id:
        raise RemoteProtocolError(f"{event.name or 'ESL'} event without a Unique-ID")
    request_user = headers.get("variable_sip_req_user") or headers.get(
        "Caller-Destination-Number", ""
    )
    request_host = headers.get("variable_sip_req_host") or headers.get("variable_sip_to_host", "")
    caller_name = headers.get("Caller-Caller-ID-Name") or headers.get("variable_sip_from_display")
    return invite_facts(
        pbx="freeswitch",
        pbx_call_id=unique_id,
        channel=unique_id,
        request_user=request_user,
        request_host=request_host,
        headers=sip_headers(headers),
        to_uri=_sip_uri(headers.get("variable_sip_to_uri")),
        from_number=headers.get("Caller-Caller-ID-Number") or headers.get("variable_sip_from_user"),
        from_name=caller_name,
        from_uri=_sip_uri(headers.get("variable_sip_from_uri")),
        sip_call_id=headers.get("variable_sip_call_id"),
    )


def ended_by_caller(event: EslEvent) -> bool:
    """Whether the caller's side ended a channel (a ``CHANNEL_HANGUP_COMPLETE``).

    mod_sofia records who ended a SIP call in ``sip_hangup_disposition``: ``recv_bye``,
    ``recv_cancel``, ``recv_refuse`` when the caller did, ``send_bye``, ``send_cancel``,
    ``send_refuse`` when FreeSWITCH did (``fsctl shutdown`` ends calls with ``SYSTEM_SHUTDOWN``
    and ``send_bye``). Without it (not a SIP channel) the caller is assumed.
    """
    disposition = event.headers.get("variable_sip_hangup_disposition", "")
    return not disposition.startswith("send_")


def hangup_cause_code(event: EslEvent) -> int:
    """The Q.850 cause of a hangup event (16 normal clearing), 0 when it has none."""
    # Q.850 causes are 1 to 127.
    return ascii_decimal(event.headers.get("variable_hangup_cause_q850", ""), 3) or 0


def event_time(event: EslEvent) -> datetime | None:
    """When FreeSWITCH fired the event (``Event-Date-Timestamp``, microseconds since the
    epoch), None when it does not say."""
    # Microseconds: 16 digits until the year 2286; 20 covers anything fromtimestamp takes.
    stamp = ascii_decimal(event.headers.get("Event-Date-Timestamp", ""), 20)
    if stamp is None:
        return None
    try:
        return datetime.fromtimestamp(stamp / 1_000_000, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def parse_dump(text: str) -> EslEvent:
    """The channel ``api uuid_dump <uuid> json`` describes (a ``CHANNEL_DATA`` object).

    Raises:
        RemoteProtocolError: not a channel dump (``-ERR No such channel!`` when it is gone).
    """
    return parse_event(EslMessage((("Content-Type", EVENT_JSON),), text.encode()))


def parked_channels(text: str) -> list[str]:
    """The uuids of the channels in the ``park`` application, from ``api show channels as
    json`` (``{"row_count": N, "rows": [{"uuid": ..., "application": "park", ...}]}``).

    FreeSWITCH fills that listing from its core database a moment after a channel changes,
    so a channel parked in the last instant may be missing: it is offered by its own event.
    """
    try:
        listing: Any = json.loads(text)
    except (ValueError, RecursionError):
        return []
    rows = listing.get("rows") if isinstance(listing, dict) else None
    if not isinstance(rows, list):
        return []
    return [
        str(row["uuid"])
        for row in rows
        if isinstance(row, dict) and row.get("application") == "park" and row.get("uuid")
    ]


# ---- what we send --------------------------------------------------------------------------------


def _single_line(text: str, what: str) -> str:
    if "\n" in text or "\r" in text or "\x00" in text:
        raise LocalProtocolError(f"{what} contains a line break or NUL: {text[:60]!r}")
    return text


def command(text: str) -> bytes:
    """One ESL command (``api status``, ``event plain CHANNEL_PARK``), framed.

    Raises:
        LocalProtocolError: the command would span lines (and so inject another).
    """
    return (_single_line(text, "ESL command") + "\n\n").encode()


def sendmsg(uuid: str | None, headers: Mapping[str, str]) -> bytes:
    """A ``sendmsg`` to channel ``uuid`` (None: the outbound socket's own channel).

    Raises:
        LocalProtocolError: a header name or value would span lines.
    """
    lines = [_single_line(f"sendmsg {uuid}" if uuid else "sendmsg", "sendmsg")]
    for name, value in headers.items():
        _single_line(name, "sendmsg header name")
        if ":" in name or not name:
            raise LocalProtocolError(f"bad sendmsg header name {name!r}")
        lines.append(f"{name}: {_single_line(value, f'sendmsg header {name}')}")
    return ("\n".join(lines) + "\n\n").encode()


def execute(uuid: str | None, application: str, argument: str = "") -> bytes:
    """``sendmsg`` that runs a dialplan application (``answer``, ``playback``) on a channel."""
    headers = {"call-command": "execute", "execute-app-name": application}
    if argument:
        headers["execute-app-arg"] = argument
    return sendmsg(uuid, headers)


def unicast(
    uuid: str | None, local: tuple[str, int], remote: tuple[str, int], flags: str = ""
) -> bytes:
    """``sendmsg`` ``call-command: unicast``: FreeSWITCH streams the call's audio as L16 over UDP.

    ``local`` is FreeSWITCH's side, ``remote`` ours (as in the capture: FreeSWITCH sent from
    127.0.0.1:8025 to 127.0.0.1:9026). ``flags: native`` would send the codec's own frames.
    """
    headers = {
        "call-command": "unicast",
        "local-ip": local[0],
        "local-port": str(local[1]),
        "remote-ip": remote[0],
        "remote-port": str(remote[1]),
        "transport": "udp",
    }
    if flags:
        headers["flags"] = flags
    return sendmsg(uuid, headers)


def hangup(uuid: str | None, cause: str = "NORMAL_CLEARING") -> bytes:
    """``sendmsg`` ``call-command: hangup`` with a FreeSWITCH cause name."""
    return sendmsg(uuid, {"call-command": "hangup", "hangup-cause": cause})
