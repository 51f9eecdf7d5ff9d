"""Call recordings on disk: the media tap that records a call, the one thread that writes every
call's files, and the directory's retention.

The tap (:class:`Recorder`) runs on the session's 20 ms path: it only aligns frames
(:mod:`bridge.recording`) and hands about a second of audio at a time to the
:class:`RecordingWriter`, whose thread does the disk I/O, so a slow disk never delays a frame.
Files are written with the stdlib ``wave`` module, which rewrites the RIFF sizes after every
``writeframes``; each chunk is flushed, so a crash mid-call leaves a playable file of what was
recorded. A write that fails (ENOSPC, EROFS, ...) stops that recording, logged once and
counted; the call goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import wave
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from bridge.audio import SAMPLE_WIDTH
from bridge.calls import Call
from bridge.recording import CHANNELS, Channel, FrameAligner, rate_of_frame
from bridge.routing import Accept

log = logging.getLogger(__name__)

# Frames the tap gathers before handing them to the writer: one second of audio.
CHUNK_FRAMES = 50
# Chunks waiting for the writer across all calls; beyond this the disk is not keeping up and
# further chunks are dropped (counted), never queued without bound.
WRITER_BACKLOG_CHUNKS = 512
# How long waiting for a recording's last chunks to reach the disk may take.
FINISH_WAIT_S = 5.0


def recording_path(directory: Path, call_id: str, channel: Channel) -> Path:
    """Where a call's recording in ``channel`` is (or would be) kept."""
    return directory / f"{call_id}.{channel}.wav"


class _WaveFile:
    """One open WAV file, flushed after every chunk."""

    def __init__(self, path: Path, channels: int, rate: int) -> None:
        self._file: BinaryIO = path.open("wb")
        try:
            # Open across the call's chunks, closed by close(): no with-block fits.
            self._wave = wave.open(self._file, "wb")  # noqa: SIM115
            self._wave.setnchannels(channels)
            self._wave.setsampwidth(SAMPLE_WIDTH)
            self._wave.setframerate(rate)
        except BaseException:
            self._file.close()
            raise

    def write(self, pcm: bytes) -> None:
        self._wave.writeframes(pcm)  # also rewrites the RIFF and data sizes
        self._file.flush()

    def close(self) -> None:
        try:
            self._wave.close()
        finally:
            self._file.close()


@dataclass
class Recording:
    """One call's recording files; touched only by the writer's thread, except the flags."""

    call_id: str
    directory: Path
    rate: int = 0
    failed: bool = False  # a write failed: nothing more is written
    dropped_chunks: int = 0
    _files: dict[Channel, _WaveFile] = field(default_factory=dict)

    def write(self, stereo: bytes, mono: bytes) -> None:
        if not self._files:
            self.directory.mkdir(parents=True, exist_ok=True)
            for channel, count in zip(CHANNELS, (2, 1), strict=True):
                self._files[channel] = _WaveFile(
                    recording_path(self.directory, self.call_id, channel), count, self.rate
                )
        self._files["stereo"].write(stereo)
        self._files["mono"].write(mono)

    def close(self) -> None:
        files, self._files = self._files, {}
        for file in files.values():
            with contextlib.suppress(OSError):  # the data is on disk; the sizes already are
                file.close()


_Job = tuple[Recording, bytes, bytes] | tuple[Recording, None, None]


class RecordingWriter:
    """The service's one thread writing recordings, fed through a bounded backlog.

    Args:
        on_failure: called (from the writer's thread) once per recording that stopped on a
            write error, with the error.
    """

    def __init__(
        self,
        backlog_chunks: int = WRITER_BACKLOG_CHUNKS,
        on_failure: Callable[[OSError], None] = lambda error: None,
    ) -> None:
        # Unbounded underneath so that a close always gets in; chunks are bounded by count.
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._backlog_chunks = backlog_chunks
        self._queued_chunks = 0
        self._lock = threading.Lock()
        self._on_failure = on_failure
        self._thread: threading.Thread | None = None
        # Calls whose recording is still being written, set once its files are closed.
        self._unfinished: dict[str, threading.Event] = {}

    def start(self) -> None:
        """Starts the writer's thread."""
        self._thread = threading.Thread(target=self._run, name="recording-writer", daemon=True)
        self._thread.start()

    def write(self, recording: Recording, stereo: bytes, mono: bytes) -> bool:
        """Queues a chunk; False when the backlog is full (the chunk is dropped)."""
        with self._lock:
            if self._queued_chunks >= self._backlog_chunks:
                return False
            self._queued_chunks += 1
            self._unfinished.setdefault(recording.call_id, threading.Event())
        self._jobs.put((recording, stereo, mono))
        return True

    def finish(self, recording: Recording) -> None:
        """Queues the recording's close, after its chunks."""
        self._jobs.put((recording, None, None))

    def unfinished(self) -> set[str]:
        """The calls whose recordings are still being written."""
        with self._lock:
            return set(self._unfinished)

    def wait_finished(self, call_id: str, timeout_s: float) -> bool:
        """Waits until the call's recording files are complete (blocking: call it off the
        loop); False if they were still being written after ``timeout_s``."""
        with self._lock:
            unfinished = self._unfinished.get(call_id)
        return unfinished is None or unfinished.wait(timeout_s)

    def close(self) -> None:
        """Writes what is queued, then stops the thread (blocking: call it off the loop)."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            recording, stereo, mono = job
            if stereo is None or mono is None:
                try:
                    recording.close()
                except Exception:  # thread boundary, as below
                    log.exception("recording of call %s did not close", recording.call_id)
                with self._lock:
                    finished = self._unfinished.pop(recording.call_id, None)
                if finished is not None:
                    finished.set()
                continue
            with self._lock:
                self._queued_chunks -= 1
            if recording.failed:
                continue
            try:
                recording.write(stereo, mono)
            except OSError as error:
                recording.failed = True
                recording.close()
                log.error("recording of call %s stopped: %s", recording.call_id, error)
                self._on_failure(error)
            except Exception:  # thread boundary: one recording's bug must not stop the others
                recording.failed = True
                recording.close()
                log.exception("recording of call %s failed", recording.call_id)


class Recorder:
    """The media tap that records one call (see :class:`bridge.media.session.MediaTap`)."""

    def __init__(self, recording: Recording, writer: RecordingWriter) -> None:
        self._recording = recording
        self._writer = writer
        self._aligner = FrameAligner()
        self._stereo: list[bytes] = []
        self._mono: list[bytes] = []
        self._closed = False

    def caller_audio(self, pcm: bytes) -> None:
        self._aligner.caller(pcm)

    def played_audio(self, pcm: bytes) -> None:
        if self._recording.failed:
            return
        if not self._recording.rate:
            self._recording.rate = rate_of_frame(pcm)
        frame = self._aligner.tick(pcm)
        self._stereo.append(frame.stereo)
        self._mono.append(frame.mono)
        if len(self._stereo) >= CHUNK_FRAMES:
            self._hand_on()

    def close(self) -> None:
        self._hand_on()
        self._writer.finish(self._recording)
        self._closed = True

    async def wait_closed(self) -> None:
        if self._closed:  # a tap dropped for failing was never closed: nothing to wait for
            call_id = self._recording.call_id
            await asyncio.to_thread(self._writer.wait_finished, call_id, FINISH_WAIT_S)

    def counters(self) -> Mapping[str, int]:
        recording = self._recording
        return {
            "recordedFrames": self._aligner.ticks,
            "recordingCallerFramesDropped": self._aligner.dropped_caller_frames,
            "recordingChunksDropped": recording.dropped_chunks,
            "recordingFailed": int(recording.failed),
        }

    def _hand_on(self) -> None:
        if self._stereo and not self._recording.failed:
            stereo, mono = b"".join(self._stereo), b"".join(self._mono)
            if not self._writer.write(self._recording, stereo, mono):
                self._recording.dropped_chunks += 1
        self._stereo.clear()
        self._mono.clear()


def recording_wanted(decision: Accept, enabled_by_default: bool) -> bool:
    """``assistant.artifactPlan.recordingEnabled`` of the routed assistant (overrides and the
    assistant-request answer included), else the default (Vapi's: true)."""
    plan = (decision.assistant or {}).get("artifactPlan")
    if isinstance(plan, Mapping):
        wanted = plan.get("recordingEnabled")
        if isinstance(wanted, bool):
            return wanted
    return enabled_by_default


def recorder_factory(
    directory: Path, enabled_by_default: bool, writer: RecordingWriter
) -> Callable[[Call, Accept], Recorder | None]:
    """The tap factory for :class:`bridge.conversation.Conversations`: a recorder for every
    call that asks for one, its files in ``directory``."""

    def make(call: Call, decision: Accept) -> Recorder | None:
        if not recording_wanted(decision, enabled_by_default):
            return None
        return Recorder(Recording(call.id, directory), writer)

    return make


def delete_recording(directory: Path, call_id: str) -> int:
    """Deletes the call's recording files (every channel); says how many there were.
    Blocking: run it off the event loop."""
    removed = 0
    for channel in CHANNELS:
        with contextlib.suppress(FileNotFoundError):
            recording_path(directory, call_id, channel).unlink()
            removed += 1
    return removed


def clean_up(
    directory: Path,
    now: float,
    retention_days: float,
    max_total_bytes: int,
    recording_now: Collection[str] = (),
) -> int:
    """Deletes recordings older than the retention (0: kept), then the oldest ones beyond the
    size cap (0: none), never those of the calls in ``recording_now``; says how many files
    went. Blocking: run it off the event loop."""
    try:
        entries = [
            (entry.stat().st_mtime, entry.stat().st_size, Path(entry.path))
            for entry in os.scandir(directory)
            if entry.is_file()
            and entry.name.endswith(".wav")
            and entry.name.split(".", 1)[0] not in recording_now
        ]
    except FileNotFoundError:
        return 0
    entries.sort()
    doomed: list[Path] = []
    if retention_days > 0:
        cutoff = now - retention_days * 86400
        doomed += [path for mtime, _, path in entries if mtime < cutoff]
        entries = [entry for entry in entries if entry[0] >= cutoff]
    if max_total_bytes > 0:
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= max_total_bytes:
                break
            doomed.append(path)
            total -= size
    removed = 0
    for path in doomed:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    if removed:
        log.info("recordings clean-up: %d files deleted", removed)
    return removed
