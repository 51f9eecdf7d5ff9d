"""The recording's alignment and mixing, checked by content, and its signed links."""

from __future__ import annotations

import array
from datetime import UTC, datetime
from urllib.parse import parse_qsl, urlsplit

from bridge.audio import frame_bytes, silence, sine, split_frames, tone_share
from bridge.recording import (
    FrameAligner,
    RecordingLinks,
    link_valid,
    rate_of_frame,
    sign,
    was_recorded,
)

FRAME = frame_bytes(8000)


def channels(stereo_pcm: bytes) -> tuple[bytes, bytes]:
    samples = array.array("h")
    samples.frombytes(stereo_pcm)
    return samples[0::2].tobytes(), samples[1::2].tobytes()


def test_caller_left_played_right_mono_both() -> None:
    aligner = FrameAligner()
    stereo, mono = [], []
    for said, heard in zip(
        split_frames(sine(440, 0.5)), split_frames(sine(1000, 0.5)), strict=True
    ):
        aligner.caller(said)
        frame = aligner.tick(heard)
        stereo.append(frame.stereo)
        mono.append(frame.mono)
    left, right = channels(b"".join(stereo))
    assert tone_share(left, 8000, 440) > 0.95 and tone_share(left, 8000, 1000) < 0.01
    assert tone_share(right, 8000, 1000) > 0.95 and tone_share(right, 8000, 440) < 0.01
    both = b"".join(mono)
    assert tone_share(both, 8000, 440) > 0.4 and tone_share(both, 8000, 1000) > 0.4


def test_one_frame_per_tick_silence_where_the_caller_sent_nothing() -> None:
    aligner = FrameAligner()
    aligner.caller(sine(440, 0.02))
    recorded = [aligner.tick(silence()) for _ in range(5)]
    assert aligner.ticks == 5
    assert all(len(frame.stereo) == 2 * FRAME and len(frame.mono) == FRAME for frame in recorded)
    assert recorded[0].mono != silence()
    assert all(frame.stereo == bytes(2 * FRAME) for frame in recorded[1:])


def test_a_cleared_assistant_is_silent_on_the_right() -> None:
    aligner = FrameAligner()
    played = split_frames(sine(1000, 0.1)) + [silence()] * 5  # the pipeline cleared: silence played
    right = b""
    for heard in played:
        aligner.caller(split_frames(sine(440, 0.02))[0])
        right += channels(aligner.tick(heard).stereo)[1]
    assert tone_share(right[: 5 * FRAME], 8000, 1000) > 0.95
    assert right[5 * FRAME :] == bytes(5 * FRAME)


def test_a_caller_burst_keeps_the_newest_frames_and_counts_the_rest() -> None:
    aligner = FrameAligner(backlog_frames=3)
    for level in range(1, 6):
        aligner.caller(array.array("h", [level] * (FRAME // 2)).tobytes())
    assert aligner.dropped_caller_frames == 2
    left = channels(aligner.tick(silence()).stereo)[0]
    assert array.array("h", left)[0] == 3


def test_a_short_caller_frame_is_padded_to_the_tick() -> None:
    aligner = FrameAligner()
    aligner.caller(b"\x01\x00" * 10)
    frame = aligner.tick(silence())
    assert len(frame.mono) == FRAME and frame.mono[:20] == b"\x01\x00" * 10


def test_rate_from_a_frame() -> None:
    assert rate_of_frame(silence(8000)) == 8000
    assert rate_of_frame(silence(16000)) == 16000


def test_links_are_signed_and_expire() -> None:
    secret = b"s" * 32
    signature = sign(secret, "call-1", "stereo", 1000)
    assert link_valid(secret, "call-1", "stereo", expires=1000, signature=signature, now=999.0)
    assert not link_valid(secret, "call-1", "stereo", expires=1000, signature=signature, now=1000)
    assert not link_valid(secret, "call-1", "mono", expires=1000, signature=signature, now=1.0)
    assert not link_valid(secret, "call-2", "stereo", expires=1000, signature=signature, now=1.0)
    assert not link_valid(secret, "call-1", "stereo", expires=2000, signature=signature, now=1.0)
    assert not link_valid(b"t" * 32, "call-1", "stereo", expires=1000, signature=signature, now=1)


def test_artifact_links_are_vapi_shaped_and_verify() -> None:
    links = RecordingLinks(b"k" * 32, "https://sb.example.com", lifetime_s=3600)
    now = datetime(2026, 12, 6, 1, 0, tzinfo=UTC)
    artifact = links.artifact("call/1", now)
    assert artifact["recording"] == {
        "stereoUrl": artifact["stereoRecordingUrl"],
        "mono": {"combinedUrl": artifact["recordingUrl"]},
    }
    assert artifact["presignedUrlsExpiresAt"] == "2026-12-06T02:00:00.000Z"
    url = urlsplit(artifact["stereoRecordingUrl"])
    assert (url.scheme, url.netloc, url.path) == (
        "https",
        "sb.example.com",
        "/recording/call%2F1.stereo.wav",
    )
    query = dict(parse_qsl(url.query))
    expires = int(query["expires"])
    assert expires == int(now.timestamp()) + 3600
    signature = query["signature"]
    assert links.valid("call/1", "stereo", expires=expires, signature=signature, now=0)
    assert not links.valid("call/1", "mono", expires=expires, signature=signature, now=0)
    assert "mono.wav" in artifact["recordingUrl"]


def test_a_rotated_key_keeps_the_links_it_signed_until_they_expire() -> None:
    old = RecordingLinks(b"o" * 32, "https://sb.example.com", lifetime_s=3600)
    now = datetime(2026, 12, 6, 1, 0, tzinfo=UTC)
    query = dict(parse_qsl(urlsplit(old.url("c1", "stereo", now)).query))
    expires, signature = int(query["expires"]), query["signature"]
    rotated = RecordingLinks(b"n" * 32, "https://sb.example.com", 3600, previous=(b"o" * 32,))
    assert rotated.valid("c1", "stereo", expires=expires, signature=signature, now=0)
    assert not rotated.valid("c1", "stereo", expires=expires, signature=signature, now=expires)
    new_query = dict(parse_qsl(urlsplit(rotated.url("c1", "stereo", now)).query))
    assert new_query["signature"] == sign(b"n" * 32, "c1", "stereo", expires)  # new key signs
    forgotten = RecordingLinks(b"n" * 32, "https://sb.example.com", 3600)
    assert not forgotten.valid("c1", "stereo", expires=expires, signature=signature, now=0)


def test_recorded_by_the_counters() -> None:
    assert was_recorded({"recordedFrames": 3}) and not was_recorded({"recordedFrames": 0})
    assert not was_recorded({})
    assert not was_recorded({"recordedFrames": 3, "recordingFailed": 1})
