from __future__ import annotations

import json

import pytest

from bridge.protocol.pipeline import (
    AudioIn,
    Clear,
    EndCall,
    Ignored,
    MarkIn,
    RawDialect,
    Report,
    SendDtmf,
    SessionInfo,
    TransferCall,
    parse_control,
)

INFO = SessionInfo(
    call_id="c1",
    stream_id="s1",
    pbx_call_id="1700000000.1",
    customer={"number": "+15551230000", "name": "John Doe"},
    called_uri="sip:demo@sip.example.com",
    headers={"X-First_Name": "John"},
    variables={"first_name": "John", "customer": {"number": "+15551230000"}},
    assistant={"name": "Demo", "firstMessage": "Hello John"},
    phone_number={"id": "pn1", "sipUri": "sip:demo@sip.example.com", "name": None},
)


def test_raw_start_message() -> None:
    start = json.loads(RawDialect("pcm_s16le", 16000).start(INFO))
    assert start["type"] == "start"
    assert start["callId"] == "c1" and start["pbxCallId"] == "1700000000.1"
    assert start["assistant"]["firstMessage"] == "Hello John"
    assert start["variables"]["first_name"] == "John"
    assert start["headers"] == {"X-First_Name": "John"}
    assert start["audioFormat"] == {
        "encoding": "pcm_s16le",
        "sampleRate": 16000,
        "channels": 1,
        "frameMs": 20,
    }
    mulaw = json.loads(RawDialect("mulaw", 16000).start(INFO))
    assert mulaw["audioFormat"]["sampleRate"] == 8000


def test_raw_messages_to_the_pipeline() -> None:
    dialect = RawDialect("pcm_s16le", 16000)
    assert dialect.audio(b"\x01\x02") == b"\x01\x02"
    assert json.loads(dialect.dtmf("5")) == {"type": "dtmf", "digit": "5"}
    assert json.loads(dialect.mark("m1")) == {"type": "mark", "name": "m1"}
    assert json.loads(dialect.stop("customer-ended-call")) == {
        "type": "stop",
        "reason": "customer-ended-call",
    }


@pytest.mark.parametrize(
    ("message", "event"),
    [
        (b"\x00\x01", AudioIn(b"\x00\x01")),
        ('{"type": "clear"}', Clear()),
        ('{"event": "clear", "streamSid": "x"}', Clear()),
        ('{"type": "mark", "name": "m1"}', MarkIn("m1")),
        ('{"event": "mark", "mark": {"name": "m2"}}', MarkIn("m2")),
        (
            '{"type": "end-call", "reason": "assistant-said-end-call-phrase", "message": "Bye"}',
            EndCall("assistant-said-end-call-phrase", "Bye"),
        ),
        ('{"type": "hangup"}', EndCall(None, None)),
        (
            '{"type": "transfer", "destination": {"type": "sip", "sipUri": "sip:a@b"}}',
            TransferCall({"type": "sip", "sipUri": "sip:a@b"}),
        ),
        ('{"type": "send-dtmf", "digits": "12#w"}', SendDtmf("12#W")),
        (
            '{"type": "transcript", "role": "user", "transcript": "hi"}',
            Report("transcript", {"type": "transcript", "role": "user", "transcript": "hi"}),
        ),
    ],
)
def test_messages_from_the_pipeline(message: str | bytes, event: object) -> None:
    assert RawDialect("pcm_s16le", 16000).receive(message) == event


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1]",
        '{"type": "mark"}',
        '{"type": "mark", "name": ""}',
        '{"type": "transfer", "destination": "sip:a@b"}',
        '{"type": "send-dtmf", "digits": "12x"}',
        '{"type": "launch-rockets"}',
        "{}",
        "[" * 60000,  # under the 64 KiB message limit, deeper than json's recursion limit
    ],
    ids=lambda text: text[:24],
)
def test_malformed_control_is_ignored_not_raised(text: str) -> None:
    assert isinstance(parse_control(text), Ignored)
