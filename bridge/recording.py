"""Call recordings, sans I/O: both directions of a call aligned on the caller's clock.

A recording has one frame per 20 ms tick of what the caller heard (``MediaTap.played_audio``),
so its duration is the call's: the caller's frames arrive on their own schedule (the PBX's),
wait in a small bounded queue and are paired with the next tick; a tick with no caller frame
waiting records caller silence (Asterisk sends nothing during RTP gaps). The stereo file has the
caller on the left and the assistant as heard on the right; the mono file is their sum.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

from bridge.audio import FRAME_MS, SAMPLE_WIDTH, mix, stereo

Channel = Literal["stereo", "mono"]
CHANNELS: tuple[Channel, ...] = ("stereo", "mono")
# Caller frames waiting for their tick; more means the PBX sent a burst (jitter) or the writer
# side stalled. The oldest go first: the recording stays in step with the call.
CALLER_BACKLOG_FRAMES = 10


def rate_of_frame(frame: bytes) -> int:
    """The sample rate of one 20 ms frame of 16-bit mono PCM, from its length."""
    return len(frame) // SAMPLE_WIDTH * 1000 // FRAME_MS


@dataclass(frozen=True)
class RecordedFrame:
    """One tick of a recording: the stereo frame and the mono mix."""

    stereo: bytes
    mono: bytes


class FrameAligner:
    """Pairs what the caller said with what the caller heard, one tick at a time.

    Args:
        backlog_frames: caller frames kept waiting for a tick; beyond it the oldest is dropped
            (counted in ``dropped_caller_frames``).
    """

    def __init__(self, backlog_frames: int = CALLER_BACKLOG_FRAMES) -> None:
        self._caller: deque[bytes] = deque()
        self._backlog_frames = backlog_frames
        self.dropped_caller_frames = 0
        self.ticks = 0

    def caller(self, pcm: bytes) -> None:
        """A frame the caller said."""
        if len(self._caller) >= self._backlog_frames:
            self._caller.popleft()
            self.dropped_caller_frames += 1
        self._caller.append(pcm)

    def tick(self, played: bytes) -> RecordedFrame:
        """The frame the caller heard this tick, with the caller's next frame (or silence)."""
        self.ticks += 1
        size = len(played)
        said = self._caller.popleft() if self._caller else b""
        # A caller frame of another length (a short last frame) is cut or padded to the tick.
        said = said[:size].ljust(size, b"\0")
        return RecordedFrame(stereo(said, played), mix(said, played))
