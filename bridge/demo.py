"""The demo pipeline (``sipbridge demo-pipeline``): a stand-in conversational pipeline.

A websocket server speaking both of sipbridge's dialects (``raw``, or ``twilio`` when the
stream opens with Twilio's ``connected``). Per call it:

- speaks the assistant's rendered firstMessage with ``espeak-ng`` when installed, otherwise plays
  a recognisable rising three-tone chime, then sends a mark (``greeting-done``);
- stops speaking and sends ``clear`` when the caller talks over the greeting (barge-in);
- after the greeting, echoes the caller back with a short delay;
- answers a DTMF key with that key's DTMF tone pair, and ends the call on ``#``.

It is what the lab calls; it is not meant to hold a conversation.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import shutil
import wave
from collections import deque
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from bridge.audio import Resampler, mix, pcm_to_ulaw, rms, sine, ulaw_to_pcm
from bridge.protocol.dialects import DEFAULT_SAMPLE_RATE, FRAME_MS, MULAW_RATE

log = logging.getLogger(__name__)

CHUNK_MS = 100  # TTS engines deliver bursts; sipbridge re-frames and paces them
ECHO_DELAY_MS = 600
BARGE_IN_RMS = 1500
CHIME_HZ = (523.25, 659.25, 783.99)
# DTMF row/column frequencies (ITU-T Q.23).
_DTMF = {
    "1": (697, 1209), "2": (697, 1336), "3": (697, 1477), "A": (697, 1633),
    "4": (770, 1209), "5": (770, 1336), "6": (770, 1477), "B": (770, 1633),
    "7": (852, 1209), "8": (852, 1336), "9": (852, 1477), "C": (852, 1633),
    "*": (941, 1209), "0": (941, 1336), "#": (941, 1477), "D": (941, 1633),
}  # fmt: skip


def chime(rate: int) -> bytes:
    """The rising three-tone chime played when espeak-ng is not installed."""
    gap = bytes(int(rate * 0.05) * 2)
    return b"".join(sine(f, 0.2, rate, 0.25) + gap for f in CHIME_HZ)


def dtmf_tone(digit: str, rate: int, duration_s: float = 0.2) -> bytes:
    """The two-frequency tone of a key."""
    low, high = _DTMF.get(digit.upper(), (941, 1336))
    return mix(sine(low, duration_s, rate, 0.2), sine(high, duration_s, rate, 0.2))


async def speak(text: str, rate: int) -> bytes | None:
    """``text`` spoken by espeak-ng as PCM at ``rate``, or None when espeak-ng is missing."""
    binary = shutil.which("espeak-ng")
    if binary is None or not text.strip():
        return None
    process = await asyncio.create_subprocess_exec(
        binary, "--stdout", "-s", "165", text[:1000],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    output, _ = await process.communicate()
    if process.returncode != 0 or not output:
        return None
    with wave.open(io.BytesIO(output)) as wav:
        if wav.getsampwidth() != 2 or wav.getnchannels() != 1:
            return None
        pcm, source_rate = wav.readframes(wav.getnframes()), wav.getframerate()
    if source_rate % 8000:
        # espeak-ng speaks at 22050 Hz. Up to 24 kHz first (linear interpolation, whose images
        # lie above 11 kHz), then the anti-aliased telephony resampler does the rest.
        pcm, source_rate = Resampler(source_rate, 24000).convert(pcm), 24000
    return Resampler(source_rate, rate).convert(pcm)


@dataclass(frozen=True)
class Heard:
    """One message from sipbridge, decoded: ``kind`` is audio (``pcm``), dtmf, mark or stop."""

    kind: str
    pcm: bytes = b""
    text: str = ""


class RawWire:
    """The raw dialect: binary audio in the start message's format, JSON ``type`` control."""

    def __init__(self, start: dict[str, Any]) -> None:
        audio = start.get("audioFormat") or {}
        self.mulaw = audio.get("encoding") == "mulaw"
        self.rate = MULAW_RATE if self.mulaw else int(audio.get("sampleRate", DEFAULT_SAMPLE_RATE))
        self.call_id = str(start.get("callId"))
        self.first_message = str((start.get("assistant") or {}).get("firstMessage") or "")

    def audio(self, pcm: bytes) -> bytes:
        return pcm_to_ulaw(pcm) if self.mulaw else pcm

    def control(self, message: dict[str, Any]) -> str:
        return json.dumps(message)

    def hear(self, message: str | bytes) -> Heard | None:
        if isinstance(message, bytes):
            return Heard("audio", ulaw_to_pcm(message) if self.mulaw else message)
        data = json.loads(message)
        kind = data.get("type") if isinstance(data, dict) else None
        if kind == "dtmf":
            return Heard("dtmf", text=str(data.get("digit", "")))
        if kind in ("mark", "stop"):
            return Heard(kind, text=str(data.get("name") or data.get("reason") or ""))
        return None


class TwilioWire:
    """Twilio Media Streams: base64 μ-law 8 kHz ``media``, ``event``-keyed control."""

    rate = MULAW_RATE

    def __init__(self, start: dict[str, Any]) -> None:
        self.stream_sid = str(start.get("streamSid"))
        parameters = (start.get("start") or {}).get("customParameters") or {}
        self.call_id = str(parameters.get("callId"))
        self.first_message = str(parameters.get("firstMessage") or "")

    def audio(self, pcm: bytes) -> str:
        payload = base64.b64encode(pcm_to_ulaw(pcm)).decode("ascii")
        return json.dumps(
            {"event": "media", "streamSid": self.stream_sid, "media": {"payload": payload}}
        )

    def control(self, message: dict[str, Any]) -> str:
        kind = message.get("type")
        if kind == "clear":
            return json.dumps({"event": "clear", "streamSid": self.stream_sid})
        if kind == "mark":
            return json.dumps(
                {"event": "mark", "streamSid": self.stream_sid, "mark": {"name": message["name"]}}
            )
        return json.dumps(message)  # sipbridge's own control (end-call, ...) keeps its type

    def hear(self, message: str | bytes) -> Heard | None:
        data = json.loads(message)
        if not isinstance(data, dict):
            return None
        kind = data.get("event")
        if kind == "media":
            return Heard("audio", ulaw_to_pcm(base64.b64decode(data["media"]["payload"])))
        if kind == "dtmf":
            return Heard("dtmf", text=str(data["dtmf"].get("digit", "")))
        if kind == "mark":
            return Heard("mark", text=str(data["mark"].get("name", "")))
        if kind == "stop":
            return Heard("stop", text=str((data.get("stop") or {}).get("reason", "")))
        return None


Wire = RawWire | TwilioWire


async def open_wire(ws: ServerConnection) -> Wire | None:
    """The dialect, from the stream's first message(s); None if it opens with anything else."""
    first = json.loads(await ws.recv())
    if isinstance(first, dict) and first.get("event") == "connected":
        first = json.loads(await ws.recv())
        if isinstance(first, dict) and first.get("event") == "start":
            return TwilioWire(first)
        return None
    if isinstance(first, dict) and first.get("type") == "start":
        return RawWire(first)
    return None


class DemoPipeline:
    """The websocket server; ``url`` is where assistants point their pipeline."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._server: Server | None = None

    @property
    def url(self) -> str:
        """The websocket URL."""
        return f"ws://{self.host}:{self.port}/pipeline"

    async def start(self) -> None:
        """Starts listening."""
        self._server = await serve(self._session, self.host, self.port, compression=None)
        self.port = next(iter(self._server.sockets)).getsockname()[1]
        log.info("demo pipeline on %s", self.url)

    async def aclose(self) -> None:
        """Stops."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _session(self, ws: ServerConnection) -> None:
        try:
            async with asyncio.timeout(10):
                wire = await open_wire(ws)
            if wire is None:
                await ws.close(1008, "expected a start message")
                return
            await _Call(ws, wire).run()
        except (ConnectionClosed, TimeoutError, ValueError, KeyError, TypeError) as exc:
            log.info("demo session ended: %r", exc)
            return


class _Call:
    def __init__(self, ws: ServerConnection, wire: Wire) -> None:
        self.ws = ws
        self.wire = wire
        self.rate = wire.rate
        self.greeting_playing = True
        self.echo: deque[bytes] = deque()
        self.echo_frames = ECHO_DELAY_MS // FRAME_MS
        self.outbox: asyncio.Queue[bytes | str] = asyncio.Queue()
        self.call_id = wire.call_id

    async def run(self) -> None:
        text = self.wire.first_message
        log.info("demo call %s: first message %r", self.call_id, text)
        greeting = await speak(text, self.rate) if text else None
        if greeting is None:
            greeting = chime(self.rate)
        sender = asyncio.create_task(self._send_loop())
        speaker = asyncio.create_task(self._speak(greeting))
        try:
            async for message in self.ws:
                heard = self.wire.hear(message)
                if heard is None:
                    continue
                if heard.kind == "audio":
                    self._caller_audio(heard.pcm)
                else:
                    await self._control(heard)
        except ConnectionClosed:
            pass
        finally:
            speaker.cancel()
            sender.cancel()
            await asyncio.gather(speaker, sender, return_exceptions=True)

    async def _speak(self, pcm: bytes) -> None:
        chunk = self.rate * CHUNK_MS // 1000 * 2
        loop = asyncio.get_running_loop()
        start = loop.time()
        for index, offset in enumerate(range(0, len(pcm), chunk)):
            if not self.greeting_playing:
                return
            await self.outbox.put(self.wire.audio(pcm[offset : offset + chunk]))
            delay = start + (index + 1) * CHUNK_MS / 1000 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        await self.outbox.put(self.wire.control({"type": "mark", "name": "greeting-done"}))

    async def _send_loop(self) -> None:
        while True:
            await self.ws.send(await self.outbox.get())

    def _caller_audio(self, pcm: bytes) -> None:
        if self.greeting_playing:
            if rms(pcm) > BARGE_IN_RMS:
                log.info("demo call %s: caller talks over the greeting: clear", self.call_id)
                self.greeting_playing = False
                self._drain_outbox()
                self.outbox.put_nowait(self.wire.control({"type": "clear"}))
            return
        self.echo.append(pcm)
        if len(self.echo) > self.echo_frames:
            self.outbox.put_nowait(self.wire.audio(self.echo.popleft()))

    def _drain_outbox(self) -> None:
        while not self.outbox.empty():
            self.outbox.get_nowait()

    async def _control(self, heard: Heard) -> None:
        if heard.kind == "mark" and heard.text == "greeting-done":
            log.info("demo call %s: greeting played", self.call_id)
            self.greeting_playing = False
        elif heard.kind == "dtmf":
            log.info("demo call %s: caller pressed %s", self.call_id, heard.text)
            if heard.text == "#":
                await self.outbox.put(
                    self.wire.control({"type": "end-call", "reason": "assistant-ended-call"})
                )
            else:
                await self.outbox.put(self.wire.audio(dtmf_tone(heard.text, self.rate)))
        elif heard.kind == "stop":
            log.info("demo call %s: stopped (%s)", self.call_id, heard.text)
