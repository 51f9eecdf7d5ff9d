"""The demo pipeline, driven the way sipbridge drives a pipeline (raw dialect)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from websockets.asyncio.client import ClientConnection, connect

from bridge.audio import sine, tone_share
from bridge.demo import CHIME_HZ, DemoPipeline, chime, dtmf_tone


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
