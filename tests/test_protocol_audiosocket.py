from __future__ import annotations

import uuid

import pytest

from bridge.errors import LocalProtocolError, RemoteProtocolError
from bridge.protocol.audiosocket import (
    Audio,
    CallId,
    Dtmf,
    Error,
    FrameDecoder,
    Hangup,
    encode_audio,
    encode_call_id,
    encode_dtmf,
    encode_hangup,
)

CALL = uuid.UUID("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
# A stream as Asterisk sends it: UUID, two audio frames, a DTMF digit, then an error.
STREAM = (
    bytes.fromhex("010010") + CALL.bytes
    + bytes.fromhex("100140") + b"\x01\x00" * 160
    + bytes.fromhex("100140") + b"\xff\x7f" * 160
    + bytes.fromhex("03000135")
    + bytes.fromhex("ff000104")
)  # fmt: skip
EXPECTED = [
    CallId(CALL),
    Audio(b"\x01\x00" * 160, 8000),
    Audio(b"\xff\x7f" * 160, 8000),
    Dtmf("5"),
    Error(4),
]


def decode(chunks: list[bytes]) -> list[object]:
    decoder = FrameDecoder()
    events: list[object] = []
    for chunk in chunks:
        decoder.receive_data(chunk)
        events += decoder.events_received()
    return events


def test_whole_stream() -> None:
    assert decode([STREAM]) == EXPECTED


def test_byte_by_byte() -> None:
    assert decode([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


def test_trailing_partial_frame_is_held_back() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(STREAM + bytes.fromhex("1001"))
    assert decoder.events_received() == EXPECTED
    assert decoder.pending_bytes == 2
    decoder.receive_data(b"\x40" + b"\x00" * 320)
    assert decoder.events_received() == [Audio(bytes(320), 8000)]


def test_header_is_big_endian_and_audio_little_endian() -> None:
    frame = encode_audio(b"\x34\x12", 8000)  # the sample 0x1234, little-endian
    assert frame == b"\x10\x00\x02\x34\x12"
    assert encode_audio(bytes(640), 16000)[:3] == b"\x12\x02\x80"


def test_encoders_round_trip() -> None:
    stream = encode_call_id(CALL) + encode_dtmf("#") + encode_audio(bytes(320)) + encode_hangup()
    assert decode([stream]) == [CallId(CALL), Dtmf("#"), Audio(bytes(320), 8000), Hangup()]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (bytes.fromhex("02000100"), "unknown AudioSocket kind 0x02"),
        (bytes.fromhex("101001") + bytes(0x1001), "exceeds 4096"),
        (bytes.fromhex("010004") + b"abcd", "UUID of 4 bytes"),
        (bytes.fromhex("03000178"), "is not one digit"),
        (bytes.fromhex("100003") + b"abc", "odd length"),
    ],
)
def test_garbage_is_a_protocol_error(data: bytes, problem: str) -> None:
    with pytest.raises(RemoteProtocolError, match=problem):
        FrameDecoder().receive_data(data)


def test_higher_rates_and_error_without_code() -> None:
    assert decode([bytes.fromhex("130004") + bytes(4), bytes.fromhex("ff0000")]) == [
        Audio(bytes(4), 24000),
        Error(None),
    ]


def test_local_mistakes_are_refused() -> None:
    with pytest.raises(LocalProtocolError):
        encode_audio(bytes(3))
    with pytest.raises(LocalProtocolError):
        encode_audio(bytes(320), 11025)
    with pytest.raises(LocalProtocolError):
        encode_dtmf("x")
