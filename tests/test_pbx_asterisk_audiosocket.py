"""The AudioSocket server against an Asterisk-like peer on a real loopback TCP connection."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import uuid
from collections.abc import AsyncIterator

import pytest

from bridge.events import LegAudio, LegClosed, LegDtmf
from bridge.pbx.asterisk.audiosocket import AudioSocketLeg, AudioSocketServer
from bridge.protocol import audiosocket as wire


class Handler:
    """The leg's owner (the call flow in the service): reads it until it closes, then frees it."""

    def __init__(self) -> None:
        self.legs: list[tuple[str, AudioSocketLeg]] = []
        self.events: list[object] = []
        self.arrived = asyncio.Event()
        self.done = asyncio.Event()
        self._readers: set[asyncio.Task[None]] = set()

    def __call__(self, call_id: str, leg: AudioSocketLeg) -> None:
        self.legs.append((call_id, leg))
        self.arrived.set()
        reader = asyncio.ensure_future(self._read(leg))
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)

    async def _read(self, leg: AudioSocketLeg) -> None:
        while True:
            events = await leg.receive()
            self.events += events
            if any(isinstance(e, LegClosed) for e in events):
                break
        await leg.aclose()
        self.done.set()


@pytest.fixture
async def server() -> AsyncIterator[tuple[AudioSocketServer, Handler]]:
    handler = Handler()
    running = AudioSocketServer("127.0.0.1", 0, 4096, handler)
    await running.start()
    yield running, handler
    await running.aclose()


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def started_call(
    server: tuple[AudioSocketServer, Handler],
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that has sent its UUID, once the server has handed the leg over."""
    running, handler = server
    reader, writer = await connect(running.port)
    writer.write(wire.encode_call_id(uuid.uuid4()))
    await asyncio.wait_for(handler.arrived.wait(), 5)
    return reader, writer


async def test_a_call_arrives_with_its_id_and_audio(
    server: tuple[AudioSocketServer, Handler],
) -> None:
    running, handler = server
    call_id = uuid.uuid4()
    reader, writer = await connect(running.port)
    # UUID and the first audio frame in one write, as Asterisk may well send them.
    writer.write(wire.encode_call_id(call_id) + wire.encode_audio(b"\x01\x00" * 160))
    await asyncio.wait_for(handler.arrived.wait(), 5)
    assert handler.legs[0][0] == str(call_id)
    writer.write(wire.encode_dtmf("7") + wire.encode_audio(b"\x02\x00" * 160))
    leg = handler.legs[0][1]
    assert leg.send_audio(b"\x03\x00" * 160)
    assert await reader.readexactly(3 + 320) == wire.encode_audio(b"\x03\x00" * 160)
    writer.close()  # the caller hung up: Asterisk just closes
    await asyncio.wait_for(handler.done.wait(), 5)
    assert handler.events == [
        LegAudio(b"\x01\x00" * 160),
        LegDtmf("7"),
        LegAudio(b"\x02\x00" * 160),
        LegClosed(by_caller=True),
    ]


async def test_a_reset_as_asterisk_hangs_up_is_the_callers_hangup(
    server: tuple[AudioSocketServer, Handler],
) -> None:
    handler = server[1]
    reader, writer = await started_call(server)
    # Asterisk ends the channel with our frames unread: its close becomes a TCP reset.
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    await asyncio.wait_for(handler.done.wait(), 5)
    assert handler.events[-1] == LegClosed(
        by_caller=True, detail="connection reset as the call ended"
    )


class StubTransport(asyncio.Transport):
    """The transport asyncio gives a connection, for driving the protocol's callbacks."""

    def __init__(self) -> None:
        super().__init__()
        self.closing = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 4573) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True


async def test_a_write_after_asterisks_close_is_the_callers_hangup() -> None:
    """Seen in the soak: a frame written after Asterisk closed the socket failed with EPIPE,
    and asyncio hands that error to connection_lost: it was reported as a failed media leg,
    not the caller's hangup. The audio that arrived before it still counts."""
    legs: list[AudioSocketLeg] = []
    leg = AudioSocketLeg(4096, lambda _, named: legs.append(named), lambda: None)
    leg.connection_made(StubTransport())
    leg.data_received(wire.encode_call_id(uuid.uuid4()) + wire.encode_audio(b"\x01\x00" * 160))
    leg.connection_lost(BrokenPipeError(32, "Broken pipe"))
    assert legs == [leg]
    assert await leg.receive() == [
        LegAudio(b"\x01\x00" * 160),
        LegClosed(
            by_caller=True, detail="Asterisk closed the connection as the call ended (broken pipe)"
        ),
    ]


async def test_a_running_session_takes_the_frames_in_the_sockets_callback() -> None:
    """[performance] no reader task per frame: with a sink attached, each event reaches it
    from data_received, in order (those kept before it attached first), and nothing is kept
    for receive() meanwhile."""
    taken: list[object] = []
    changed = asyncio.Event()
    legs: list[AudioSocketLeg] = []

    def sink(event: object) -> None:
        taken.append(event)
        changed.set()

    def on_leg(_: str, leg: AudioSocketLeg) -> None:
        legs.append(leg)
        changed.set()

    running = AudioSocketServer("127.0.0.1", 0, 4096, on_leg)
    await running.start()
    try:
        _, writer = await connect(running.port)
        writer.write(wire.encode_call_id(uuid.uuid4()) + wire.encode_audio(b"\x01\x00" * 160))
        while not legs:
            changed.clear()
            await asyncio.wait_for(changed.wait(), 5)
        legs[0].deliver(sink)
        assert taken == [LegAudio(b"\x01\x00" * 160)]  # kept until the sink came
        writer.write(wire.encode_audio(b"\x02\x00" * 160) + wire.encode_dtmf("#"))
        writer.close()
        while not taken or not isinstance(taken[-1], LegClosed):
            changed.clear()
            await asyncio.wait_for(changed.wait(), 5)
        assert taken == [
            LegAudio(b"\x01\x00" * 160),
            LegAudio(b"\x02\x00" * 160),
            LegDtmf("#"),
            LegClosed(by_caller=True),
        ]
        assert await legs[0].receive() == [LegClosed(by_caller=True)]  # and again, if asked
    finally:
        await running.aclose()


async def test_garbage_closes_the_leg_with_a_reason(
    server: tuple[AudioSocketServer, Handler],
) -> None:
    handler = server[1]
    reader, writer = await started_call(server)
    writer.write(b"\x42\x00\x01x")
    await asyncio.wait_for(handler.done.wait(), 5)
    closed = handler.events[-1]
    assert isinstance(closed, LegClosed) and not closed.by_caller
    assert "unknown AudioSocket kind 0x42" in closed.detail
    assert await asyncio.wait_for(reader.read(), 5) == b""  # and the connection is closed
    writer.close()


async def test_an_error_frame_ends_the_leg(server: tuple[AudioSocketServer, Handler]) -> None:
    running, handler = server
    _, writer = await connect(running.port)
    writer.write(wire.encode_call_id(uuid.uuid4()))
    await asyncio.wait_for(handler.arrived.wait(), 5)
    writer.write(bytes.fromhex("ff000102"))
    await asyncio.wait_for(handler.done.wait(), 5)
    assert handler.events == [LegClosed(False, "Asterisk reported AudioSocket error 2")]
    writer.close()


@pytest.mark.parametrize(
    ("first", "problem"),
    [
        (wire.encode_audio(bytes(320)), "first frame is Audio, not the UUID"),
        (wire.encode_call_id(uuid.uuid4()) + b"\x42\x00\x00", "unknown AudioSocket kind 0x42"),
        (b"", "closed before sending its UUID"),
    ],
)
async def test_a_bad_start_is_closed_and_logged(
    server: tuple[AudioSocketServer, Handler],
    caplog: pytest.LogCaptureFixture,
    first: bytes,
    problem: str,
) -> None:
    running, handler = server
    reader, writer = await connect(running.port)
    with caplog.at_level(logging.WARNING):
        if first:
            writer.write(first)
        else:
            writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        writer.close()
        await running.aclose()  # waits for the connection's handler to finish logging
    assert problem in caplog.text
    assert handler.legs == []


async def test_a_slow_reader_gets_frames_dropped_not_queued(
    server: tuple[AudioSocketServer, Handler],
) -> None:
    running, handler = server
    _, writer = await connect(running.port)
    writer.write(wire.encode_call_id(uuid.uuid4()))
    await asyncio.wait_for(handler.arrived.wait(), 5)
    leg = handler.legs[0][1]
    # The peer never reads: the socket buffers fill, then frames are dropped and counted.
    sent = sum(leg.send_audio(bytes(320)) for _ in range(20000))
    assert leg.dropped_frames > 0 and sent < 20000
    writer.close()


async def test_closing_the_leg_closes_the_connection(
    server: tuple[AudioSocketServer, Handler],
) -> None:
    """The owner's close is how sipbridge ends a call without AMI: AudioSocket() returns."""
    running, handler = server
    reader, writer = await started_call(server)
    assert len(running) == 1
    await handler.legs[0][1].aclose()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
