"""The conversational pipeline's websocket protocol, sans I/O: one translator per dialect.

sipbridge is the websocket client. A dialect turns session facts and audio into messages for
the pipeline, and the pipeline's messages into :data:`PipelineEvent` values. Translators have no
side effects, and ``receive`` is total: any text or binary message yields an event, malformed or
unknown ones :class:`Ignored` (to be logged), never an exception, so a pipeline cannot end a call
except by asking to (``end-call``).

``raw`` (this module), like Vapi's websocket transport: binary frames carry audio (PCM s16le at
8, 16 or 24 kHz, or μ-law 8 kHz) both ways; text frames carry JSON control. ``twilio``
(protocol/twilio.py): Twilio Media Streams. See docs/pipeline.md.

The words both dialects are spelled with (dialect names, encodings, sample rates, the frame
length, the defaults) are defined here, where both dialects can import them. The rest of sipbridge
reads them from protocol/dialects.py, the registry that tabulates the dialects: it imports both
dialects, so they cannot import it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

# ---- the dialects' vocabulary (tabulated in protocol/dialects.py) ----------------------------

DialectName = Literal["raw", "twilio"]
Encoding = Literal["pcm_s16le", "mulaw"]
# The rates a pipeline may ask for; μ-law runs at MULAW_RATE whatever it asks.
SampleRate = Literal[8000, 16000, 24000]

FRAME_MS = 20  # one frame of audio on both legs: what the session paces, what dialects announce
MULAW_RATE = 8000  # G.711 μ-law is defined at 8 kHz (ITU-T G.711); sipbridge runs it at no other

# What a pipeline gets when neither its assistant nor the settings say otherwise.
DEFAULT_DIALECT: DialectName = "raw"
DEFAULT_ENCODING: Encoding = "pcm_s16le"
DEFAULT_SAMPLE_RATE: SampleRate = 16000


def effective_rate(encoding: Encoding, sample_rate: int) -> int:
    """The rate audio in ``encoding`` runs at: μ-law always at 8 kHz, PCM at the rate asked."""
    return MULAW_RATE if encoding == "mulaw" else sample_rate


# ---- what sipbridge tells the pipeline about a call ----------------------------------------------


@dataclass(frozen=True)
class SessionInfo:
    """Everything the first (start) message carries."""

    call_id: str
    stream_id: str
    pbx_call_id: str
    customer: dict[str, Any]
    called_uri: str
    headers: dict[str, str]
    variables: dict[str, Any]
    assistant: dict[str, Any]
    phone_number: dict[str, Any] | None
    encoding: Encoding = DEFAULT_ENCODING
    sample_rate: int = DEFAULT_SAMPLE_RATE
    call_type: str = "inboundPhoneCall"  # Vapi's call.type: outboundPhoneCall for POST /call


# ---- what the pipeline can ask for -------------------------------------------------------------


@dataclass(frozen=True)
class AudioIn:
    """Audio for the caller, in the dialect's encoding."""

    data: bytes


@dataclass(frozen=True)
class Clear:
    """Barge-in: drop whatever audio is still queued for the caller."""


@dataclass(frozen=True)
class MarkIn:
    """Echo this mark once the audio sent before it has been played."""

    name: str


@dataclass(frozen=True)
class EndCall:
    """Hang up (``end-call``/``hangup``), optionally after ``message`` is spoken."""

    reason: str | None = None
    message: str | None = None


@dataclass(frozen=True)
class TransferCall:
    """Transfer the call to a Vapi transfer destination."""

    destination: dict[str, Any]


@dataclass(frozen=True)
class SendDtmf:
    """Play these DTMF digits to the caller."""

    digits: str


@dataclass(frozen=True)
class Report:
    """A transcript or conversation message for the end-of-call report."""

    kind: Literal["transcript", "message"]
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Ignored:
    """A message that was malformed or unknown.

    Attributes:
        reason: what was wrong, a fixed phrase per kind of fault: the session logs each reason
            once per call, so a pipeline repeating a fault 50 times a second logs it once.
        detail: the message's own part of the fault (an unknown type's name), already cut short.
    """

    reason: str
    detail: str = ""


PipelineEvent = AudioIn | Clear | MarkIn | EndCall | TransferCall | SendDtmf | Report | Ignored

_DTMF = set("0123456789*#ABCDabcdwW")
MAX_MARK_NAME = 256
MAX_DETAIL_CHARS = 64
# A JSON escape of a UTF-16 surrogate (\ud800-\udfff). Paired ones decode to one character; an
# unpaired one decodes to a lone surrogate, which no UTF-8 encoder (SQLite's, the API's) accepts.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def detail(value: object) -> str:
    """A value from a message, short enough for a log line."""
    text = repr(value)
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 1] + "…"


def json_object(text: str | bytes) -> dict[str, Any] | Ignored:
    """A text frame's JSON object, or why it is not one."""
    try:
        message = json.loads(text)
    except ValueError:
        # Also a number of more than sys.get_int_max_str_digits() digits, and bytes not UTF-8.
        return Ignored("text frame is not JSON")
    except RecursionError:
        # '[[[[…' nested deeper than the parser's stack, small enough to pass max_size.
        return Ignored("JSON nested too deeply")
    if not isinstance(message, dict):
        return Ignored("JSON message is not an object")
    if isinstance(text, bytes) or _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(message, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return Ignored("JSON string with an unpaired UTF-16 surrogate")
    return message


def parse_control(text: str) -> PipelineEvent:
    """A text frame of JSON control (the part both dialects share)."""
    message = json_object(text)
    return message if isinstance(message, Ignored) else control_event(message)


def control_event(message: dict[str, Any]) -> PipelineEvent:
    """A decoded control message (``type``, or Twilio's ``event`` key)."""
    kind = message.get("type", message.get("event"))
    if not isinstance(kind, str):
        return Ignored("message without a string type or event", detail(kind))
    if kind == "clear":
        return Clear()
    if kind == "mark":
        mark = message.get("mark")
        name = mark.get("name") if isinstance(mark, dict) else message.get("name")
        if not isinstance(name, str) or not name or len(name) > MAX_MARK_NAME:
            return Ignored("mark without a usable name")
        return MarkIn(name)
    if kind in ("end-call", "hangup", "endCall"):
        reason, spoken = message.get("reason"), message.get("message", message.get("content"))
        return EndCall(
            reason if isinstance(reason, str) else None, spoken if isinstance(spoken, str) else None
        )
    if kind == "transfer":
        destination = message.get("destination")
        if not isinstance(destination, dict):
            return Ignored("transfer without a destination object")
        return TransferCall(destination)
    if kind in ("send-dtmf", "dtmf"):
        digits = message.get("digits", message.get("digit"))
        if (
            not isinstance(digits, str)
            or not digits
            or not set(digits) <= _DTMF
            or len(digits) > 64
        ):
            return Ignored("send-dtmf without valid digits")
        return SendDtmf(digits.upper())
    if kind == "transcript" and not isinstance(message.get("transcript", ""), str):
        return Ignored("transcript that is not a string")
    if kind in ("transcript", "message", "conversation-update"):
        report_kind: Literal["transcript", "message"] = (
            "transcript" if kind == "transcript" else "message"
        )
        return Report(report_kind, message)
    return Ignored("unknown message type", detail(kind))


class Dialect(Protocol):
    """A pipeline wire dialect: pure translation between session facts and messages."""

    name: DialectName
    encoding: Encoding
    sample_rate: int

    def opening(self, info: SessionInfo) -> list[str]:
        """The messages that open the stream."""

    def audio(self, data: bytes) -> str | bytes:
        """Caller audio (already in the dialect's encoding) as one message."""

    def dtmf(self, digit: str) -> str:
        """A key the caller pressed."""

    def mark(self, name: str) -> str:
        """A mark has been played."""

    def stop(self, reason: str) -> str:
        """The call is over."""

    def receive(self, message: str | bytes) -> PipelineEvent:
        """One message from the pipeline."""


class RawDialect:
    """Binary audio both ways, JSON control in text frames (Vapi websocket transport style)."""

    name: DialectName = "raw"

    def __init__(self, encoding: Encoding, sample_rate: int) -> None:
        self.encoding = encoding
        self.sample_rate = effective_rate(encoding, sample_rate)

    def opening(self, info: SessionInfo) -> list[str]:
        """The start message: call ids, caller, called URI, X- headers, variables, assistant."""
        return [self.start(info)]

    def start(self, info: SessionInfo) -> str:
        """The start message."""
        return json.dumps(
            {
                "type": "start",
                "callId": info.call_id,
                "callType": info.call_type,
                "streamId": info.stream_id,
                "pbxCallId": info.pbx_call_id,
                "customer": info.customer,
                "calledUri": info.called_uri,
                "headers": info.headers,
                "variables": info.variables,
                "assistant": info.assistant,
                "phoneNumber": info.phone_number,
                "audioFormat": {
                    "encoding": self.encoding,
                    "sampleRate": self.sample_rate,
                    "channels": 1,
                    "frameMs": FRAME_MS,
                },
            },
            ensure_ascii=False,
        )

    def audio(self, data: bytes) -> bytes:
        """An audio message: the bytes themselves, as a binary frame."""
        return data

    def dtmf(self, digit: str) -> str:
        """A caller's key press."""
        return json.dumps({"type": "dtmf", "digit": digit})

    def mark(self, name: str) -> str:
        """A mark the pipeline sent has been played (or cleared)."""
        return json.dumps({"type": "mark", "name": name})

    def stop(self, reason: str) -> str:
        """The call is over."""
        return json.dumps({"type": "stop", "reason": reason})

    def receive(self, message: str | bytes) -> PipelineEvent:
        """One message from the pipeline."""
        if isinstance(message, bytes):
            return AudioIn(message)
        return parse_control(message)
