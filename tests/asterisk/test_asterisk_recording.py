"""Call recordings end to end through real Asterisk 22 and SIPp ([recording] issue).

A SIPp caller plays 700 Hz; the pipeline replies with 1200 Hz and clears it once the caller
has heard about a second of it. Also: a recordings directory that fills up mid-call. The stereo WAV is checked by content: the caller's tone on the
left, the reply on the right for as long as the caller heard it and silence after the clear,
one frame per 20 ms the caller heard. The report's signed links and the API's keyed route
serve the same bytes.
"""

from __future__ import annotations

import array
import asyncio
import io
import pathlib
import wave

import aiohttp
import pytest

from bridge.audio import rms, sine, split_frames, tone_share
from bridge.lab.sipp import CallPlan
from bridge.recordings import recording_path
from tests.asterisk.test_asterisk_calls import reply_tone
from tests.asterisk.test_asterisk_pipeline import PipelineWire, ToneCounter, tone_packets
from tests.asterisk_harness import API_KEY, AsteriskLab, share_of_windows
from tests.pipeline_server import PipelineSession
from tests.test_recordings import small_disk

pytestmark = [pytest.mark.asterisk, pytest.mark.integration]

FRAME_BYTES = 320  # 20 ms of 8 kHz 16-bit mono
RAW = PipelineWire("raw")


async def test_a_call_is_recorded_as_the_caller_heard_it(asterisk_lab: AsteriskLab) -> None:
    lab = asterisk_lab
    reply_heard = ToneCounter(1200)

    async def script(session: PipelineSession) -> None:
        await RAW.reply(session, sine(1200, 6.0, RAW.rate))
        assert lab.listening is not None
        await asyncio.wait_for(
            lab.listening.wait_until(lambda capture: reply_heard(capture) >= 50), 15
        )
        await RAW.clear(session)

    lab.pipeline.script = script
    await lab.serve_assistant()
    service = lab.service
    assert service is not None
    result, rtp = await lab.call(
        CallPlan(user="demo", tone_file=lab.tone_file(700), talk_ms=4000, listen_ms=1000),
        capture=True,
    )
    assert result.answered and result.bye_from_caller
    report = (await lab.sink.wait_for_message("end-of-call-report")).message
    call_id = report["call"]["id"]
    media = report["call"]["sipbridge"]["media"]
    artifact = report["artifact"]

    async with aiohttp.ClientSession() as anonymous:
        async with anonymous.get(artifact["stereoRecordingUrl"]) as response:
            assert response.status == 200
            stereo_file = await response.read()
        async with anonymous.get(artifact["recordingUrl"]) as response:
            mono_file = await response.read()
        async with anonymous.get(
            f"http://127.0.0.1:{service.api_port}/call/{call_id}/recording",
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as response:
            assert await response.read() == stereo_file
    on_disk = recording_path(service.recordings_path, call_id, "stereo")
    assert await asyncio.to_thread(on_disk.read_bytes) == stereo_file

    with wave.open(io.BytesIO(stereo_file)) as recording:
        assert (recording.getnchannels(), recording.getframerate()) == (2, 8000)
        samples = array.array("h", recording.readframes(recording.getnframes()))
    said, heard = samples[0::2].tobytes(), samples[1::2].tobytes()
    # One frame per 20 ms the caller heard: within a frame of what went to the caller.
    assert len(heard) // FRAME_BYTES == media["recordedFrames"]
    assert abs(media["recordedFrames"] - media["framesToCaller"]) <= 1, media
    # The caller's 700 Hz on the left, for the four seconds the caller spoke.
    fraction, count = share_of_windows(said[: 4 * 16000], 8000, 700)
    assert count == 4 and fraction >= 0.75, (fraction, count)
    # On the right, the 1200 Hz reply for as long as the caller heard it, then silence.
    reply_ticks = [
        i for i, tick in enumerate(split_frames(heard)) if tone_share(tick, 8000, 1200) > 0.5
    ]
    assert abs(len(reply_ticks) - tone_packets(rtp, 1200)) <= 2, (len(reply_ticks), media)
    assert reply_ticks == list(range(reply_ticks[0], reply_ticks[-1] + 1))  # one stretch
    assert rms(heard[(reply_ticks[-1] + 1) * FRAME_BYTES :]) == 0  # silent after the clear
    assert tone_share(said[: 4 * 16000], 8000, 1200) < 0.01  # no reply leaks left
    with wave.open(io.BytesIO(mono_file)) as recording:
        assert recording.getnchannels() == 1
        assert recording.getnframes() == len(heard) // 2
    assert await lab.no_channels_left() == []


async def test_a_call_whose_assistant_says_no_is_not_recorded(asterisk_lab: AsteriskLab) -> None:
    lab = asterisk_lab
    await lab.serve_assistant(artifactPlan={"recordingEnabled": False})
    result, _ = await lab.call(CallPlan(user="demo", tone_file=lab.tone_file(700), talk_ms=1000))
    assert result.answered
    report = (await lab.sink.wait_for_message("end-of-call-report")).message
    assert "recordingUrl" not in report["artifact"]
    assert lab.service is not None
    assert not await asyncio.to_thread(lab.service.recordings_path.exists)


async def test_a_full_disk_stops_the_recording_not_the_call(
    asterisk_lab: AsteriskLab, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The recordings' filesystem (64 KiB, about 1.3 s of a call's two files) fills up early
    in a 5 s call: the recording stops (logged, counted, not linked), the call does not."""
    lab = asterisk_lab
    lab.pipeline.script = reply_tone(1200, 6.0)  # type: ignore[assignment]
    with small_disk(tmp_path / "disk") as disk:
        service = await lab.start_service(recordings={"path": str(disk)})
        assistant = await lab.assistant()
        await lab.number(assistantId=assistant["id"])
        result, rtp = await lab.call(
            CallPlan(user="demo", tone_file=lab.tone_file(700), talk_ms=5000, listen_ms=0),
            capture=True,
        )
        report = (await lab.sink.wait_for_message("end-of-call-report")).message
        call_id = report["call"]["id"]
        with wave.open(str(recording_path(disk, call_id, "stereo"))) as recording:
            kept = recording.getnframes()  # playable as far as its header says
            assert 0 < kept < 3 * 8000
    assert result.answered and result.bye_from_caller
    assert report["endedReason"] == "customer-ended-call"
    media = report["call"]["sipbridge"]["media"]
    assert media["recordingFailed"] == 1 and "recordingUrl" not in report["artifact"]
    # The caller heard the reply to the end, long after the disk was full.
    assert rtp is not None
    fraction, count = share_of_windows(rtp.pcm()[2 * 16000 :], 8000, 1200)
    assert count >= 2 and fraction >= 0.75, (fraction, count)
    assert f"recording of call {call_id} stopped" in caplog.text
    assert b"sipbridge_recordings_stopped_total 1.0" in service.metrics.render()
    assert await lab.no_channels_left() == []
