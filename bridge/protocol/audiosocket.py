"""Asterisk AudioSocket framing, sans I/O: bytes in, frames out.

Each message is one kind byte, a 2-byte big-endian payload length, then the payload
(docs.asterisk.org Configuration/Channel-Drivers/AudioSocket; res_audiosocket.h). Audio payloads
are signed 16-bit little-endian PCM, so header and payload use different byte orders.

Kinds: 0x00 hangup, 0x01 the 16-byte call UUID (always first, from Asterisk), 0x03 one DTMF
digit (ASCII), 0x10 slin 8 kHz, 0x11-0x18 slin at higher rates, 0xff error (one byte code).
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from enum import IntEnum

from bridge.errors import LocalProtocolError, RemoteProtocolError

HEADER_BYTES = 3
_HEADER = struct.Struct(">BH")
MAX_PAYLOAD_BYTES = 0xFFFF


class Kind(IntEnum):
    """AudioSocket message kinds."""

    HANGUP = 0x00
    UUID = 0x01
    DTMF = 0x03
    SLIN_8K = 0x10
    SLIN_12K = 0x11
    SLIN_16K = 0x12
    SLIN_24K = 0x13
    SLIN_32K = 0x14
    SLIN_44K = 0x15
    SLIN_48K = 0x16
    SLIN_96K = 0x17
    SLIN_192K = 0x18
    ERROR = 0xFF


# Sample rate of each audio kind, from the AudioSocket documentation's table.
AUDIO_RATES: dict[Kind, int] = {
    Kind.SLIN_8K: 8000,
    Kind.SLIN_12K: 12000,
    Kind.SLIN_16K: 16000,
    Kind.SLIN_24K: 24000,
    Kind.SLIN_32K: 32000,
    Kind.SLIN_44K: 44100,
    Kind.SLIN_48K: 48000,
    Kind.SLIN_96K: 96000,
    Kind.SLIN_192K: 192000,
}
_KIND_FOR_RATE = {rate: kind for kind, rate in AUDIO_RATES.items()}


@dataclass(frozen=True)
class Hangup:
    """The peer wants the call ended."""


@dataclass(frozen=True)
class CallId:
    """The call's UUID: the first message on every connection."""

    value: uuid.UUID


@dataclass(frozen=True)
class Dtmf:
    """A DTMF digit from the caller."""

    digit: str


@dataclass(frozen=True)
class Audio:
    """Signed 16-bit little-endian mono PCM at ``rate`` Hz."""

    pcm: bytes
    rate: int


@dataclass(frozen=True)
class Error:
    """Asterisk reports an error (the code is application specific)."""

    code: int | None


Frame = Hangup | CallId | Dtmf | Audio | Error


class FrameDecoder:
    """Incremental decoder: feed any chunking of the stream, collect whole frames.

    Args:
        max_payload: payloads larger than this are a protocol violation (a peer sending garbage
            must not make us buffer up to 64 KiB per message).
    """

    def __init__(self, max_payload: int = 4096) -> None:
        self._buffer = bytearray()
        self._events: list[Frame] = []
        self._max_payload = max_payload

    def receive_data(self, data: bytes) -> None:
        """Adds bytes from the socket.

        Raises:
            RemoteProtocolError: an unknown kind, a payload over the limit, or a malformed frame.
                The stream cannot be resynchronised after that: close the connection.
        """
        self._buffer += data
        buffer = self._buffer
        offset = 0
        while len(buffer) - offset >= HEADER_BYTES:
            kind_byte, length = _HEADER.unpack_from(buffer, offset)
            try:
                kind = Kind(kind_byte)
            except ValueError:
                raise RemoteProtocolError(f"unknown AudioSocket kind 0x{kind_byte:02x}") from None
            if length > self._max_payload:
                raise RemoteProtocolError(
                    f"AudioSocket payload of {length} bytes exceeds {self._max_payload}"
                )
            end = offset + HEADER_BYTES + length
            if len(buffer) < end:
                break
            payload = bytes(buffer[offset + HEADER_BYTES : end])
            self._events.append(_frame(kind, payload))
            offset = end
        if offset:
            del buffer[:offset]

    def events_received(self) -> list[Frame]:
        """The frames decoded since the last call."""
        events, self._events = self._events, []
        return events

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buffer)


def _frame(kind: Kind, payload: bytes) -> Frame:
    if kind is Kind.HANGUP:
        return Hangup()
    if kind is Kind.UUID:
        if len(payload) != 16:
            raise RemoteProtocolError(f"AudioSocket UUID of {len(payload)} bytes, not 16")
        return CallId(uuid.UUID(bytes=payload))
    if kind is Kind.DTMF:
        if len(payload) != 1 or chr(payload[0]) not in "0123456789*#ABCDabcd":
            raise RemoteProtocolError(f"AudioSocket DTMF payload {payload!r} is not one digit")
        return Dtmf(chr(payload[0]).upper())
    if kind is Kind.ERROR:
        return Error(payload[0] if payload else None)
    if len(payload) % 2:
        raise RemoteProtocolError(f"AudioSocket audio payload of odd length {len(payload)}")
    return Audio(payload, AUDIO_RATES[kind])


def encode_audio(pcm: bytes, rate: int = 8000) -> bytes:
    """An audio message for ``pcm`` (s16le mono at ``rate``).

    Raises:
        LocalProtocolError: unsupported rate, odd length or too long a payload.
    """
    kind = _KIND_FOR_RATE.get(rate)
    if kind is None:
        raise LocalProtocolError(f"AudioSocket has no audio kind for {rate} Hz")
    if len(pcm) % 2 or len(pcm) > MAX_PAYLOAD_BYTES:
        raise LocalProtocolError(f"cannot send {len(pcm)} bytes of 16-bit audio in one message")
    return _HEADER.pack(kind, len(pcm)) + pcm


def encode_hangup() -> bytes:
    """The message that makes Asterisk end AudioSocket() (and with our dialplan, the call)."""
    return _HEADER.pack(Kind.HANGUP, 0)


def encode_call_id(value: uuid.UUID) -> bytes:
    """The UUID message (what Asterisk sends first; used by test peers and the lab)."""
    return _HEADER.pack(Kind.UUID, 16) + value.bytes


def encode_dtmf(digit: str) -> bytes:
    """A DTMF message (what Asterisk sends for a key press; used by test peers)."""
    if len(digit) != 1 or digit.upper() not in "0123456789*#ABCD":
        raise LocalProtocolError(f"{digit!r} is not a DTMF digit")
    return _HEADER.pack(Kind.DTMF, 1) + digit.encode()
