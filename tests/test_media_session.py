"""The media session: a PBX leg (in memory, the MediaLeg interface) and a real websocket pipeline."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from bridge.audio import (
    PlayoutBuffer,
    Transcoder,
    pcm_to_ulaw,
    silence,
    sine,
    tone_share,
    ulaw_to_pcm,
)
from bridge.calls import EndedReason
from bridge.events import LegAudio, LegClosed, LegDtmf
from bridge.media.session import MediaSession, SessionResult
from bridge.pipeline import PipelineConnection
from bridge.protocol.pipeline import RawDialect
from bridge.settings import PipelineSettings
from tests.memory_leg import MemoryLeg
from tests.pipeline_server import PipelineServer, PipelineSession


@dataclass
class Control:
    """The call's side of the session's requests (the flow's CallControl), recorded."""

    transfers: list[Mapping[str, Any]] = field(default_factory=list)
    dtmf: list[str] = field(default_factory=list)
    reports: list[tuple[str, Mapping[str, Any]]] = field(default_factory=list)
    transfer_ok: bool = True

    async def transfer(self, destination: Mapping[str, Any]) -> bool:
        self.transfers.append(destination)
        return self.transfer_ok

    async def send_dtmf(self, digits: str) -> None:
        self.dtmf.append(digits)

    def report(self, kind: str, payload: Mapping[str, Any]) -> None:
        self.reports.append((kind, payload))


@dataclass
class Rig:
    leg: MemoryLeg
    hooks: Control
    ended: asyncio.Event
    session: MediaSession
    task: asyncio.Task[SessionResult]
    remote: PipelineSession


@pytest.fixture
async def server() -> AsyncIterator[PipelineServer]:
    running = PipelineServer()
    await running.start()
    yield running
    await running.stop()


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


async def owned(session: MediaSession) -> SessionResult:
    """Runs the session as its owner does: to its end, then the pipeline told why."""
    result = await session.run()
    await session.finish(result.reason.value if result.reason else "ended")
    return result


async def start(
    server: PipelineServer,
    clock: Any = None,
    encoding: str = "pcm_s16le",
    rate: int = 16000,
    taps: tuple[Any, ...] = (),
) -> Rig:
    index = len(server.sessions)
    stream = await PipelineConnection.open(server.url, {"X-Key": "k"}, PipelineSettings())
    dialect = RawDialect(encoding, rate)  # type: ignore[arg-type]
    await stream.send('{"type": "start", "callId": "c1"}')
    leg, hooks, ended = MemoryLeg(), Control(), asyncio.Event()
    session = MediaSession(
        leg=leg,
        stream=stream,
        dialect=dialect,
        transcoder=Transcoder(encoding, rate),
        playout=PlayoutBuffer(320, max_frames=3000),
        control=hooks,
        ended=ended,
        taps=taps,
        **({"clock": clock} if clock is not None else {}),
    )
    task = asyncio.ensure_future(owned(session))
    remote = await server.session(index)
    return Rig(leg, hooks, ended, session, task, remote)


async def test_caller_audio_reaches_the_pipeline_converted(server: PipelineServer) -> None:
    rig = await start(server)
    assert rig.remote.headers["x-key"] == "k"
    tone = sine(700, 1.0)
    for offset in range(0, len(tone), 320):
        rig.leg.inbox.put(LegAudio(tone[offset : offset + 320]))
    received = await rig.remote.wait_audio(30000)
    assert tone_share(received[:16000], 16000, 700) > 0.98  # 0.5 s at 16 kHz
    assert rig.remote.audio_messages >= 47  # one binary message per 20 ms frame
    rig.leg.inbox.put(LegDtmf("5"))
    await rig.remote.wait_control("dtmf", digit="5")
    rig.leg.inbox.put(LegClosed(by_caller=True))
    result = await rig.task
    assert (result.reason, result.caller_hung_up) == (EndedReason.CUSTOMER_ENDED_CALL, True)
    stop = await rig.remote.wait_control("stop")
    assert stop["reason"] == "customer-ended-call"


async def test_caller_audio_goes_out_in_the_legs_callback(server: PipelineServer) -> None:
    """[performance] the session takes a caller frame when the leg puts it: converted and
    written to the pipeline's socket before anything else runs (no reader task per frame)."""
    rig = await start(server)
    rig.leg.inbox.put(LegAudio(sine(700, 0.02)))
    await rig.remote.wait_audio(640)  # the session is running and took the first frame
    stats = rig.session.stats
    before = (stats.frames_from_pbx, stats.frames_to_pipeline)
    rig.leg.inbox.put(LegAudio(sine(700, 0.02)))
    assert (stats.frames_from_pbx, stats.frames_to_pipeline) == (before[0] + 1, before[1] + 1)
    await rig.remote.wait_audio(1280)
    rig.leg.inbox.put(LegClosed(by_caller=True))
    assert (await rig.task).reason is EndedReason.CUSTOMER_ENDED_CALL


@pytest.mark.parametrize(
    ("encoding", "rate"),
    [("pcm_s16le", 8000), ("pcm_s16le", 16000), ("pcm_s16le", 24000), ("mulaw", 8000)],
)
async def test_every_raw_format_carries_tones_both_ways(
    server: PipelineServer, encoding: str, rate: int
) -> None:
    rig = await start(server, encoding=encoding, rate=rate)
    tone = sine(700, 0.4)
    for offset in range(0, len(tone), 320):
        rig.leg.inbox.put(LegAudio(tone[offset : offset + 320]))
    width = 1 if encoding == "mulaw" else 2
    heard = await rig.remote.wait_audio(int(0.4 * rate) * width)
    pcm = ulaw_to_pcm(heard) if encoding == "mulaw" else heard
    assert tone_share(pcm[: int(0.3 * rate) * 2], rate, 700) > 0.95
    reply = sine(1300, 0.4, rate)
    await rig.remote.send(pcm_to_ulaw(reply) if encoding == "mulaw" else reply)
    await rig.remote.send_json({"type": "mark", "name": "said"})
    await rig.remote.wait_control("mark", name="said")
    assert rig.leg.tone_frames(1300) >= 18  # 0.4 s is 20 frames
    rig.ended.set()
    await rig.task


async def test_pipeline_bursts_are_reframed_and_paced_with_silence_between(
    server: PipelineServer,
) -> None:
    rig = await start(server)
    await rig.leg.wait_sent(3)
    assert all(frame == silence() for frame in rig.leg.sent)  # silence before anything is said
    burst = sine(1000, 0.5, 16000)
    for offset in range(0, len(burst), 3040):  # 95 ms chunks, as Pipecat sends them
        await rig.remote.send(burst[offset : offset + 3040])
    await rig.remote.send_json({"type": "mark", "name": "said"})
    await rig.remote.wait_control("mark", name="said")
    frames = list(rig.leg.sent)
    assert {len(frame) for frame in frames} == {320}
    spoken = [frame for frame in frames if frame != silence()]
    assert 24 <= len(spoken) <= 26  # 0.5 s in 20 ms frames
    assert sum(tone_share(frame, 8000, 1000) > 0.9 for frame in spoken[1:-1]) == len(spoken) - 2
    rig.ended.set()
    result = await rig.task
    assert result.reason is None and not result.caller_hung_up


async def send_chunks(remote: PipelineSession, pcm: bytes, chunk: int = 3200) -> None:
    """A reply as a TTS engine streams it: 100 ms chunks, faster than real time."""
    for offset in range(0, len(pcm), chunk):
        await remote.send(pcm[offset : offset + chunk])


async def test_clear_silences_at_once_and_reports_pending_marks(server: PipelineServer) -> None:
    rig = await start(server)
    await send_chunks(rig.remote, sine(1000, 3.0, 16000))
    await rig.remote.send_json({"type": "mark", "name": "end-of-reply"})
    await rig.leg.wait_sent(10)  # the reply is playing
    await rig.remote.send_json({"type": "clear"})
    cleared = await rig.remote.wait_control("mark", name="end-of-reply")  # cleared marks come back
    assert cleared == {"type": "mark", "name": "end-of-reply"}
    count = len(rig.leg.sent)
    await rig.leg.wait_sent(count + 5)
    after = rig.leg.sent[count:]
    assert all(frame == silence() for frame in after)
    assert rig.leg.tone_frames(1000) < 100  # far less than the 150 frames of the reply
    rig.ended.set()
    await rig.task


async def test_marks_come_back_in_order_after_their_audio(server: PipelineServer) -> None:
    rig = await start(server)
    first, second = sine(500, 0.2, 16000), sine(1500, 0.2, 16000)
    await rig.remote.send(first)
    await rig.remote.send_json({"type": "mark", "name": "m1"})
    await rig.remote.send(second)
    await rig.remote.send_json({"type": "mark", "name": "m2"})
    await rig.remote.wait_control("mark", name="m1")
    assert rig.leg.tone_frames(500) >= 9  # m1 was echoed only after the first reply went out
    assert rig.leg.tone_frames(1500) <= 1
    await rig.remote.wait_control("mark", name="m2")
    assert rig.leg.tone_frames(1500) >= 9
    assert [m["name"] for m in rig.remote.controls if m["type"] == "mark"] == ["m1", "m2"]
    rig.ended.set()
    await rig.task


async def test_end_call_plays_out_queued_audio_first(server: PipelineServer) -> None:
    rig = await start(server)
    await rig.remote.send(sine(800, 0.6, 16000))
    await rig.remote.send_json(
        {"type": "end-call", "reason": "assistant-said-end-call-phrase", "message": "Bye"}
    )
    result = await rig.task
    assert result.reason is EndedReason.ASSISTANT_SAID_END_CALL_PHRASE and result.message == "Bye"
    assert rig.leg.tone_frames(800) >= 28  # the goodbye was heard before the hang-up


async def test_a_goodbye_then_a_closed_stream_is_heard_whole(server: PipelineServer) -> None:
    # Pipecat's way: end-call as a message, then its EndFrame closes the websocket at once.
    rig = await start(server)
    await rig.remote.send(sine(800, 0.6, 16000))
    await rig.remote.send_json(
        {"type": "end-call", "reason": "assistant-ended-call-after-message-spoken"}
    )
    await rig.remote.ws.close(1000, "bye")
    result = await rig.task
    assert result.reason is EndedReason.ASSISTANT_ENDED_CALL_AFTER_MESSAGE
    assert rig.leg.tone_frames(800) >= 28


async def test_a_clean_close_plays_out_what_is_queued(server: PipelineServer) -> None:
    rig = await start(server)
    await rig.remote.send(sine(800, 0.4, 16000))
    await rig.remote.ws.close(1000, "done")
    result = await rig.task
    assert result.reason is EndedReason.ASSISTANT_ENDED_CALL
    assert rig.leg.tone_frames(800) >= 18


async def test_audio_after_end_call_cannot_keep_the_call_up(server: PipelineServer) -> None:
    rig = await start(server)
    await rig.remote.send_json({"type": "end-call"})
    result = await rig.task  # nothing queued: ends at once, whatever follows
    assert result.reason is EndedReason.ASSISTANT_ENDED_CALL

    clock = FakeClock()
    rig = await start(server, clock=clock)
    await rig.remote.send(sine(800, 0.1, 16000))
    await rig.remote.send_json({"type": "end-call"})
    await rig.remote.wait_for(lambda s: rig.session._ending is not None)
    clock.now += 60.0  # far past the goodbye's deadline
    await rig.remote.send(sine(800, 5.0, 16000))  # 250 frames that would keep it up
    result = await rig.task
    assert result.reason is EndedReason.ASSISTANT_ENDED_CALL
    assert rig.leg.tone_frames(800) < 50


async def test_pipeline_closing_cleanly_or_breaking(server: PipelineServer) -> None:
    rig = await start(server)
    await rig.remote.ws.close(1000, "done")
    result = await rig.task
    assert result.reason is EndedReason.ASSISTANT_ENDED_CALL and not result.caller_hung_up

    rig = await start(server)
    rig.remote.ws.transport.abort()
    result = await rig.task
    assert result.reason is EndedReason.PIPELINE_FAILED and "1006" in (result.message or "")


async def test_transfer_dtmf_reports_and_nonsense(server: PipelineServer) -> None:
    rig = await start(server)
    await rig.remote.send("not json")
    await rig.remote.send_json({"type": "warp-drive"})
    await rig.remote.send_json({"type": "send-dtmf", "digits": "12"})
    await rig.remote.send_json(
        {"type": "transcript", "role": "user", "transcript": "hello", "transcriptType": "final"}
    )
    rig.hooks.transfer_ok = False
    await rig.remote.send_json(
        {"type": "transfer", "destination": {"type": "number", "number": "+1555"}}
    )
    await rig.leg.wait_sent(2)
    rig.hooks.transfer_ok = True
    await rig.remote.send_json(
        {"type": "transfer", "destination": {"type": "sip", "sipUri": "sip:a@b"}}
    )
    result = await rig.task
    assert result.reason is EndedReason.ASSISTANT_FORWARDED_CALL
    assert rig.hooks.dtmf == ["12"]
    assert rig.hooks.reports[0][0] == "transcript"
    assert [d["type"] for d in rig.hooks.transfers] == ["number", "sip"]
    assert rig.session.stats.ignored_messages == 2


async def test_ignored_messages_are_logged_once_per_kind(
    server: PipelineServer, caplog: pytest.LogCaptureFixture
) -> None:
    rig = await start(server)
    with caplog.at_level(logging.WARNING):
        for _ in range(20):
            await rig.remote.send("not json")
        await rig.remote.send_json({"type": "warp-drive"})
        await rig.remote.send_json({"type": "hyper-drive"})
        await rig.remote.send_json({"type": "mark"})
        await rig.remote.send_json({"type": "end-call"})
        await rig.task
    assert rig.session.stats.ignored_messages == 23
    assert [r.getMessage() for r in caplog.records if "ignored a pipeline" in r.getMessage()] == [
        "ignored a pipeline message: text frame is not JSON (logged once per call)",
        "ignored a pipeline message: unknown message type: 'warp-drive' (logged once per call)",
        "ignored a pipeline message: mark without a usable name (logged once per call)",
    ]


async def test_a_broken_leg_ends_with_the_media_reason(server: PipelineServer) -> None:
    rig = await start(server)
    rig.leg.inbox.put(LegClosed(by_caller=False, detail="garbage"))
    result = await rig.task
    assert result.reason is EndedReason.MEDIA_LEG_CLOSED and not result.caller_hung_up


@dataclass
class RecordingTap:
    """A media tap that keeps every frame (what a call recorder sees)."""

    said: list[bytes] = field(default_factory=list)
    heard: list[bytes] = field(default_factory=list)
    closed: bool = False

    def caller_audio(self, pcm: bytes) -> None:
        self.said.append(pcm)

    def played_audio(self, pcm: bytes) -> None:
        self.heard.append(pcm)

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        assert self.closed

    def counters(self) -> dict[str, int]:
        return {"tappedFrames": len(self.heard)}


class BrokenTap(RecordingTap):
    def played_audio(self, pcm: bytes) -> None:
        raise OSError("No space left on device")


async def test_a_tap_sees_both_directions_as_the_caller_did(server: PipelineServer) -> None:
    tap, broken = RecordingTap(), BrokenTap()
    rig = await start(server, taps=(broken, tap))
    caller = sine(700, 0.2)
    frames = [caller[offset : offset + 320] for offset in range(0, len(caller), 320)]
    for frame in frames:
        rig.leg.inbox.put(LegAudio(frame))
    await send_chunks(rig.remote, sine(1000, 2.0, 16000))
    await rig.leg.wait_sent(20)  # the reply is playing
    await rig.remote.send_json({"type": "clear"})
    count = len(rig.leg.sent)
    await rig.leg.wait_sent(count + 5)
    rig.leg.inbox.put(LegClosed(by_caller=True))
    await rig.task
    assert tap.said == frames  # the caller's audio, byte for byte
    # What the caller heard, frame for frame: the reply, then silence once cleared.
    assert tap.heard == rig.leg.sent
    assert tap.heard[count:] and all(frame == silence() for frame in tap.heard[count + 1 :])
    assert sum(tone_share(frame, 8000, 1000) > 0.9 for frame in tap.heard) >= 15
    assert tap.closed
    # A tap that fails is dropped after its first failure; the call went on to its end.
    assert broken.heard == [] and not broken.closed


async def test_a_starved_event_loop_sheds_audio_instead_of_playing_it_ever_later(
    server: PipelineServer,
) -> None:
    """[performance] overload: the delay a caller hears stays bounded when the loop starves.

    The event loop is blocked for 0.6 s (what a saturated machine does to every call at once).
    The reply's frames due meanwhile are shed and counted, not played late: after the stall
    the caller hears the part of the reply that is due now. No timing is asserted beyond the
    bound's own arithmetic: a stall of at least 0.6 s passes at least 29 ticks, of which the
    pacer catches up 5 (``max_late_s``) at most, so at least 25 frames are shed.
    """
    tap = RecordingTap()
    rig = await start(server, taps=(tap,))
    await send_chunks(rig.remote, sine(1000, 3.0, 16000))
    await rig.remote.send_json({"type": "mark", "name": "end-of-reply"})
    await rig.leg.wait_sent(10)  # the reply is playing
    time.sleep(0.6)  # noqa: ASYNC251 - the point: a starved event loop, not a wait
    count = len(rig.leg.sent)
    await rig.leg.wait_sent(count + 3)
    playout = rig.session.playout
    assert playout.shed_frames >= 25
    # The tap heard silence for every tick that passed without a frame: it keeps the call's time.
    assert len(tap.heard) == len(rig.leg.sent) + playout.shed_frames
    # The end-of-reply mark still comes back once its audio's time has passed, played or shed.
    await rig.remote.wait_control("mark", name="end-of-reply")
    rig.ended.set()
    await rig.task
    assert rig.session.stats.shed_stalls >= 1
    assert playout.pushed_frames == 150
    assert playout.played_frames + playout.shed_frames + playout.queued_frames == 150
