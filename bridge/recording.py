"""Call recordings, sans I/O: both directions of a call aligned on the caller's clock, and
signed download links.

A recording has one frame per 20 ms tick of what the caller heard (``MediaTap.played_audio``),
so its duration is the call's: the caller's frames arrive on their own schedule (the PBX's),
wait in a small bounded queue and are paired with the next tick; a tick with no caller frame
waiting records caller silence (Asterisk sends nothing during RTP gaps). The stereo file has the
caller on the left and the assistant as heard on the right; the mono file is their sum.

Download links carry an expiry and an HMAC-SHA256 over the call id, the channel and the expiry
(RFC 2104), so a webhook receiver can fetch a recording without the API key, as with the
presigned links in Vapi's end-of-call-report; time comes in as an argument.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote

from bridge.audio import FRAME_MS, SAMPLE_WIDTH, mix, stereo
from bridge.models import format_timestamp

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


def sign(secret: bytes, call_id: str, channel: Channel, expires: int) -> str:
    """The hex HMAC-SHA256 of a recording link (call id, channel, expiry in Unix seconds)."""
    message = f"{call_id}\n{channel}\n{expires}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def link_valid(
    secret: bytes, call_id: str, channel: Channel, *, expires: int, signature: str, now: float
) -> bool:
    """Whether a link's signature is ours and its expiry (Unix seconds) is still ahead."""
    expected = sign(secret, call_id, channel, expires)
    return hmac.compare_digest(expected, signature) and now < expires


def is_channel(value: str) -> bool:
    """Whether ``value`` names a recording channel (``stereo`` or ``mono``)."""
    return value in CHANNELS


@dataclass(frozen=True)
class RecordingLinks:
    """Signed, expiring download links to recordings.

    Args:
        secret: the HMAC key (``recordings.url_secret``).
        base_url: where the API is reached from outside, without a trailing slash.
        lifetime_s: how long a link works after it is made.
        previous: keys that signed links before ``secret`` replaced them; their links are
            still valid until they expire (a key rotation breaks no link already sent).
    """

    secret: bytes
    base_url: str
    lifetime_s: int
    previous: tuple[bytes, ...] = ()

    def url(self, call_id: str, channel: Channel, now: datetime) -> str:
        """A link to the call's recording in ``channel``, valid for ``lifetime_s`` from now."""
        expires = self.expiry(now)
        signature = sign(self.secret, call_id, channel, expires)
        return (
            f"{self.base_url}/recording/{quote(call_id, safe='')}.{channel}.wav"
            f"?expires={expires}&signature={signature}"
        )

    def expiry(self, now: datetime) -> int:
        """When links made ``now`` stop working, in Unix seconds."""
        return int(now.timestamp()) + self.lifetime_s

    def artifact(self, call_id: str, now: datetime) -> dict[str, Any]:
        """The recording fields of Vapi's ``artifact``: ``recordingUrl`` (mono),
        ``stereoRecordingUrl``, ``recording`` and ``presignedUrlsExpiresAt``."""
        mono, stereo_url = self.url(call_id, "mono", now), self.url(call_id, "stereo", now)
        expires = datetime.fromtimestamp(self.expiry(now), UTC)
        return {
            "recordingUrl": mono,
            "stereoRecordingUrl": stereo_url,
            "recording": {"stereoUrl": stereo_url, "mono": {"combinedUrl": mono}},
            "presignedUrlsExpiresAt": format_timestamp(expires),
        }

    def valid(
        self, call_id: str, channel: Channel, *, expires: int, signature: str, now: float
    ) -> bool:
        """Whether a link's signature is ours (by the key or a previous one) and it has not
        expired."""
        return any(
            link_valid(key, call_id, channel, expires=expires, signature=signature, now=now)
            for key in (self.secret, *self.previous)
        )


def was_recorded(media: Mapping[str, Any]) -> bool:
    """Whether a call's media counters (``call.sipbridge.media``) show a whole recording (one
    that stopped on a write error is cut short, or missing: it is not linked)."""
    return int(media.get("recordedFrames", 0)) > 0 and not media.get("recordingFailed")
