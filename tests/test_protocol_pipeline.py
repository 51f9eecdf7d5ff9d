from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.protocol.pipeline import (
    AudioIn,
    Clear,
    EndCall,
    Ignored,
    MarkIn,
    PipelineEvent,
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


# ---- totality: no message a pipeline can send raises ----------------------------------------------

# Every key and message type the dialects read, so that generated messages reach every branch.
KNOWN_KEYS = (
    "type", "event", "media", "payload", "mark", "name", "reason", "message", "content",
    "destination", "digits", "digit", "transcript", "role", "transcriptType", "messages",
)  # fmt: skip
KNOWN_KINDS = (
    "media", "clear", "mark", "end-call", "hangup", "endCall", "transfer", "send-dtmf", "dtmf",
    "transcript", "message", "conversation-update",
)  # fmt: skip
JSON_VALUES: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text()
    | st.sampled_from(KNOWN_KINDS),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(), inner, max_size=4)
    ),
    max_leaves=12,
)
PIPELINE_MESSAGES: st.SearchStrategy[str | bytes] = (
    st.dictionaries(st.sampled_from(KNOWN_KEYS), JSON_VALUES, max_size=5).map(json.dumps)
    | JSON_VALUES.map(json.dumps)
    | st.text()
    | st.binary()
)


def is_event(value: object) -> bool:
    return isinstance(value, PipelineEvent)


@given(PIPELINE_MESSAGES)
def test_the_raw_dialect_decodes_every_message(message: str | bytes) -> None:
    assert is_event(RawDialect("pcm_s16le", 16000).receive(message))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        # An unpaired surrogate decodes to a str that SQLite and the API cannot encode as UTF-8.
        ('{"type": "mark", "name": "\\ud800"}', "unpaired UTF-16 surrogate"),
        ('{"type": "transcript", "transcript": "hi \\udc00"}', "unpaired UTF-16 surrogate"),
        ('{"type": "transcript", "transcript": ["hi"]}', "transcript that is not a string"),
        ('{"type": 7}', "without a string type"),
        ('{"type": ["clear"]}', "without a string type"),
        ('{"type": {"a": 1}, "event": "clear"}', "without a string type"),
        ('{"type": "mark", "name": ' + "9" * 5000 + "}", "not JSON"),  # over int's digit limit
        ('{"type": "mark", "name": 1e999}', "without a usable name"),
    ],
    ids=lambda value: value[:28],
)
def test_each_malformed_field_is_ignored_with_its_reason(text: str, reason: str) -> None:
    event = RawDialect("pcm_s16le", 16000).receive(text)
    assert isinstance(event, Ignored) and reason in event.reason


def test_a_paired_surrogate_escape_is_one_character() -> None:
    assert RawDialect("mulaw", 8000).receive('{"type": "mark", "name": "\\ud83d\\ude00"}') == (
        MarkIn("\U0001f600")
    )


def test_an_unknown_type_is_one_reason_with_a_short_detail() -> None:
    first, second = (parse_control(json.dumps({"type": t})) for t in ("warp", "x" * 1000))
    assert isinstance(first, Ignored) and isinstance(second, Ignored)
    assert first.reason == second.reason == "unknown message type"
    assert first.detail == "'warp'" and len(second.detail) <= 64
