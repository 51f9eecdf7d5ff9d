"""The twilio dialect, message by message, and against Pipecat's own TwilioFrameSerializer."""

from __future__ import annotations

import base64
import json
import warnings
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given

from bridge.audio import pcm_to_ulaw, sine, tone_share, ulaw_to_pcm
from bridge.protocol.pipeline import AudioIn, Clear, EndCall, Ignored, MarkIn, SessionInfo
from bridge.protocol.twilio import TwilioDialect, custom_parameters, flatten, twilio_sid
from tests.test_protocol_pipeline import PIPELINE_MESSAGES, is_event

INFO = SessionInfo(
    call_id="3f2c7d0e-9a51-4c1b-8e3a-1d2f3a4b5c6d",
    stream_id="9b8a7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d",
    pbx_call_id="1700000000.1",
    customer={"number": "+15551230000", "name": "John Doe"},
    called_uri="sip:demo@sip.example.com",
    headers={"X-First_Name": "John", "X-Account-Id": "42"},
    variables={
        "first_name": "John",
        "account_id": "42",
        "customer": {"number": "+15551230000"},
        "count": 3,
    },
    assistant={"name": "Demo", "firstMessage": "Hello John"},
    phone_number=None,
    encoding="mulaw",
    sample_rate=8000,
)
ORG = "11111111-2222-4333-8444-555555555555"


def test_sids_look_like_twilios() -> None:
    assert twilio_sid("CA", INFO.call_id) == "CA3f2c7d0e9a514c1b8e3a1d2f3a4b5c6d"
    assert twilio_sid("AC", "not-a-uuid").startswith("AC") and len(twilio_sid("AC", "x")) == 34


def test_custom_parameters_are_flat_strings() -> None:
    assert flatten({"a": {"b": {"c": 1}}, "d": None, "e": "x"}) == {"a.b.c": "1", "e": "x"}
    parameters = custom_parameters(INFO)
    assert all(isinstance(v, str) for v in parameters.values())
    assert parameters["first_name"] == "John" and parameters["X-First_Name"] == "John"
    assert parameters["customer.number"] == "+15551230000" and parameters["count"] == "3"
    assert (
        parameters["from_number"] == "+15551230000"
        and parameters["to_number"] == "sip:demo@sip.example.com"
    )
    assert parameters["firstMessage"] == "Hello John"
    assert json.loads(parameters["assistant"]) == INFO.assistant


def test_the_message_sequence() -> None:
    dialect = TwilioDialect(INFO, ORG)
    connected, start = (json.loads(m) for m in dialect.opening(INFO))
    assert connected == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    assert start["event"] == "start" and start["sequenceNumber"] == "1"
    assert start["streamSid"] == start["start"]["streamSid"] == dialect.stream_sid
    assert (
        start["start"]["callSid"] == dialect.call_sid
        and start["start"]["accountSid"] == dialect.account_sid
    )
    assert start["start"]["tracks"] == ["inbound"]
    assert start["start"]["mediaFormat"] == {
        "encoding": "audio/x-mulaw",
        "sampleRate": 8000,
        "channels": 1,
    }
    first, second = (json.loads(dialect.audio(bytes([n]) * 160)) for n in (1, 2))
    assert first == {
        "event": "media",
        "sequenceNumber": "2",
        "streamSid": dialect.stream_sid,
        "media": {
            "track": "inbound",
            "chunk": "1",
            "timestamp": "0",
            "payload": base64.b64encode(b"\x01" * 160).decode(),
        },
    }
    assert (second["sequenceNumber"], second["media"]["chunk"], second["media"]["timestamp"]) == (
        "3",
        "2",
        "20",
    )
    dtmf = json.loads(dialect.dtmf("5"))
    assert dtmf == {
        "event": "dtmf",
        "streamSid": dialect.stream_sid,
        "sequenceNumber": "4",
        "dtmf": {"track": "inbound_track", "digit": "5"},
    }
    mark = json.loads(dialect.mark("m1"))
    assert mark["mark"] == {"name": "m1"} and mark["sequenceNumber"] == "5"
    stop = json.loads(dialect.stop("customer-ended-call"))
    assert stop["event"] == "stop" and stop["stop"]["callSid"] == dialect.call_sid


def test_messages_from_a_twilio_pipeline() -> None:
    dialect = TwilioDialect(INFO, ORG)
    payload = base64.b64encode(b"\xff" * 758).decode()
    assert dialect.receive(
        json.dumps({"event": "media", "streamSid": "x", "media": {"payload": payload}})
    ) == AudioIn(b"\xff" * 758)
    assert dialect.receive('{"event": "clear", "streamSid": "x"}') == Clear()
    assert dialect.receive(
        '{"event": "mark", "streamSid": "x", "mark": {"name": "end"}}'
    ) == MarkIn("end")
    assert dialect.receive('{"type": "end-call"}') == EndCall()
    for bad in (
        '{"event": "media", "media": {}}',
        '{"event": "media", "media": {"payload": "!!"}}',
        "nope",
        b"\x00\x01",
        "[]",
    ):
        assert isinstance(dialect.receive(bad), Ignored)


@pytest.mark.parametrize(
    ("media", "reason"),
    [
        # a2b_base64 raises a plain ValueError (not binascii.Error) beyond ASCII.
        ({"payload": "é"}, "not base64"),
        ({"payload": "/w==\u00a0"}, "not base64"),
        ({"payload": "//8=\u2028"}, "not base64"),
        ({"payload": "!!"}, "not base64"),
        ({"payload": "/w"}, "not base64"),  # missing padding
        ({"payload": 255}, "without a payload"),
        ({"payload": ["//8="]}, "without a payload"),
        ({"payload": None}, "without a payload"),
        ({"payload": 10**300}, "without a payload"),
        ({}, "without a payload"),
        ("//8=", "without a payload"),
        (None, "without a payload"),
    ],
    ids=repr,
)
def test_every_malformed_media_message_is_ignored(media: Any, reason: str) -> None:
    message = json.dumps({"event": "media", "streamSid": "x", "media": media})
    event = TwilioDialect(INFO, ORG).receive(message)
    assert isinstance(event, Ignored) and reason in event.reason


@given(PIPELINE_MESSAGES)
def test_the_twilio_dialect_decodes_every_message(message: str | bytes) -> None:
    assert is_event(TwilioDialect(INFO, ORG).receive(message))


# ---- Pipecat ------------------------------------------------------------------------------------


def pipecat() -> Any:
    """Pipecat's modules (its audio utilities import the deprecated stdlib audioop on 3.11)."""
    pytest.importorskip("pipecat", reason="the interop extra (pipecat-ai) is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from pipecat.frames import frames
        from pipecat.processors.frame_processor import FrameProcessorSetup
        from pipecat.runner import utils as runner
        from pipecat.serializers.twilio import TwilioFrameSerializer
    return frames, FrameProcessorSetup, runner, TwilioFrameSerializer


class TextSocket:
    """What Pipecat's runner reads the first messages from (a FastAPI WebSocket's iter_text)."""

    def __init__(self, messages: list[str]) -> None:
        self._messages = messages

    async def iter_text(self) -> AsyncIterator[str]:
        for message in self._messages:
            yield message


@pytest.mark.interop
async def test_pipecat_understands_every_message_sipbridge_sends() -> None:
    frames, FrameProcessorSetup, runner, TwilioFrameSerializer = pipecat()
    dialect = TwilioDialect(INFO, ORG)
    transport, call = await runner.parse_telephony_websocket(TextSocket(dialect.opening(INFO)))
    assert transport == "twilio"
    assert call["stream_id"] == dialect.stream_sid and call["call_id"] == dialect.call_sid
    assert call["body"]["first_name"] == "John" and call["from"] == "+15551230000"

    serializer = TwilioFrameSerializer(
        call["stream_id"], params=TwilioFrameSerializer.InputParams(auto_hang_up=False)
    )
    await serializer.setup(
        FrameProcessorSetup(
            audio_in_sample_rate=16000,
            audio_out_sample_rate=16000,
            clock=None,
            task_manager=None,
            pipeline_worker=None,
        )
    )
    tone = pcm_to_ulaw(sine(700, 1.0))
    heard = bytearray()
    for offset in range(0, len(tone), 160):
        frame = await serializer.deserialize(dialect.audio(tone[offset : offset + 160]))
        if frame is None:  # its streaming resampler (soxr) hands out audio in blocks
            continue
        assert isinstance(frame, frames.InputAudioRawFrame) and frame.sample_rate == 16000
        heard += frame.audio
    assert len(heard) > 28000  # all but soxr's tail
    assert (
        tone_share(bytes(heard[8000:24000]), 16000, 700) > 0.95
    )  # Pipecat hears the caller's tone
    digit = await serializer.deserialize(dialect.dtmf("5"))
    assert isinstance(digit, frames.InputDTMFFrame) and digit.button.value == "5"
    for other in (dialect.mark("m1"), dialect.stop("customer-ended-call")):
        assert (
            await serializer.deserialize(other) is None
        )  # understood and nothing to do, as with Twilio


@pytest.mark.interop
async def test_sipbridge_understands_every_message_pipecat_sends() -> None:
    frames, FrameProcessorSetup, _, TwilioFrameSerializer = pipecat()
    dialect = TwilioDialect(INFO, ORG)
    serializer = TwilioFrameSerializer(
        dialect.stream_sid, params=TwilioFrameSerializer.InputParams(auto_hang_up=False)
    )
    await serializer.setup(
        FrameProcessorSetup(
            audio_in_sample_rate=16000,
            audio_out_sample_rate=24000,
            clock=None,
            task_manager=None,
            pipeline_worker=None,
        )
    )
    reply = sine(1200, 1.0, 24000)  # a TTS engine's 24 kHz
    received = bytearray()
    chunk = 24000 * 2 * 95 // 1000 // 2 * 2  # Pipecat sends ~95 ms chunks
    for offset in range(0, len(reply), chunk):
        message = await serializer.serialize(
            frames.OutputAudioRawFrame(
                audio=reply[offset : offset + chunk], sample_rate=24000, num_channels=1
            )
        )
        if message is None:  # soxr hands out audio in blocks
            continue
        event = dialect.receive(message)
        assert isinstance(event, AudioIn)
        received += event.data
    assert len(received) > 7000
    pcm = ulaw_to_pcm(bytes(received))
    assert tone_share(pcm[4000:12000], 8000, 1200) > 0.95  # μ-law 8 kHz, the tone intact
    assert dialect.receive(await serializer.serialize(frames.InterruptionFrame())) == Clear()
    mark = await serializer.serialize(
        frames.OutputTransportMessageFrame(
            message={"event": "mark", "streamSid": dialect.stream_sid, "mark": {"name": "turn-1"}}
        )
    )
    assert dialect.receive(mark) == MarkIn("turn-1")
