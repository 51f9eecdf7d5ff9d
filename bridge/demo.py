"""The demo pipeline (``sipbridge demo-pipeline``): a stand-in conversational pipeline.

A websocket server speaking sipbridge's ``raw`` dialect. Per call it:

- speaks the assistant's rendered firstMessage with ``espeak-ng`` when installed, otherwise plays
  a recognisable rising three-tone chime, then sends a mark (``greeting-done``);
- stops speaking and sends ``clear`` when the caller talks over the greeting (barge-in);
- after the greeting, echoes the caller back with a short delay;
- answers a DTMF key with that key's DTMF tone pair, and ends the call on ``#``.

It is what the lab calls; it is not meant to hold a conversation.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import shutil
import wave
from collections import deque
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from bridge.audio import Resampler, mix, pcm_to_ulaw, rms, sine, ulaw_to_pcm

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
    return Resampler(source_rate, rate).convert(pcm)


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
                first = await ws.recv()
            start = json.loads(first)
            if not isinstance(start, dict) or start.get("type") != "start":
                await ws.close(1008, "expected a start message")
                return
            await _Call(ws, start).run()
        except (ConnectionClosed, TimeoutError, ValueError):
            return


class _Call:
    def __init__(self, ws: ServerConnection, start: dict[str, Any]) -> None:
        self.ws = ws
        self.start = start
        audio = start.get("audioFormat") or {}
        self.encoding = audio.get("encoding", "pcm_s16le")
        self.rate = int(audio.get("sampleRate", 16000))
        self.frame_bytes = self.rate * 20 // 1000 * (1 if self.encoding == "mulaw" else 2)
        self.greeting_playing = True
        self.echo: deque[bytes] = deque()
        self.echo_frames = ECHO_DELAY_MS // 20
        self.outbox: asyncio.Queue[bytes | str] = asyncio.Queue()
        self.call_id = start.get("callId")

    def _pcm(self, data: bytes) -> bytes:
        return ulaw_to_pcm(data) if self.encoding == "mulaw" else data

    def _wire(self, pcm: bytes) -> bytes:
        return pcm_to_ulaw(pcm) if self.encoding == "mulaw" else pcm

    async def run(self) -> None:
        assistant = self.start.get("assistant") or {}
        text = str(assistant.get("firstMessage") or "")
        log.info("demo call %s: first message %r", self.call_id, text)
        greeting = await speak(text, self.rate) if text else None
        if greeting is None:
            greeting = chime(self.rate)
        sender = asyncio.create_task(self._send_loop())
        speaker = asyncio.create_task(self._speak(greeting))
        try:
            async for message in self.ws:
                if isinstance(message, bytes):
                    self._caller_audio(message)
                else:
                    await self._control(message)
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
            await self.outbox.put(self._wire(pcm[offset : offset + chunk]))
            delay = start + (index + 1) * CHUNK_MS / 1000 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        await self.outbox.put(json.dumps({"type": "mark", "name": "greeting-done"}))

    async def _send_loop(self) -> None:
        while True:
            await self.ws.send(await self.outbox.get())

    def _caller_audio(self, data: bytes) -> None:
        pcm = self._pcm(data)
        if self.greeting_playing:
            if rms(pcm) > BARGE_IN_RMS:
                log.info("demo call %s: caller talks over the greeting: clear", self.call_id)
                self.greeting_playing = False
                self._drain_outbox()
                self.outbox.put_nowait(json.dumps({"type": "clear"}))
            return
        self.echo.append(data)
        if len(self.echo) > self.echo_frames:
            self.outbox.put_nowait(self.echo.popleft())

    def _drain_outbox(self) -> None:
        while not self.outbox.empty():
            self.outbox.get_nowait()

    async def _control(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            return
        kind = message.get("type")
        if kind == "mark" and message.get("name") == "greeting-done":
            log.info("demo call %s: greeting played", self.call_id)
            self.greeting_playing = False
        elif kind == "dtmf":
            digit = str(message.get("digit", ""))
            log.info("demo call %s: caller pressed %s", self.call_id, digit)
            if digit == "#":
                await self.outbox.put(
                    json.dumps({"type": "end-call", "reason": "assistant-ended-call"})
                )
            else:
                await self.outbox.put(self._wire(dtmf_tone(digit, self.rate)))
        elif kind == "stop":
            log.info("demo call %s: stopped (%s)", self.call_id, message.get("reason"))
