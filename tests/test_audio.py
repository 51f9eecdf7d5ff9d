from __future__ import annotations

import array
import random

import pytest

from bridge.audio import (
    Pacer,
    PlayoutBuffer,
    Reframer,
    Resampler,
    Transcoder,
    frame_bytes,
    mix,
    pcm_to_ulaw,
    rms,
    silence,
    sine,
    split_frames,
    stereo,
    tone_share,
    ulaw_to_pcm,
)


def test_frame_sizes() -> None:
    assert frame_bytes(8000) == 320 and frame_bytes(16000) == 640 and frame_bytes(24000) == 960
    assert silence() == bytes(320)


def test_ulaw_round_trip_keeps_the_tone() -> None:
    tone = sine(700, 1.0)
    encoded = pcm_to_ulaw(tone)
    assert len(encoded) == len(tone) // 2
    assert tone_share(ulaw_to_pcm(encoded), 8000, 700) > 0.99


@pytest.mark.parametrize(
    ("source", "target"), [(8000, 16000), (16000, 8000), (8000, 24000), (24000, 8000)]
)
def test_streaming_resampling_equals_one_shot(source: int, target: int) -> None:
    tone = sine(440, 1.0, source)
    whole = Resampler(source, target).convert(tone)
    streaming = Resampler(source, target)
    chunked = b"".join(
        streaming.convert(tone[i : i + frame_bytes(source)])
        for i in range(0, len(tone), frame_bytes(source))
    )
    assert chunked == whole  # the carried state loses no sample at frame edges
    assert abs(len(chunked) - len(tone) * target // source) <= 4
    half_second = chunked[:target]  # 0.5 s holds a whole number of 440 Hz cycles
    assert tone_share(half_second, target, 440) > 0.98


def test_downsampling_filters_what_would_alias() -> None:
    """What the caller hears of a 16 or 24 kHz TTS voice: the telephone band, no fold-back."""
    for source, high in ((16000, 6000), (24000, 10000), (24000, 5000)):
        passed = rms(Resampler(source, 8000).convert(sine(1000, 0.5, source))[800:])
        folded = rms(Resampler(source, 8000).convert(sine(high, 0.5, source))[800:])
        assert abs(passed / rms(sine(1000, 0.5, source)) - 1) < 0.06  # within 0.5 dB
        assert folded < passed / 300  # about 50 dB down (ratecv keeps it whole, as an alias)
    # The band edge still passes: 3.4 kHz is the top of the telephone band.
    edge = Resampler(16000, 8000).convert(sine(3400, 0.5, 16000))[800:]
    assert rms(edge) > 0.85 * rms(sine(3400, 0.5, 8000))


def test_upsampling_leaves_no_images() -> None:
    out = Resampler(8000, 16000).convert(sine(1000, 0.5, 8000))[1600:]
    assert tone_share(out, 16000, 1000) > 0.99
    assert tone_share(out, 16000, 7000) < 1e-4  # linear interpolation leaves an image here


def test_resampler_delay_and_reset() -> None:
    for source, target in ((8000, 16000), (16000, 8000), (8000, 24000), (24000, 8000)):
        resampler = Resampler(source, target)
        assert resampler.uses_fir
        assert resampler.delay_samples / target < 0.002  # under 2 ms: nothing a caller notices
        resampler.convert(sine(1000, 0.1, source))
        resampler.reset()  # a barge-in: the old reply's tail must not come out
        assert resampler.convert(bytes(frame_bytes(source))) == bytes(frame_bytes(target))


def test_other_ratios_fall_back_to_ratecv_with_carried_state() -> None:
    tone = sine(440, 0.5, 22050)
    resampler = Resampler(22050, 24000)
    assert not resampler.uses_fir
    chunked = b"".join(resampler.convert(tone[i : i + 882]) for i in range(0, len(tone), 882))
    assert chunked == Resampler(22050, 24000).convert(tone)
    assert tone_share(chunked[:24000], 24000, 440) > 0.98


def test_transcoder_both_directions() -> None:
    pcm16 = Transcoder("pcm_s16le", 16000)
    frame = sine(1000, 0.02)
    assert len(pcm16.to_pipeline(frame)) == 640
    mulaw = Transcoder("mulaw", 16000)  # μ-law is always 8 kHz
    assert mulaw.pipeline_rate == 8000
    assert len(mulaw.to_pipeline(frame)) == 160
    assert len(mulaw.from_pipeline(bytes(160))) == 320
    assert pcm16.from_pipeline(b"\x01") == b""  # an odd trailing byte waits for its pair
    with pytest.raises(ValueError):
        Transcoder("opus", 48000)


def test_pcm_split_inside_a_sample_is_joined() -> None:
    tone = sine(1000, 0.1, 16000)
    whole = Transcoder("pcm_s16le", 16000).from_pipeline(tone)
    split = Transcoder("pcm_s16le", 16000)
    pieces = b"".join(
        split.from_pipeline(tone[a:b]) for a, b in ((0, 161), (161, 1001), (1001, len(tone)))
    )
    assert pieces == whole
    # A clear forgets a held byte: the next reply starts on a sample boundary.
    split.from_pipeline(b"\x01")
    split.clear_from_pipeline()
    fresh = Transcoder("pcm_s16le", 16000)
    assert split.from_pipeline(tone) == fresh.from_pipeline(tone)


def test_reframer_cuts_any_chunking_into_frames() -> None:
    reframer = Reframer(320)
    data = bytes(range(256)) * 5  # 1280 bytes = 4 frames
    frames = []
    for size in (1, 300, 19, 700, 260):
        frames += reframer.push(data[:size])
        data = data[size:]
    assert b"".join(frames) == (bytes(range(256)) * 5)[: len(frames) * 320]
    assert len(frames) == 4 and reframer.pending_bytes == 0
    reframer.push(b"\x05" * 10)
    assert reframer.flush() == b"\x05" * 10 + bytes(310)
    assert reframer.flush() is None


def test_playout_silence_fill_and_order() -> None:
    buffer = PlayoutBuffer(4, max_frames=10)
    assert buffer.next_frame() == (bytes(4), [])
    buffer.push(b"aaaabbbbcc")
    assert buffer.queued_frames == 2
    assert buffer.next_frame() == (b"aaaa", [])
    assert buffer.next_frame() == (b"bbbb", [])
    assert buffer.next_frame() == (b"cc\x00\x00", [])  # the utterance's end, padded
    assert buffer.next_frame() == (bytes(4), [])
    assert buffer.silence_frames == 2


def test_marks_are_played_after_their_audio() -> None:
    buffer = PlayoutBuffer(4, max_frames=10)
    assert buffer.mark("first") == ["first"]  # nothing queued: played at once
    buffer.push(b"aaaabb")
    assert buffer.mark("m1") == []  # inside a frame: released with the frame that holds "bb"
    buffer.push(b"cccc")
    assert buffer.mark("m2") == []
    assert buffer.next_frame() == (b"aaaa", [])
    assert buffer.next_frame() == (b"bbcc", ["m1"])  # no silence inserted for the mark
    # Underrun with "cc" left: the end of the utterance goes out padded, with its mark.
    assert buffer.next_frame() == (b"cc\x00\x00", ["m2"])
    assert buffer.idle and buffer.silence_frames == 0


def test_a_mark_after_every_chunk_keeps_the_audio_continuous() -> None:
    buffer = PlayoutBuffer(320, max_frames=1000)
    tone = sine(1000, 1.0)
    names = []
    for index, offset in enumerate(range(0, len(tone), 1500)):
        buffer.push(tone[offset : offset + 1500])
        names.append(f"m{index}")
        assert buffer.mark(names[-1]) == []
    frames, echoed = [], []
    while not buffer.idle:
        frame, marks = buffer.next_frame()
        frames.append(frame)
        echoed += marks
    assert b"".join(frames) == tone  # 1 s is exactly 50 frames: no padding anywhere
    assert echoed == names


def test_clear_drops_audio_and_reports_waiting_marks() -> None:
    buffer = PlayoutBuffer(4, max_frames=10)
    buffer.push(b"aaaabbbb")
    buffer.mark("m1")
    buffer.push(b"cccc")
    buffer.mark("m2")
    buffer.push(b"dd")
    buffer.mark("m3")  # inside the partial frame "dd"
    assert buffer.clear() == ["m1", "m2", "m3"]
    assert buffer.next_frame() == (bytes(4), [])  # silence on the very next frame
    buffer.push(b"eeee")
    assert buffer.next_frame() == (b"eeee", [])  # the cleared partial frame is gone too


def test_playout_is_bounded() -> None:
    buffer = PlayoutBuffer(4, max_frames=2)
    assert buffer.push(b"a" * 16) == 2
    assert buffer.queued_frames == 2 and buffer.dropped_frames == 2


def test_pacer_keeps_an_absolute_schedule() -> None:
    pacer = Pacer(100.0)
    assert pacer.next_due == 100.0
    for n in range(1, 51):
        now = 100.0 + n * 0.02 - 0.019  # each send slightly early or late does not drift
        assert pacer.skip_missed(now) == 0
        pacer.sent()
    assert pacer.next_due == pytest.approx(101.0)


def test_a_pacer_far_behind_restarts_and_says_what_it_missed() -> None:
    """[performance] overload: a starved writer sheds instead of playing ever later."""
    pacer = Pacer(100.0, max_late_s=0.1)
    pacer.sent()
    assert pacer.skip_missed(100.02 + 0.09) == 0  # 90 ms late: caught up frame by frame
    assert pacer.resets == 0
    # 0.5 s late: 25 ticks passed; the frame sent now stands for the last of them.
    assert pacer.skip_missed(100.52) == 25
    assert pacer.resets == 1
    pacer.sent()
    assert pacer.next_due == pytest.approx(100.54)


def test_skip_drops_the_frames_whose_time_passed_and_releases_their_marks() -> None:
    buffer = PlayoutBuffer(4, max_frames=10)
    buffer.push(b"aaaabbbb")
    buffer.mark("m1")
    buffer.push(b"ccccdddd")
    buffer.mark("m2")
    assert buffer.skip(2) == (2, ["m1"])  # m1's place passed with the frames before it
    assert buffer.next_frame() == (b"cccc", [])
    assert buffer.skip(5) == (1, ["m2"])  # fewer queued than missed
    assert buffer.idle and buffer.skip(3) == (0, [])


@pytest.mark.parametrize("seed", range(20))
def test_every_frame_pushed_is_accounted_for(seed: int) -> None:
    """played + dropped (full) + shed + cleared + still queued == pushed, whatever happens."""
    rng = random.Random(seed)
    buffer = PlayoutBuffer(4, max_frames=6)
    for _ in range(200):
        action = rng.choice(["push", "push", "next", "next", "skip", "clear", "mark"])
        if action == "push":
            buffer.push(bytes(rng.randrange(0, 30)))
        elif action == "next":
            buffer.next_frame()
        elif action == "skip":
            buffer.skip(rng.randrange(0, 5))
        elif action == "clear":
            buffer.clear()
        else:
            buffer.mark("m")
        assert buffer.pushed_frames == (
            buffer.played_frames
            + buffer.dropped_frames
            + buffer.shed_frames
            + buffer.cleared_frames
            + buffer.queued_frames
        )


def test_tone_share_tells_tones_apart() -> None:
    assert tone_share(sine(700, 1.0), 8000, 700) > 0.99
    assert tone_share(sine(700, 1.0), 8000, 750) < 0.01
    assert tone_share(bytes(16000), 8000, 700) == 0.0
    both = mix(sine(700, 1.0), sine(1200, 1.0))
    assert 0.4 < tone_share(both, 8000, 700) < 0.6
    assert rms(bytes(320)) == 0 and 6900 < rms(sine(700, 0.2)) < 7000


def test_stereo_puts_the_first_signal_left() -> None:
    left, right = sine(440, 0.1), sine(1000, 0.1)
    both = array.array("h")
    both.frombytes(stereo(left, right))
    assert both[0::2].tobytes() == left and both[1::2].tobytes() == right
    assert len(stereo(left, right[:10])) == 20


def test_split_frames_cuts_20_ms_frames_at_the_rate() -> None:
    tone = sine(440, 0.05, 16000)  # 2.5 frames at 16 kHz
    pieces = split_frames(tone, 16000)
    assert [len(piece) for piece in pieces] == [640, 640, 320] and b"".join(pieces) == tone
