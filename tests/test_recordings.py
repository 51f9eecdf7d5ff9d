"""Recordings on disk: the tap through the writer's thread to WAV files, read back by content;
a crash mid-call, a full disk, retention and the size cap, and who gets recorded."""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import os
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from bridge.audio import frame_bytes, silence, sine, split_frames, tone_share
from bridge.calls import Call
from bridge.recording import Channel
from bridge.recordings import (
    CHUNK_FRAMES,
    Recorder,
    Recording,
    RecordingWriter,
    clean_up,
    recorder_factory,
    recording_path,
    recording_wanted,
)
from bridge.routing import Accept, PipelineTarget

FRAME = frame_bytes(8000)


def read(path: Path) -> tuple[wave._wave_params, bytes]:
    with wave.open(str(path), "rb") as file:
        return file.getparams(), file.readframes(file.getnframes())


def left_right(stereo_pcm: bytes) -> tuple[bytes, bytes]:
    samples = array.array("h")
    samples.frombytes(stereo_pcm)
    return samples[0::2].tobytes(), samples[1::2].tobytes()


@pytest.fixture
def writer() -> Iterator[RecordingWriter]:
    writer = RecordingWriter()
    writer.start()
    yield writer
    writer.close()


def play_call(recorder: Recorder, seconds: float, *, clear_after_s: float | None = None) -> int:
    """The caller says 440 Hz, the assistant plays 1000 Hz (silence once cleared); the ticks."""
    said, heard = split_frames(sine(440, seconds)), split_frames(sine(1000, seconds))
    for index, (caller, played) in enumerate(zip(said, heard, strict=True)):
        recorder.caller_audio(caller)
        cleared = clear_after_s is not None and index >= clear_after_s * 50
        recorder.played_audio(silence() if cleared else played)
    return len(heard)


def test_a_call_is_recorded_stereo_and_mono(tmp_path: Path, writer: RecordingWriter) -> None:
    recording = Recording("call-1", tmp_path / "recordings")
    recorder = Recorder(recording, writer)
    ticks = play_call(recorder, 2.5, clear_after_s=2.0)
    recorder.close()
    writer.close()
    params, stereo = read(recording_path(tmp_path / "recordings", "call-1", "stereo"))
    assert (params.nchannels, params.sampwidth, params.framerate) == (2, 2, 8000)
    assert params.nframes == ticks * FRAME // 2  # the call's duration, to the frame
    left, right = left_right(stereo)
    assert tone_share(left, 8000, 440) > 0.95
    assert tone_share(right[: 2 * 8000 * 2], 8000, 1000) > 0.95
    assert right[2 * 8000 * 2 :] == bytes(len(right) - 2 * 8000 * 2)  # silent after the clear
    params, mono = read(recording_path(tmp_path / "recordings", "call-1", "mono"))
    assert (params.nchannels, params.nframes) == (1, ticks * FRAME // 2)
    assert tone_share(mono[: 8000 * 2], 8000, 1000) > 0.4
    assert tone_share(mono[: 8000 * 2], 8000, 440) > 0.4
    assert recorder.counters() == {
        "recordedFrames": ticks,
        "recordingCallerFramesDropped": 0,
        "recordingChunksDropped": 0,
        "recordingFailed": 0,
    }


CRASHING_CALL = """
import os, sys
from pathlib import Path
from bridge.audio import sine
from bridge.recordings import Recorder, Recording, RecordingWriter
writer = RecordingWriter()
writer.start()
recorder = Recorder(Recording("crashed", Path(sys.argv[1])), writer)
tone = sine(1000, 1.5)
for offset in range(0, len(tone), 320):
    recorder.played_audio(tone[offset : offset + 320])
writer.close()  # the chunks handed on are written; the recording itself is never closed
os._exit(9)  # and nothing is flushed or closed at exit: as a crash leaves it
"""


def test_a_crash_mid_call_leaves_a_playable_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", CRASHING_CALL, str(tmp_path)],
        cwd=Path(__file__).parent.parent,
        check=False,
        timeout=60,
    )
    assert result.returncode == 9
    params, stereo = read(recording_path(tmp_path, "crashed", "stereo"))
    # The whole seconds were handed to the writer; the half second still gathering was lost.
    assert params.nframes == CHUNK_FRAMES * FRAME // 2
    assert tone_share(left_right(stereo)[1], 8000, 1000) > 0.95
    assert read(recording_path(tmp_path, "crashed", "mono"))[0].nframes == params.nframes


@contextlib.contextmanager
def small_disk(path: Path) -> Iterator[Path]:
    """A real 64 KiB filesystem (tmpfs; needs root, as in CI)."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_full_disk_stops_the_recording_not_the_call(tmp_path: Path) -> None:
    failures: list[OSError] = []
    writer = RecordingWriter(on_failure=failures.append)
    writer.start()
    with small_disk(tmp_path / "disk") as disk:
        recording = Recording("full", disk)
        recorder = Recorder(recording, writer)
        play_call(recorder, 5.0)  # 240 KB of audio for 64 KiB of disk
        recorder.close()
        writer.close()
        assert [error.errno for error in failures] == [errno.ENOSPC]  # once, not per chunk
        assert recording.failed and recorder.counters()["recordingFailed"] == 1
        recorder.played_audio(silence())  # the call goes on; the recorder ignores it
        params, stereo = read(recording_path(disk, "full", "stereo"))
        assert params.nframes > 0 and len(stereo) == params.nframes * 4  # playable as far as
        # the header says, which is what reached the disk


def test_a_write_error_is_counted_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failures: list[OSError] = []
    writer = RecordingWriter(on_failure=failures.append)
    writer.start()

    def read_only(self: Recording, stereo: bytes, mono: bytes) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Recording, "write", read_only)
    recording = Recording("ro", tmp_path)
    recorder = Recorder(recording, writer)
    play_call(recorder, 3.0)
    recorder.close()
    writer.close()
    assert len(failures) == 1 and recording.failed


def test_a_backlog_beyond_its_bound_drops_chunks_and_counts_them(tmp_path: Path) -> None:
    writer = RecordingWriter(backlog_chunks=2)  # not started: nothing drains it
    recording = Recording("slow", tmp_path)
    recorder = Recorder(recording, writer)
    play_call(recorder, 4.0)
    assert recorder.counters()["recordingChunksDropped"] == 2


def accept(assistant: dict[str, Any]) -> Accept:
    target = PipelineTarget("ws://127.0.0.1:1/", "raw", "pcm_s16le", 8000)
    return Accept(assistant, None, {}, {}, target)


def test_artifact_plan_decides_with_the_default_behind_it(tmp_path: Path) -> None:
    off = accept({"artifactPlan": {"recordingEnabled": False}})
    on = accept({"artifactPlan": {"recordingEnabled": True}})
    silent = accept({"artifactPlan": {"transcriptPlan": {"enabled": True}}})
    assert not recording_wanted(off, True) and recording_wanted(on, False)
    assert recording_wanted(silent, True) and not recording_wanted(accept({}), False)
    writer = RecordingWriter()
    make = recorder_factory(tmp_path, True, writer)
    call = cast(Call, SimpleNamespace(id="c1"))
    assert make(call, off) is None
    recorder = make(call, silent)
    assert recorder is not None
    recorder.close()  # a call that never played a frame writes nothing
    writer.start()
    writer.close()
    assert list(tmp_path.iterdir()) == []


def make_file(directory: Path, call_id: str, channel: Channel, size: int, age_s: float) -> Path:
    path = recording_path(directory, call_id, channel)
    path.write_bytes(bytes(size))
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_retention_then_the_size_cap_oldest_first(tmp_path: Path) -> None:
    ancient = make_file(tmp_path, "a", "stereo", 100, age_s=40 * 86400)
    old = make_file(tmp_path, "b", "stereo", 100, age_s=3 * 86400)
    newer = make_file(tmp_path, "c", "mono", 100, age_s=2 * 86400)
    newest = make_file(tmp_path, "d", "stereo", 100, age_s=60)
    other = tmp_path / "notes.txt"
    other.write_text("kept")
    assert clean_up(tmp_path, time.time(), retention_days=30, max_total_bytes=0) == 1
    assert not ancient.exists() and old.exists()
    assert clean_up(tmp_path, time.time(), retention_days=0, max_total_bytes=200) == 1
    assert not old.exists() and newer.exists() and newest.exists() and other.exists()
    assert clean_up(tmp_path / "missing", time.time(), 30, 1) == 0
    # A call still being recorded keeps its files, whatever the cap.
    assert clean_up(tmp_path, time.time(), 0, 1, recording_now={"d"}) == 1
    assert not newer.exists() and newest.exists()


def test_the_writer_knows_which_recordings_are_unfinished(tmp_path: Path) -> None:
    writer = RecordingWriter()
    recorder = Recorder(Recording("busy", tmp_path), writer)
    play_call(recorder, 1.0)
    assert writer.unfinished() == {"busy"}
    recorder.close()
    writer.start()
    writer.close()
    assert writer.unfinished() == set()


async def test_waiting_for_a_closed_recorder_means_its_files_are_whole(
    tmp_path: Path, writer: RecordingWriter
) -> None:
    recorder = Recorder(Recording("waited", tmp_path), writer)
    ticks = play_call(recorder, 1.3)
    recorder.close()
    await recorder.wait_closed()
    params, _ = read(recording_path(tmp_path, "waited", "stereo"))
    assert params.nframes == ticks * FRAME // 2
    dropped = Recorder(Recording("dropped", tmp_path), writer)
    play_call(dropped, 1.1)  # then dropped for failing: never closed
    async with asyncio.timeout(1):
        await dropped.wait_closed()
    dropped.close()  # as the conversation does for a tap its session dropped
    await dropped.wait_closed()


def test_one_recording_that_fails_to_close_leaves_the_writer_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = RecordingWriter()
    writer.start()
    broken = Recording("broken", tmp_path)

    def fails(self: Recording) -> None:
        monkeypatch.undo()  # once
        raise RuntimeError("a bug")

    monkeypatch.setattr(Recording, "close", fails)
    Recorder(broken, writer).close()
    later = Recorder(Recording("later", tmp_path), writer)
    play_call(later, 1.0)
    later.close()
    assert writer.wait_finished("later", 5)
    writer.close()
    assert read(recording_path(tmp_path, "later", "stereo"))[0].nframes == 8000
