"""The AudioSocket server: Asterisk connects here once per accepted call.

The first frame must be the call's UUID (sipbridge's call id, set by the dialplan); a
connection that sends anything else or garbage is closed and logged, and one whose id no call
waits for is closed by the flow. Audio toward Asterisk is written frame by frame by the
session's paced writer; when Asterisk stops reading, frames are dropped (and counted) rather
than queued without bound. Closing the connection ends the call: ``AudioSocket()`` returns and
the dialplan hangs up (``dialplan/sipbridge.conf``), with or without AMI.

Each connection is an :class:`asyncio.Protocol`: the bytes Asterisk sends are decoded in the
socket's callback and the call's events go straight to its session (:mod:`bridge.legs`),
with no reader task to wake for each of the 50 frames a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, cast

from bridge.errors import RemoteProtocolError
from bridge.events import LegAudio, LegClosed, LegDtmf, LegEvent, LegSink
from bridge.legs import LegOutlet
from bridge.protocol import audiosocket as wire

log = logging.getLogger(__name__)

FIRST_FRAME_TIMEOUT_S = 5.0
# About 0.5 s of 8 kHz audio: more than that waiting in the socket means Asterisk is not reading.
MAX_UNSENT_BYTES = 8 * 1024
# How long a closed leg waits for its unsent frames to leave before it drops the connection.
CLOSE_TIMEOUT_S = 2.0


class AudioSocketLeg(asyncio.Protocol):
    """One AudioSocket connection: before its UUID frame a connection waiting to be named,
    then that call's ``MediaLeg``."""

    rate = 8000

    def __init__(
        self, max_frame_bytes: int, on_leg: LegHandler, on_gone: Callable[[], None]
    ) -> None:
        self._decoder = wire.FrameDecoder(max_frame_bytes)
        self._on_leg = on_leg
        self._on_gone = on_gone
        self._transport: asyncio.Transport | None = None
        self._peer: Any = None
        self._first_frame_timer: asyncio.TimerHandle | None = None
        self._lost: asyncio.Future[None] | None = None
        self._outlet = LegOutlet()
        self.call_id: str | None = None
        self.closed = False
        self.dropped_frames = 0
        self.error_frames = 0

    # ---- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._peer = transport.get_extra_info("peername")
        loop = asyncio.get_running_loop()
        self._lost = loop.create_future()
        self._first_frame_timer = loop.call_later(FIRST_FRAME_TIMEOUT_S, self._no_first_frame)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self._decoder.receive_data(data)
        except RemoteProtocolError as exc:
            self._refuse(str(exc))
            return
        for frame in self._decoder.events_received():
            if self.call_id is None:
                self._named(frame)
            else:
                self._translate(frame)
            if self._done_reading():
                return

    def _done_reading(self) -> bool:
        """A frame ended the connection (a hangup, an error, a refusal): the rest is moot."""
        return self.closed

    def eof_received(self) -> bool:
        # Asterisk closes the connection without a hangup frame when the caller hangs up.
        return False  # the transport closes; connection_lost says the rest

    def connection_lost(self, exc: Exception | None) -> None:
        if self._first_frame_timer is not None:
            self._first_frame_timer.cancel()
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        self._on_gone()
        if self.call_id is None:
            if not self.closed:
                log.warning(
                    "AudioSocket connection from %s closed: closed before sending its UUID",
                    self._peer,
                )
            self.closed = True
            return
        self.closed = True
        if isinstance(exc, ConnectionResetError):
            # Asterisk closes the socket as the channel ends; when our next frames were still
            # unread there, the kernel answers with a reset instead of a FIN (seen under load
            # with 20 calls hanging up at once).
            self._outlet.put(LegClosed(by_caller=True, detail="connection reset as the call ended"))
        elif isinstance(exc, BrokenPipeError):
            # A frame of ours written after Asterisk's close (seen in the hour-long soak).
            self._outlet.put(
                LegClosed(
                    by_caller=True,
                    detail="Asterisk closed the connection as the call ended (broken pipe)",
                )
            )
        elif exc is not None:
            self._outlet.put(LegClosed(by_caller=False, detail=f"AudioSocket read failed: {exc}"))
        else:
            self._outlet.put(LegClosed(by_caller=True))

    # ---- before the UUID ----------------------------------------------------------------------

    def _named(self, frame: wire.Frame) -> None:
        if not isinstance(frame, wire.CallId):
            self._refuse(f"first frame is {type(frame).__name__}, not the UUID")
            return
        if self._first_frame_timer is not None:
            self._first_frame_timer.cancel()
        self.call_id = str(frame.value)
        try:
            self._on_leg(self.call_id, self)
        except Exception:
            # The boundary of one connection: log it, close it, keep serving the others.
            log.exception("AudioSocket connection from %s failed", self._peer)
            self._close_transport()
            self.closed = True

    def _no_first_frame(self) -> None:
        if self.call_id is None and not self.closed:
            log.warning(
                "AudioSocket connection from %s sent no UUID within %.0f s",
                self._peer,
                FIRST_FRAME_TIMEOUT_S,
            )
            self.closed = True
            self._close_transport()

    def _refuse(self, problem: str) -> None:
        """A protocol error: before the UUID it is logged, after it the call's leg ends."""
        if self.call_id is None:
            log.warning("AudioSocket connection from %s closed: %s", self._peer, problem)
        else:
            self._outlet.put(LegClosed(by_caller=False, detail=problem))
        self.closed = True
        self._close_transport()

    # ---- the call's leg -----------------------------------------------------------------------

    def _translate(self, frame: wire.Frame) -> None:
        put = self._outlet.put
        if isinstance(frame, wire.Audio):
            if frame.rate != self.rate:
                # Asterisk sends 8 kHz slin unless told otherwise; another rate is a setup error.
                self._refuse(f"AudioSocket audio at {frame.rate} Hz, expected {self.rate}")
            else:
                put(LegAudio(frame.pcm))
        elif isinstance(frame, wire.Dtmf):
            put(LegDtmf(frame.digit))
        elif isinstance(frame, wire.Hangup):
            put(LegClosed(by_caller=True))
            self.closed = True
        elif isinstance(frame, wire.Error):
            self.error_frames += 1
            put(LegClosed(False, f"Asterisk reported AudioSocket error {frame.code}"))
            self.closed = True
        else:
            self._refuse("a second UUID frame on the connection")

    def deliver(self, sink: LegSink | None) -> None:
        """Events go to ``sink`` as they arrive (see :class:`bridge.legs.LegOutlet`)."""
        self._outlet.attach(sink)

    async def receive(self) -> list[LegEvent]:
        """Decoded events from Asterisk; the last one is a :class:`LegClosed`."""
        return await self._outlet.receive()

    def send_audio(self, pcm: bytes) -> bool:
        """Writes one frame now, or drops it if Asterisk is not reading."""
        transport = self._transport
        if self.closed or transport is None or transport.is_closing():
            return False
        if transport.get_write_buffer_size() > MAX_UNSENT_BYTES:
            self.dropped_frames += 1
            return False
        transport.write(wire.encode_audio(pcm, self.rate))
        return True

    async def aclose(self) -> None:
        """Closes the connection (Asterisk's AudioSocket() returns: the call ends unless it
        was transferred away meanwhile); a second call does nothing."""
        self.closed = True
        self._close_transport()
        if self._lost is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._lost), CLOSE_TIMEOUT_S)
            if not self._lost.done() and self._transport is not None:
                # Asterisk does not read what is left: a frame is not worth a stuck close.
                self._transport.abort()

    def abort(self) -> asyncio.Future[None] | None:
        """Drops the connection at once (the service is stopping); returns what says it is
        gone (None before it was made)."""
        self.closed = True
        if self._transport is not None:
            self._transport.abort()
        return self._lost

    def _close_transport(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()


# Hands a connected leg to its owner (the backend posts LegConnected), who closes it when done.
LegHandler = Callable[[str, AudioSocketLeg], None]


class AudioSocketServer:
    """Accepts Asterisk's AudioSocket connections and hands each to ``on_leg``."""

    def __init__(self, host: str, port: int, max_frame_bytes: int, on_leg: LegHandler) -> None:
        self.host = host
        self.port = port
        self._max_frame_bytes = max_frame_bytes
        self._on_leg = on_leg
        self._server: asyncio.Server | None = None
        self._connections: set[AudioSocketLeg] = set()

    def __len__(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        """Listens; ``port`` becomes the bound port (useful with 0)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._connection, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("AudioSocket server on %s:%d", self.host, self.port)

    async def aclose(self) -> None:
        """Stops listening and ends every connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        lost = [connection.abort() for connection in list(self._connections)]
        # Each dropped connection's connection_lost runs on the next loop iterations.
        pending = [future for future in lost if future is not None]
        if pending:
            await asyncio.wait(pending, timeout=CLOSE_TIMEOUT_S)

    def _connection(self) -> AudioSocketLeg:
        connection: AudioSocketLeg

        def gone() -> None:
            self._connections.discard(connection)

        connection = AudioSocketLeg(self._max_frame_bytes, self._on_leg, gone)
        self._connections.add(connection)
        return connection
