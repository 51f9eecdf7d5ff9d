"""Audio, sans I/O: G.711 and resampling with carried state, 20 ms framing, the playout buffer.

Conventions: PCM is signed 16-bit little-endian mono ("slin"). The PBX side is 8 kHz slin in
20 ms frames of 320 bytes; the pipeline side is whatever the assistant's format says.

``audioop`` does G.711: below Python 3.13 the stdlib module (deprecated in 3.11 and removed in 3.13
by PEP 594; imported without its deprecation warning leaking), from 3.13 the audioop-lts package, a
port of that same C module kept for the Pythons that dropped it (github.com/AbstractUmbra/audioop,
0.2.2); ``./dev test`` runs the tests on both. Rate conversion between the telephony rates (8, 16,
24, 48 kHz) is a windowed-sinc FIR resampler on numpy: ``audioop.ratecv`` is linear interpolation
without an anti-alias filter, so a 16 or 24 kHz TTS voice downsampled by it folds its 4-12 kHz
sibilants back into the 0-4 kHz the caller hears. soxr filters well but hands out audio in blocks of
60-100 ms, too late for a conversation. Every converter carries its state per direction per call:
chunked conversion equals one-shot conversion.
"""

from __future__ import annotations

import array
import math
import sys
import warnings
from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from bridge.protocol.dialects import FRAME_MS as FRAME_MS  # noqa: PLC0414 - re-exported for the media code
from bridge.protocol.dialects import Encoding, effective_rate, is_encoding

if sys.version_info >= (3, 13):
    import audioop  # provided by audioop-lts
else:  # pragma: no cover - depends on the interpreter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop

SAMPLE_WIDTH = 2
PBX_RATE = 8000


def frame_bytes(rate: int, frame_ms: int = FRAME_MS) -> int:
    """Bytes of one frame of 16-bit mono PCM."""
    return rate * frame_ms // 1000 * SAMPLE_WIDTH


def silence(rate: int = PBX_RATE, frame_ms: int = FRAME_MS) -> bytes:
    """One frame of digital silence."""
    return bytes(frame_bytes(rate, frame_ms))


def split_frames(pcm: bytes, rate: int = PBX_RATE) -> list[bytes]:
    """``pcm`` cut into 20 ms frames (the last one shorter if the audio ends inside one)."""
    size = frame_bytes(rate)
    return [pcm[offset : offset + size] for offset in range(0, len(pcm), size)]


def ulaw_to_pcm(data: bytes) -> bytes:
    """G.711 μ-law to 16-bit PCM (same rate)."""
    return audioop.ulaw2lin(data, SAMPLE_WIDTH)


def pcm_to_ulaw(pcm: bytes) -> bytes:
    """16-bit PCM to G.711 μ-law (same rate)."""
    return audioop.lin2ulaw(pcm, SAMPLE_WIDTH)


# Anti-alias filter design: pass up to 85 % of the lower Nyquist frequency (3.4 kHz for 8 kHz,
# the telephone band), stop 60 dB down from where aliases would land back in that band.
_PASSBAND = 0.85
_STOPBAND_DB = 60.0
# Rational factors up to this go through the FIR; others (22.05 kHz espeak-ng output) through
# ratecv, since their filter would need thousands of taps.
_MAX_FIR_FACTOR = 6


def lowpass_taps(up: int, down: int, in_rate: int) -> npt.NDArray[np.float64]:
    """A Kaiser-windowed sinc low-pass for resampling by ``up/down``, at ``in_rate * up``.

    Its DC gain is ``up``, which makes up for the zeros stuffed between input samples.
    """
    rate = in_rate * up
    nyquist = min(in_rate, in_rate * up / down) / 2
    transition = 2 * (1 - _PASSBAND) * nyquist  # from 0.85 to 1.15 of the lower Nyquist
    beta = 0.1102 * (_STOPBAND_DB - 8.7)
    count = math.ceil((_STOPBAND_DB - 7.95) / (2.285 * 2 * math.pi * transition / rate)) + 1
    count += 1 - count % 2  # odd: a whole-sample delay
    offsets = np.arange(count) - (count - 1) / 2
    cutoff = nyquist / rate
    taps = 2 * cutoff * np.sinc(2 * cutoff * offsets) * np.kaiser(count, beta)
    return np.asarray(taps * (up / taps.sum()), dtype=np.float64)


class Resampler:
    """Streaming rate conversion of 16-bit PCM.

    For the telephony rates: zero-stuff by ``up``, low-pass, keep every ``down``-th sample, the
    filter's history and the decimation phase carried from chunk to chunk. The filter delays
    the audio by half its length: about 1.5 ms at 8 kHz ↔ 16 or 24 kHz.
    """

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.in_rate = in_rate
        self.out_rate = out_rate
        common = math.gcd(in_rate, out_rate)
        self.up, self.down = out_rate // common, in_rate // common
        self.uses_fir = in_rate != out_rate and max(self.up, self.down) <= _MAX_FIR_FACTOR
        self._taps = lowpass_taps(self.up, self.down, in_rate) if self.uses_fir else None
        self._ratecv_state: tuple[int, tuple[tuple[int, int], ...]] | None = None
        self.reset()

    @property
    def delay_samples(self) -> float:
        """The filter's delay, in output samples."""
        if self._taps is None:
            return 0.0
        return (len(self._taps) - 1) / 2 / self.down

    def reset(self) -> None:
        """Forgets the stream so far (after a barge-in: nothing old leaks into what follows)."""
        self._ratecv_state = None
        self._phase = 0
        if self._taps is not None:
            self._history = np.zeros(len(self._taps) - 1)

    def convert(self, pcm: bytes) -> bytes:
        """Converts the next chunk of the stream (an odd trailing byte is ignored)."""
        if self.in_rate == self.out_rate or len(pcm) < SAMPLE_WIDTH:
            return pcm
        if self._taps is None:
            converted, self._ratecv_state = audioop.ratecv(
                pcm, SAMPLE_WIDTH, 1, self.in_rate, self.out_rate, self._ratecv_state
            )
            return converted
        samples = np.frombuffer(pcm, dtype="<i2", count=len(pcm) // SAMPLE_WIDTH)
        kept = self._stuff_and_filter(samples.astype(np.float64))
        # In place, and the ufuncs themselves: np.clip's checks cost more than the filter.
        np.rint(kept, out=kept)
        np.maximum(kept, -32768, out=kept)
        np.minimum(kept, 32767, out=kept)
        return kept.astype("<i2").tobytes()

    def _stuff_and_filter(self, signal: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        assert self._taps is not None
        if self.up > 1:
            stuffed = np.zeros(len(signal) * self.up)
            stuffed[:: self.up] = signal
            signal = stuffed
        window = np.concatenate((self._history, signal), dtype=np.float64)
        filtered = np.convolve(window, self._taps, mode="valid")
        self._history = window[len(window) - len(self._history) :]
        kept = filtered[self._phase :: self.down]
        self._phase = (self._phase - len(filtered)) % self.down
        return kept


class Transcoder:
    """Both directions of one call between PBX slin and the pipeline's encoding and rate.

    Args:
        encoding: ``pcm_s16le`` or ``mulaw`` on the pipeline side.
        pipeline_rate: the pipeline side's sample rate (8000 for μ-law).
        pbx_rate: the PBX side's sample rate.
    """

    def __init__(self, encoding: str, pipeline_rate: int, pbx_rate: int = PBX_RATE) -> None:
        if not is_encoding(encoding):
            raise ValueError(f"unknown encoding {encoding!r}")
        self.encoding: Encoding = encoding
        self.pipeline_rate = effective_rate(encoding, pipeline_rate)
        self.pbx_rate = pbx_rate
        self._up = Resampler(pbx_rate, self.pipeline_rate)
        self._down = Resampler(self.pipeline_rate, pbx_rate)
        # A pipeline may split PCM anywhere, even inside a sample (streamed TTS over HTTP):
        # the odd byte waits for the next chunk instead of shifting every sample after it.
        self._odd_byte = b""

    def to_pipeline(self, pcm: bytes) -> bytes:
        """PBX slin to the pipeline's format."""
        converted = self._up.convert(pcm)
        return pcm_to_ulaw(converted) if self.encoding == "mulaw" else converted

    def from_pipeline(self, data: bytes) -> bytes:
        """The pipeline's format to PBX slin (a sample split across chunks is joined)."""
        if self.encoding == "mulaw":
            pcm = ulaw_to_pcm(data)
        else:
            if self._odd_byte:
                data = self._odd_byte + data
            if len(data) % SAMPLE_WIDTH:
                self._odd_byte = data[-1:]
                pcm = data[:-1]
            else:
                self._odd_byte = b""
                pcm = data
        return self._down.convert(pcm)

    def clear_from_pipeline(self) -> None:
        """Barge-in: the pipeline's next audio starts afresh (no tail of the cleared reply)."""
        self._down.reset()
        self._odd_byte = b""


class Reframer:
    """Cuts a stream of arbitrary chunks into whole frames of ``size`` bytes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._pending = bytearray()

    def push(self, data: bytes) -> list[bytes]:
        """Adds a chunk; returns the whole frames now available (the remainder is kept)."""
        self._pending += data
        count = len(self._pending) // self.size
        if not count:
            return []
        cut = count * self.size
        block = bytes(self._pending[:cut])
        del self._pending[:cut]
        return [block[i : i + self.size] for i in range(0, cut, self.size)]

    def flush(self) -> bytes | None:
        """The remainder padded with silence to a whole frame, or None if there is none."""
        if not self._pending:
            return None
        frame = bytes(self._pending) + bytes(self.size - len(self._pending))
        self._pending.clear()
        return frame

    def discard(self) -> None:
        """Drops the remainder."""
        self._pending.clear()

    @property
    def pending_bytes(self) -> int:
        """Bytes held back until a frame is complete."""
        return len(self._pending)


@dataclass(frozen=True)
class Mark:
    """A named point in the outgoing audio (Twilio Media Streams ``mark``)."""

    name: str


class PlayoutBuffer:
    """Audio queued toward the caller, handed out one frame at a time by a paced writer.

    - :meth:`next_frame` always returns a frame: queued audio, or silence when there is none,
      so the PBX gets a steady stream (Asterisk neither paces nor fills silence itself).
    - :meth:`clear` (barge-in) drops everything queued; the very next frame is silence.
    - A mark is reported as played only when every frame queued before it has been handed
      out, or when it is cleared. A mark in the middle of a frame is released with the frame
      that holds its position: no silence is inserted for it (pipelines that mark every chunk
      would otherwise sound choppy).
    - A partial frame is held until more audio completes it; when the queue runs dry it goes
      out padded with silence (the end of an utterance), never held back behind later audio.
    - At most ``max_frames`` are queued; audio beyond that (the newest) is dropped and counted.
    - A writer that fell behind drops (:meth:`skip`) the frames whose time has passed (counted as
      shed), so that what the caller hears stays close to when it was due.

    Every whole frame pushed is accounted for: ``pushed_frames == played_frames +
    dropped_frames + shed_frames + cleared_frames + queued_frames``.
    """

    def __init__(self, frame_size: int, max_frames: int) -> None:
        self.frame_size = frame_size
        self.max_frames = max_frames
        self._items: deque[bytes | Mark] = deque()
        self._frames = 0
        self._reframer = Reframer(frame_size)
        # Marks placed inside the partial frame the reframer holds.
        self._held_marks: list[str] = []
        self._silence = bytes(frame_size)
        self.pushed_frames = 0
        self.played_frames = 0
        self.dropped_frames = 0
        self.shed_frames = 0
        self.cleared_frames = 0
        self.silence_frames = 0

    @property
    def queued_frames(self) -> int:
        """Whole frames waiting to be played."""
        return self._frames

    @property
    def idle(self) -> bool:
        """Nothing left to play: no frame, no partial frame, no mark waiting."""
        return not self._items and not self._reframer.pending_bytes and not self._held_marks

    def push(self, pcm: bytes) -> int:
        """Queues audio of any length; returns the frames dropped because the queue was full."""
        dropped = 0
        for frame in self._reframer.push(pcm):
            self.pushed_frames += 1
            if self._frames >= self.max_frames:
                dropped += 1
            else:
                self._items.append(frame)
                self._frames += 1
            if self._held_marks:
                # This frame completed the partial one the marks were placed in.
                self._items.extend(Mark(name) for name in self._held_marks)
                self._held_marks.clear()
        self.dropped_frames += dropped
        return dropped

    def mark(self, name: str) -> list[str]:
        """Queues a mark after the audio pushed so far.

        Returns:
            The mark's name if it is already played (nothing was queued before it), else [].
        """
        if self._reframer.pending_bytes:
            self._held_marks.append(name)
            return []
        if not self._items:
            return [name]
        self._items.append(Mark(name))
        return []

    def clear(self) -> list[str]:
        """Drops all queued audio; returns the names of the marks that were waiting."""
        marks = [item.name for item in self._items if isinstance(item, Mark)]
        marks += self._held_marks
        self._items.clear()
        self._held_marks.clear()
        self.cleared_frames += self._frames
        self._frames = 0
        self._reframer.discard()
        return marks

    def skip(self, count: int) -> tuple[int, list[str]]:
        """Drops up to ``count`` frames from the head: their time to be played has passed.

        Returns:
            The frames dropped, and the marks whose place in the audio was passed meanwhile
            (they count as played: the audio before them will never be).
        """
        marks: list[str] = []
        shed = 0
        while self._items and (shed < count or isinstance(self._items[0], Mark)):
            item = self._items.popleft()
            if isinstance(item, Mark):
                marks.append(item.name)  # its audio has passed, as after next_frame
            else:
                shed += 1
        self._frames -= shed
        self.shed_frames += shed
        return shed, marks

    def next_frame(self) -> tuple[bytes, list[str]]:
        """The frame to send now and the marks that are played once it is sent."""
        marks: list[str] = []
        while self._items and isinstance(self._items[0], Mark):
            marks.append(self._items.popleft().name)  # type: ignore[union-attr]
        if not self._items:
            tail = self._reframer.flush()
            if tail is not None:
                # Underrun with a partial frame: it is the end of an utterance, play it now.
                marks += self._held_marks
                self._held_marks.clear()
                self.pushed_frames += 1
                self.played_frames += 1
                return tail, marks
            self.silence_frames += 1
            return self._silence, marks
        frame = self._items.popleft()
        assert isinstance(frame, bytes)
        self._frames -= 1
        self.played_frames += 1
        while self._items and isinstance(self._items[0], Mark):
            marks.append(self._items.popleft().name)  # type: ignore[union-attr]
        return frame, marks


class Pacer:
    """The absolute send schedule of a 20 ms stream: frame n is due at ``start + n * period``.

    Sleeping ``period`` after each send drifts by the time each send takes; an absolute
    schedule does not. A writer up to ``max_late_s`` behind catches up frame by frame. One
    further behind (a starved event loop) must not burst to catch up (a burst is what the
    caller hears as garble) nor play everything late (the delay would grow with every stall):
    :meth:`skip_missed` restarts the schedule from now and says how many frames' time passed,
    for the writer to shed.
    """

    def __init__(
        self, start: float, period_s: float = FRAME_MS / 1000, max_late_s: float = 0.1
    ) -> None:
        self.period_s = period_s
        self.max_late_s = max_late_s
        self._start = start
        self._sent = 0
        self.resets = 0

    @property
    def next_due(self) -> float:
        """When the next frame should go out."""
        return self._start + self._sent * self.period_s

    def skip_missed(self, now: float) -> int:
        """Before sending at ``now``: the frames whose time passed beyond catching up (0 when
        the writer is at most ``max_late_s`` late); the schedule then restarts at ``now``."""
        late = now - self.next_due
        if late <= self.max_late_s:
            return 0
        self._start = now
        self._sent = 0
        self.resets += 1
        # The frame sent now stands for the last due tick; the ones before it are missed.
        return int(late / self.period_s)

    def sent(self) -> None:
        """Records that the due frame was sent."""
        self._sent += 1


def sine(
    frequency_hz: float, duration_s: float, rate: int = PBX_RATE, amplitude: float = 0.3
) -> bytes:
    """A sine tone as 16-bit PCM (for the demo pipeline, the lab caller and tests)."""
    count = int(duration_s * rate)
    peak = amplitude * 32767
    step = 2 * math.pi * frequency_hz / rate
    return array.array("h", (int(peak * math.sin(step * n)) for n in range(count))).tobytes()


def tone_share(pcm: bytes, rate: int, frequency_hz: float) -> float:
    """How much of the signal's energy is at ``frequency_hz`` (0..1), by the Goertzel algorithm.

    A clean tone at that frequency gives close to 1; another tone, speech or silence gives
    close to 0. One frequency costs one pass over the samples, no FFT library needed.
    """
    samples = array.array("h")
    samples.frombytes(pcm[: len(pcm) - len(pcm) % 2])
    count = len(samples)
    if count == 0:
        return 0.0
    coefficient = 2 * math.cos(2 * math.pi * frequency_hz / rate)
    previous = before = 0.0
    total = 0.0
    for sample in samples:
        current = sample + coefficient * previous - before
        before, previous = previous, current
        total += sample * sample
    if total == 0:
        return 0.0
    power = previous * previous + before * before - coefficient * previous * before
    # A full-scale bin holds N/2 of the energy of a pure tone (sum of x^2 = N * A^2 / 2).
    return min(1.0, 2 * power / (count * total))


def rms(pcm: bytes) -> int:
    """Root-mean-square level of 16-bit PCM (0 for silence, about 6950 for a 0.3 sine)."""
    return int(audioop.rms(pcm[: len(pcm) - len(pcm) % 2], SAMPLE_WIDTH))


def mix(first: bytes, second: bytes) -> bytes:
    """The sum of two 16-bit PCM signals (clipped), as long as the shorter one."""
    length = min(len(first), len(second))
    length -= length % SAMPLE_WIDTH
    return audioop.add(first[:length], second[:length], SAMPLE_WIDTH)


def stereo(left: bytes, right: bytes) -> bytes:
    """Two 16-bit mono PCM signals interleaved into one stereo signal, as long as the shorter."""
    length = min(len(left), len(right))
    length -= length % SAMPLE_WIDTH
    return audioop.add(
        audioop.tostereo(left[:length], SAMPLE_WIDTH, 1, 0),
        audioop.tostereo(right[:length], SAMPLE_WIDTH, 0, 1),
        SAMPLE_WIDTH,
    )
