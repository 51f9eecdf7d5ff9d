"""The AudioSocket server: Asterisk connects here once per accepted call.

The first frame must be the call's UUID (sipbridge's call id, set by the dialplan); a
connection that sends anything else or garbage is closed and logged, and one whose id no call
waits for is closed by the flow. Audio toward Asterisk is written frame by frame by the
session's paced writer; when Asterisk stops reading, frames are dropped (and counted) rather
than queued without bound. Closing the connection ends the call: ``AudioSocket()`` returns and
the dialplan hangs up (``dialplan/sipbridge.conf``), with or without AMI.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from bridge.errors import RemoteProtocolError
from bridge.events import LegAudio, LegClosed, LegDtmf, LegEvent
from bridge.protocol import audiosocket as wire
from bridge.tasks import cancel_and_wait

log = logging.getLogger(__name__)

FIRST_FRAME_TIMEOUT_S = 5.0
READ_BYTES = 8192
# About 0.5 s of 8 kHz audio: more than that waiting in the socket means Asterisk is not reading.
MAX_UNSENT_BYTES = 8 * 1024


class AudioSocketLeg:
    """One call's AudioSocket connection, as a ``MediaLeg``."""

    rate = 8000

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: wire.FrameDecoder,
        call_id: str,
        early_frames: list[wire.Frame] | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = decoder
        self.call_id = call_id
        # Frames that arrived in the same read as the UUID.
        self._early = early_frames or []
        self.closed = False
        self.dropped_frames = 0
        self.error_frames = 0
        self._released = asyncio.Event()

    async def receive(self) -> list[LegEvent]:
        """Decoded events from Asterisk; the last one is a :class:`LegClosed`."""
        if self.closed:
            return [LegClosed(by_caller=True)]
        if self._early:
            early, self._early = self._early, []
            events = [event for frame in early for event in self._translate(frame)]
            if events:
                return events
        while True:
            try:
                data = await self._reader.read(READ_BYTES)
            except (ConnectionResetError, BrokenPipeError) as exc:
                # Asterisk closes the socket as the channel ends; when our next frames were
                # still unread there, the kernel answers with a reset instead of a FIN (seen
                # under load with 20 calls hanging up at once), and when a frame of ours was
                # written after its close, asyncio hands the reader that write's EPIPE (seen
                # in the hour-long soak). It is the same hangup.
                self.closed = True
                detail = (
                    "connection reset as the call ended"
                    if isinstance(exc, ConnectionResetError)
                    else "Asterisk closed the connection as the call ended (broken pipe)"
                )
                return [LegClosed(by_caller=True, detail=detail)]
            except (ConnectionError, OSError) as exc:
                self.closed = True
                return [LegClosed(by_caller=False, detail=f"AudioSocket read failed: {exc}")]
            if not data:
                # Asterisk closes the connection without a hangup frame when the caller hangs up.
                self.closed = True
                return [LegClosed(by_caller=True)]
            try:
                self._decoder.receive_data(data)
            except RemoteProtocolError as exc:
                self.closed = True
                return [LegClosed(by_caller=False, detail=str(exc))]
            events = [
                event
                for frame in self._decoder.events_received()
                for event in self._translate(frame)
            ]
            if events:
                return events

    def _translate(self, frame: wire.Frame) -> list[LegEvent]:
        if isinstance(frame, wire.Audio):
            if frame.rate != self.rate:
                # Asterisk sends 8 kHz slin unless told otherwise; another rate is a setup error.
                return [
                    LegClosed(False, f"AudioSocket audio at {frame.rate} Hz, expected {self.rate}")
                ]
            return [LegAudio(frame.pcm)]
        if isinstance(frame, wire.Dtmf):
            return [LegDtmf(frame.digit)]
        if isinstance(frame, wire.Hangup):
            self.closed = True
            return [LegClosed(by_caller=True)]
        if isinstance(frame, wire.Error):
            self.error_frames += 1
            return [LegClosed(False, f"Asterisk reported AudioSocket error {frame.code}")]
        return [LegClosed(False, "a second UUID frame on the connection")]

    def send_audio(self, pcm: bytes) -> bool:
        """Writes one frame now, or drops it if Asterisk is not reading."""
        transport = self._writer.transport
        if self.closed or transport.is_closing():
            return False
        if transport.get_write_buffer_size() > MAX_UNSENT_BYTES:
            self.dropped_frames += 1
            return False
        self._writer.write(wire.encode_audio(pcm, self.rate))
        return True

    async def aclose(self) -> None:
        """Closes the connection (Asterisk's AudioSocket() returns: the call ends unless it
        was transferred away meanwhile); a second call does nothing."""
        self.closed = True
        self._released.set()
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()

    async def wait_released(self) -> None:
        """Returns once the leg's owner is done with it (:meth:`aclose`)."""
        await self._released.wait()


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
        self._connections: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        """Listens; ``port`` becomes the bound port (useful with 0)."""
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("AudioSocket server on %s:%d", self.host, self.port)

    async def aclose(self) -> None:
        """Stops listening and ends every connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        await cancel_and_wait(list(self._connections))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer = writer.get_extra_info("peername")
        decoder = wire.FrameDecoder(self._max_frame_bytes)
        leg: AudioSocketLeg | None = None
        try:
            async with asyncio.timeout(FIRST_FRAME_TIMEOUT_S):
                call_id, early = await self._first_frame(reader, decoder)
            leg = AudioSocketLeg(reader, writer, decoder, call_id, early)
            self._on_leg(call_id, leg)
            await leg.wait_released()
        except TimeoutError:
            log.warning(
                "AudioSocket connection from %s sent no UUID within %.0f s",
                peer,
                FIRST_FRAME_TIMEOUT_S,
            )
        except RemoteProtocolError as exc:
            log.warning("AudioSocket connection from %s closed: %s", peer, exc)
        except Exception:
            # Task boundary of one connection: log it, close it, keep serving the others.
            log.exception("AudioSocket connection from %s failed", peer)
        finally:
            self._connections.discard(task)
            if leg is not None:
                await leg.aclose()
            else:
                writer.close()
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.wait_closed()

    async def _first_frame(
        self, reader: asyncio.StreamReader, decoder: wire.FrameDecoder
    ) -> tuple[str, list[wire.Frame]]:
        while True:
            data = await reader.read(READ_BYTES)
            if not data:
                raise RemoteProtocolError("closed before sending its UUID")
            decoder.receive_data(data)
            frames = decoder.events_received()
            if not frames:
                continue
            first = frames[0]
            if not isinstance(first, wire.CallId):
                raise RemoteProtocolError(f"first frame is {type(first).__name__}, not the UUID")
            return str(first.value), frames[1:]
