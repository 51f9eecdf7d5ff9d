"""The ``twilio`` pipeline dialect: Twilio Media Streams, message for message, sans I/O.

What a pipeline written for Twilio's bidirectional ``<Connect><Stream>`` expects
(twilio.com/docs/voice/media-streams/websocket-messages; ``<Connect><Stream>`` as opposed to
``<Start><Stream>`` in twilio.com/docs/voice/twiml/stream):

- to the pipeline: ``connected``, ``start`` (``streamSid``, ``accountSid``, ``callSid``,
  ``tracks``, ``customParameters``, ``mediaFormat`` audio/x-mulaw 8000 mono), then ``media``
  (base64 μ-law, 20 ms, with ``chunk``, ``timestamp`` and ``sequenceNumber``), ``dtmf``, ``mark``
  (a mark the pipeline sent has been played) and ``stop``;
- from the pipeline: ``media`` (base64 μ-law, any length), ``mark``, ``clear``, plus sipbridge's
  own control messages (``end-call``, ``transfer``, ``send-dtmf``, transcripts) keyed by ``event``
  or ``type``.

``customParameters`` carry the X- headers (by header name), the call's variables flattened to
strings (``first_name``, ``customer.number``), ``from_number``/``to_number`` (which Pipecat's
runner promotes), the rendered ``firstMessage`` and the whole rendered assistant as JSON.
The ``timestamp`` of media is the stream's audio time (20 ms per chunk), so the translator needs
no clock.
"""

from __future__ import annotations

import binascii
import json
import uuid
from collections.abc import Mapping
from typing import Any

from bridge.protocol.pipeline import (
    FRAME_MS,
    MULAW_RATE,
    AudioIn,
    DialectName,
    Encoding,
    Ignored,
    PipelineEvent,
    SessionInfo,
    control_event,
    json_object,
)


def twilio_sid(prefix: str, value: str) -> str:
    """A Twilio-shaped id (``CA`` + 32 hex digits) derived from one of sipbridge's UUIDs."""
    try:
        hex_part = uuid.UUID(value).hex
    except ValueError:
        hex_part = uuid.uuid5(uuid.NAMESPACE_URL, value).hex
    return prefix + hex_part


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested variables as Twilio's string-only parameters: ``{"customer": {"number": x}}``
    becomes ``{"customer.number": "x"}``."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif value is None:
            continue
        elif isinstance(value, str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, ensure_ascii=False)
    return flat


def custom_parameters(info: SessionInfo) -> dict[str, str]:
    """What ``start.customParameters`` carries for a call."""
    parameters = flatten(info.variables)
    parameters.update(info.headers)
    parameters["callId"] = info.call_id
    parameters["callType"] = info.call_type
    parameters["to_number"] = info.called_uri
    number = info.customer.get("number")
    if number:
        parameters["from_number"] = str(number)
    first_message = info.assistant.get("firstMessage")
    if isinstance(first_message, str):
        parameters["firstMessage"] = first_message
    parameters["assistant"] = json.dumps(info.assistant, ensure_ascii=False)
    return parameters


class TwilioDialect:
    """Twilio Media Streams JSON, 8 kHz μ-law."""

    name: DialectName = "twilio"
    # Media Streams carry audio/x-mulaw at 8000 Hz and nothing else; protocol/dialects.py reads
    # the dialect's one encoding and rate from these two.
    encoding: Encoding = "mulaw"
    sample_rate: int = MULAW_RATE

    def __init__(self, info: SessionInfo, org_id: str) -> None:
        self.stream_sid = twilio_sid("MZ", info.stream_id)
        self.call_sid = twilio_sid("CA", info.call_id)
        self.account_sid = twilio_sid("AC", org_id)
        self._sequence = 0
        self._chunk = 0
        # The per-frame message is formatted, not json.dumps'd: it runs 50 times a second.
        self._media_head = (
            '{"event":"media","sequenceNumber":"%d","streamSid":"' + self.stream_sid + '",'
            '"media":{"track":"inbound","chunk":"%d","timestamp":"%d","payload":"'
        )

    def _next(self) -> int:
        self._sequence += 1
        return self._sequence

    def opening(self, info: SessionInfo) -> list[str]:
        """``connected``, then ``start``."""
        connected = {"event": "connected", "protocol": "Call", "version": "1.0.0"}
        start = {
            "event": "start",
            "sequenceNumber": str(self._next()),
            "start": {
                "streamSid": self.stream_sid,
                "accountSid": self.account_sid,
                "callSid": self.call_sid,
                "tracks": ["inbound"],
                "customParameters": custom_parameters(info),
                "mediaFormat": {
                    "encoding": "audio/x-mulaw",
                    "sampleRate": self.sample_rate,
                    "channels": 1,
                },
            },
            "streamSid": self.stream_sid,
        }
        return [json.dumps(connected), json.dumps(start, ensure_ascii=False)]

    def audio(self, data: bytes) -> str:
        """One 20 ms μ-law frame of the caller as a ``media`` message."""
        self._chunk += 1
        payload = binascii.b2a_base64(data, newline=False).decode("ascii")
        head = self._media_head % (self._next(), self._chunk, (self._chunk - 1) * FRAME_MS)
        return head + payload + '"}}'

    def dtmf(self, digit: str) -> str:
        """A key the caller pressed."""
        return json.dumps(
            {
                "event": "dtmf",
                "streamSid": self.stream_sid,
                "sequenceNumber": str(self._next()),
                "dtmf": {"track": "inbound_track", "digit": digit},
            }
        )

    def mark(self, name: str) -> str:
        """A mark the pipeline sent has been played (or cleared)."""
        return json.dumps(
            {
                "event": "mark",
                "streamSid": self.stream_sid,
                "sequenceNumber": str(self._next()),
                "mark": {"name": name},
            }
        )

    def stop(self, reason: str) -> str:
        """The stream is over (``reason`` is sipbridge's addition: the call's endedReason)."""
        return json.dumps(
            {
                "event": "stop",
                "sequenceNumber": str(self._next()),
                "streamSid": self.stream_sid,
                "stop": {
                    "accountSid": self.account_sid,
                    "callSid": self.call_sid,
                    "reason": reason,
                },
            }
        )

    def receive(self, message: str | bytes) -> PipelineEvent:
        """One message from the pipeline."""
        if isinstance(message, bytes):
            return Ignored("binary frame in the twilio dialect (audio comes as media messages)")
        data = json_object(message)
        if isinstance(data, Ignored):
            return data
        if data.get("event") != "media":
            return control_event(data)
        media = data.get("media")
        payload = media.get("payload") if isinstance(media, dict) else None
        if not isinstance(payload, str):
            return Ignored("media without a payload")
        try:
            # Strict: the lenient default silently skips junk and would play a corrupted frame.
            return AudioIn(binascii.a2b_base64(payload, strict_mode=True))
        except ValueError:
            # binascii.Error (a ValueError) for bad base64; a plain ValueError for a payload
            # with characters beyond ASCII, which a2b_base64 refuses before decoding.
            return Ignored("media payload is not base64")
