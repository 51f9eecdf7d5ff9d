"""The demo pipeline, driven the way sipbridge drives a pipeline (both dialects)."""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import AsyncIterator

import pytest
from websockets.asyncio.client import ClientConnection, connect

from bridge.audio import pcm_to_ulaw, rms, sine, tone_share, ulaw_to_pcm
from bridge.demo import CHIME_HZ, DemoPipeline, chime, dtmf_tone, speak
from bridge.protocol.pipeline import SessionInfo
from bridge.protocol.twilio import TwilioDialect


@pytest.fixture
async def demo(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[DemoPipeline]:
    monkeypatch.setattr("bridge.demo.shutil.which", lambda name: None)  # the chime, not espeak-ng
    running = DemoPipeline()
    await running.start()
    yield running
    await running.aclose()


async def open_call(demo: DemoPipeline, rate: int = 16000) -> ClientConnection:
    ws = await connect(demo.url, compression=None)
    start = {
        "type": "start",
        "callId": "c1",
        "assistant": {"firstMessage": "Hello John"},
        "audioFormat": {"encoding": "pcm_s16le", "sampleRate": rate, "channels": 1, "frameMs": 20},
    }
    await ws.send(json.dumps(start))
    return ws


async def read_until(
    ws: ClientConnection, predicate: object, audio: bytearray
) -> dict[str, object]:
    while True:
        message = await ws.recv()
        if isinstance(message, bytes):
            audio += message
            continue
        data = json.loads(message)
        if predicate(data):  # type: ignore[operator]
            return data


def need_espeak() -> None:
    if shutil.which("espeak-ng") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("espeak-ng is not installed (./dev test installs it)")
        pytest.skip("espeak-ng is not installed")


async def test_espeak_ng_speaks_the_first_message_at_the_stream_rate() -> None:
    need_espeak()
    spoken = {
        rate: await speak("Hello John, you've reached me over SIP.", rate)
        for rate in (8000, 16000, 24000)
    }
    durations = set()
    for rate, pcm in spoken.items():
        assert pcm is not None
        assert rms(pcm) > 500  # speech, not silence
        assert max(tone_share(pcm, rate, f) for f in (200, 500, 1000)) < 0.5  # nor a tone
        durations.add(round(len(pcm) / 2 / rate, 2))
    # espeak-ng speaks at 22050 Hz: each rate got the same 2 s or so, resampled, not relabelled.
    assert len(durations) == 1 and 1.5 < durations.pop() < 4.0
    assert await speak("   ", 8000) is None


def test_tones() -> None:
    assert len(chime(8000)) == int(3 * 0.25 * 8000) * 2
    five = dtmf_tone("5", 8000)
    assert tone_share(five, 8000, 770) > 0.4 and tone_share(five, 8000, 1336) > 0.4


async def test_greeting_then_echo_then_dtmf_then_hangup(demo: DemoPipeline) -> None:
    ws = await open_call(demo)
    audio = bytearray()
    mark = await read_until(ws, lambda m: m.get("type") == "mark", audio)
    assert mark == {"type": "mark", "name": "greeting-done"}
    assert tone_share(bytes(audio[: 16000 * 2 // 5]), 16000, CHIME_HZ[0]) > 0.5  # first 200 ms
    await ws.send(json.dumps(mark))  # sipbridge echoes the mark once the greeting has played
    caller = sine(700, 2.0, 16000)  # the echo is a 600 ms delay line fed by the caller
    audio.clear()
    for offset in range(0, len(caller), 640):
        await ws.send(caller[offset : offset + 640])
    while len(audio) < 16000:  # half a second of echo
        message = await ws.recv()
        assert isinstance(message, bytes)
        audio += message
    assert tone_share(bytes(audio[:16000]), 16000, 700) > 0.9
    await ws.send(json.dumps({"type": "dtmf", "digit": "5"}))
    await ws.send(json.dumps({"type": "dtmf", "digit": "#"}))
    end = await read_until(ws, lambda m: m.get("type") == "end-call", bytearray())
    assert end == {"type": "end-call", "reason": "assistant-ended-call"}
    await ws.close()


async def test_barge_in_clears_the_greeting(demo: DemoPipeline) -> None:
    ws = await open_call(demo, rate=8000)
    first = await ws.recv()
    assert isinstance(first, bytes)
    await ws.send(sine(700, 0.02, 8000))  # the caller talks over the greeting
    clear = await read_until(ws, lambda m: m.get("type") in ("clear", "mark"), bytearray())
    assert clear == {"type": "clear"}
    await ws.close()


async def test_a_session_without_a_start_message_is_closed(demo: DemoPipeline) -> None:
    ws = await connect(demo.url)
    await ws.send(json.dumps({"type": "hello"}))
    with pytest.raises(Exception, match="1008"):
        await ws.recv()


async def test_the_twilio_dialect_from_sipbridges_own_messages(demo: DemoPipeline) -> None:
    info = SessionInfo(
        call_id="c1",
        stream_id="s1",
        pbx_call_id="1.1",
        customer={},
        called_uri="sip:demo@x",
        headers={},
        variables={},
        assistant={"firstMessage": "Hello John"},
        phone_number=None,
        encoding="mulaw",
        sample_rate=8000,
    )
    dialect = TwilioDialect(info, "org")
    ws = await connect(demo.url, compression=None)
    for message in dialect.opening(info):
        await ws.send(message)
    audio = bytearray()

    def collect(message: dict[str, object]) -> bool:
        if message.get("event") == "media":
            payload = message["media"]["payload"]  # type: ignore[index]
            audio.extend(ulaw_to_pcm(base64.b64decode(payload)))
            return False
        return True

    mark = await read_until(ws, collect, bytearray())
    assert mark == {
        "event": "mark",
        "streamSid": dialect.stream_sid,
        "mark": {"name": "greeting-done"},
    }
    assert tone_share(bytes(audio[: 8000 * 2 // 5]), 8000, CHIME_HZ[0]) > 0.5
    await ws.send(dialect.mark("greeting-done"))
    caller = pcm_to_ulaw(sine(700, 2.0))
    for offset in range(0, len(caller), 160):
        await ws.send(dialect.audio(caller[offset : offset + 160]))
    audio.clear()
    while len(audio) < 8000:
        collect(json.loads(await ws.recv()))
    assert tone_share(bytes(audio[:8000]), 8000, 700) > 0.9
    await ws.send(dialect.dtmf("#"))
    end = await read_until(ws, lambda m: m.get("type") == "end-call", bytearray())
    assert end == {"type": "end-call", "reason": "assistant-ended-call"}
    await ws.close()
