"""One call's conversation: the PBX audio leg and the pipeline stream, pumped both ways.

Per call: the leg's events taken in its socket's callback, a pipeline reader, a writer on the
shared frame clock, a control sender, and watchers of the call and of its transfer; nothing
per frame is scheduled separately:

- PBX side: the leg hands each event to the session from its socket's callback (no task
  woken per frame): caller audio, converted to the pipeline's format, goes to the pipeline at
  once; DTMF goes through the control sender. Asterisk sends nothing during gaps in the
  caller's RTP; nothing waits for it.
- pipeline reader: always drains the websocket (keepalive pings are only answered while
  someone reads); audio goes to the playout buffer, control messages are acted on.
- paced writer: every 20 ms on an absolute schedule, the next frame from the playout buffer
  (silence when it is empty) goes to the PBX, which neither paces nor fills silence itself.
  Marks are echoed once the frame before them went out. It is not a loop of its own: one
  :class:`~bridge.media.clock.FrameClock` tick runs every call's writer (one timer per 20 ms
  for the whole service, not one per call).
- control sender: mark echoes go out through one bounded outbox, so a pipeline that reads
  slowly can never hold up the paced writer (and the echoes keep their order).

A pipeline that ends the call (``end-call``) or closes its stream cleanly first has its queued
audio played out (its goodbye), within the time that audio lasts plus a short grace.

The session ends when the caller hangs up, the pipeline ends or fails, the call is transferred,
or the call flow ends the call (``ended``). :meth:`MediaSession.run` returns why; the owner (the
call flow, through :class:`bridge.conversation.Conversation`) ends the call with that reason,
has the PBX hang up if it still has the call, then :meth:`MediaSession.finish` tells the
pipeline the call's final reason (``stop``) and closes its stream. Requests from the pipeline
(transfer, send-dtmf, transcripts) reach the call through one narrow :class:`CallControl`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from bridge.audio import FRAME_MS, Pacer, PlayoutBuffer, Transcoder
from bridge.calls import EndedReason
from bridge.events import LegAudio, LegDtmf, LegEvent, MediaLeg
from bridge.media.clock import FrameClock
from bridge.protocol.pipeline import (
    AudioIn,
    Clear,
    Dialect,
    EndCall,
    Ignored,
    MarkIn,
    Report,
    SendDtmf,
    TransferCall,
)
from bridge.tasks import cancel_and_wait

log = logging.getLogger(__name__)

T = TypeVar("T")

# Reasons a pipeline may give with end-call; anything else is reported as assistant-ended-call.
PIPELINE_END_REASONS = frozenset(
    {
        EndedReason.ASSISTANT_ENDED_CALL,
        EndedReason.ASSISTANT_ENDED_CALL_AFTER_MESSAGE,
        EndedReason.ASSISTANT_SAID_END_CALL_PHRASE,
        EndedReason.SILENCE_TIMED_OUT,
        EndedReason.EXCEEDED_MAX_DURATION,
    }
)
# Close codes of a pipeline that finished on purpose (RFC 6455: normal, going away).
_CLEAN_CLOSE = (1000, 1001)
# After end-call, audio still arriving may extend the goodbye by at most this much beyond what
# was queued then: a pipeline that keeps streaming cannot keep the call up.
END_CALL_GRACE_S = 3.0
# Control messages (mark echoes) waiting for a slow pipeline; beyond this it is not reading.
OUTBOX_MAX_MESSAGES = 256


def _settling(
    done: asyncio.Future[SessionResult], step: Callable[[T], SessionResult | None]
) -> Callable[[T], None]:
    """A callback for a leg or the frame clock: runs ``step`` until it gives the session's
    result, and settles ``done`` with it. A step that raises settles ``done`` with the error
    (the session ends this call, WORKER_DIED) and never reaches the leg or the clock."""

    def callback(value: T) -> None:
        if done.done():
            return
        try:
            result = step(value)
        except Exception as exc:
            done.set_exception(exc)
            return
        if result is not None:
            done.set_result(result)

    return callback


class PipelineStream(Protocol):
    """A call's websocket to the conversational pipeline."""

    async def send(self, message: str | bytes) -> None:
        """Sends one message."""

    def send_audio(self, data: str | bytes) -> bool:
        """Sends audio now unless the pipeline is not keeping up or gone (then drops it,
        returns False); never waits."""

    async def receive(self) -> str | bytes | None:
        """The next message, or None once closed."""

    @property
    def close_code(self) -> int | None:
        """The websocket close code once closed."""

    @property
    def close_detail(self) -> str:
        """How the websocket closed, in words, once closed."""

    async def aclose(self, reason: str = "") -> None:
        """Closes the websocket."""


@dataclass(frozen=True)
class SessionResult:
    """Why the conversation ended.

    Attributes:
        reason: the end reason the session saw; None when the call was ended from outside
            (``ended`` was set: the call already has its reason).
        message: details for ``endedMessage``.
        caller_hung_up: the leg reported the caller's hangup (the PBX has no call left to end).
    """

    reason: EndedReason | None
    message: str | None = None
    caller_hung_up: bool = False


class CallControl(Protocol):
    """What a conversation may ask of its call: the pipeline's requests, nothing else."""

    async def transfer(self, destination: Mapping[str, Any]) -> bool:
        """Blind-transfers the call; True once the PBX has taken it."""

    async def send_dtmf(self, digits: str) -> None:
        """Plays DTMF digits to the caller."""

    def report(self, kind: str, payload: Mapping[str, Any]) -> None:
        """A transcript or message for the end-of-call report."""


class MediaTap(Protocol):
    """Sees both directions of a call's audio at the PBX's rate, one 20 ms frame at a time.

    Called on the session's real-time path: a tap only hands frames on (a bounded queue, a
    buffer written elsewhere) and never blocks or does I/O. A tap that raises is dropped for
    the rest of the call (logged); the call goes on.
    """

    def caller_audio(self, pcm: bytes) -> None:
        """A frame the caller said (16-bit PCM at the leg's rate)."""

    def played_audio(self, pcm: bytes) -> None:
        """A frame the caller heard: every 20 ms tick, silence where nothing was played (and
        where the PBX was not reading, the frame dropped)."""

    def close(self) -> None:
        """The session is over: no more frames."""

    async def wait_closed(self) -> None:
        """Returns once what the tap handed on is done with (a recording's last second on
        disk); the call's report waits for it, the call's end does not."""

    def counters(self) -> Mapping[str, int]:
        """What the tap counted, for the call's media counters (``call.sipbridge.media``);
        asked after :meth:`wait_closed`."""


@dataclass
class SessionStats:
    """Counters for logs and metrics."""

    frames_from_pbx: int = 0
    frames_to_pbx: int = 0
    frames_to_pipeline: int = 0
    dropped_to_pipeline: int = 0
    dropped_to_pbx: int = 0
    ignored_messages: int = 0
    marks_played: int = 0
    late_frames: int = 0
    max_lateness_s: float = 0.0
    shed_stalls: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class MediaSession:
    """Pumps one call's audio between its PBX leg and its pipeline stream."""

    def __init__(
        self,
        *,
        leg: MediaLeg,
        stream: PipelineStream,
        dialect: Dialect,
        transcoder: Transcoder,
        playout: PlayoutBuffer,
        control: CallControl,
        ended: asyncio.Event,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = log,
        clock: Callable[[], float] = time.monotonic,
        taps: Sequence[MediaTap] = (),
        frame_clock: FrameClock | None = None,
    ) -> None:
        self.leg = leg
        self.stream = stream
        self.dialect = dialect
        self.transcoder = transcoder
        self.playout = playout
        self.control = control
        self.ended = ended
        self.log = logger
        self.clock = clock
        self.stats = SessionStats()
        self._ignored_reasons: set[str] = set()
        self.taps = tuple(taps)
        # Shared by every call of the service (one timer per tick); a session alone gets its own.
        self.frame_clock = frame_clock or FrameClock()
        self._pacer = Pacer(0.0)  # replaced when the writer subscribes to the clock
        self._ending: SessionResult | None = None
        self._ending_deadline = 0.0
        self._outbox: asyncio.Queue[str | bytes] = asyncio.Queue(OUTBOX_MAX_MESSAGES)
        # One transfer at a time: a PBX may take a minute to know whether it worked (the
        # destination rings), and the pipeline's messages (its pings) must be read meanwhile.
        self._transfers: asyncio.Queue[Mapping[str, Any]] = asyncio.Queue(1)

    async def run(self) -> SessionResult:
        """Runs until the conversation ends; says why. The stream stays open for
        :meth:`finish`."""
        loops = {
            asyncio.ensure_future(self._from_pbx()),
            asyncio.ensure_future(self._from_pipeline()),
            asyncio.ensure_future(self._writer()),
            asyncio.ensure_future(self._send_controls()),
            asyncio.ensure_future(self._watch_call()),
            asyncio.ensure_future(self._transfer()),
        }
        try:
            done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(loops)
            for tap in self.taps:
                self._tap(tap, tap.close)
        finished = next(iter(done))
        if finished.cancelled():
            return SessionResult(EndedReason.WORKER_DIED, "media loop cancelled")
        if finished.exception() is not None:
            # Task boundary: a bug in one call's media must end that call cleanly.
            self.log.error("media loop failed", exc_info=finished.exception())
            return SessionResult(EndedReason.WORKER_DIED, repr(finished.exception()))
        return finished.result()

    async def finish(self, reason: str) -> None:
        """Tells the pipeline the call's final end reason (``stop``) and closes the stream."""
        with contextlib.suppress(Exception):
            # Best effort: the pipeline may already be gone. Echoes still queued go first.
            async with asyncio.timeout(1.0):
                while not self._outbox.empty():
                    await self.stream.send(self._outbox.get_nowait())
                await self.stream.send(self.dialect.stop(reason))
        await self.stream.aclose(reason)

    async def _send_controls(self) -> SessionResult:
        while True:
            message = await self._outbox.get()
            await self.stream.send(message)

    async def _transfer(self) -> SessionResult:
        """Carries out the pipeline's transfer requests, one at a time; the conversation goes
        on while the PBX tries, and after a transfer that failed."""
        while True:
            destination = await self._transfers.get()
            if await self.control.transfer(destination):
                return SessionResult(EndedReason.ASSISTANT_FORWARDED_CALL)

    async def _watch_call(self) -> SessionResult:
        await self.ended.wait()
        return SessionResult(None)

    async def _from_pbx(self) -> SessionResult:
        """Takes the leg's events as they arrive (the leg calls :meth:`_leg_event` from its
        socket's callback: no task step per frame) until the leg closes."""
        done: asyncio.Future[SessionResult] = asyncio.get_running_loop().create_future()
        self.leg.deliver(_settling(done, self._leg_event))
        try:
            return await done
        finally:
            self.leg.deliver(None)

    def _leg_event(self, event: LegEvent) -> SessionResult | None:
        if isinstance(event, LegAudio):
            stats = self.stats
            stats.frames_from_pbx += 1
            for tap in self.taps:
                self._tap(tap, tap.caller_audio, event.pcm)
            pcm = self.transcoder.to_pipeline(event.pcm)
            if self.stream.send_audio(self.dialect.audio(pcm)):
                stats.frames_to_pipeline += 1
            else:
                stats.dropped_to_pipeline += 1
            return None
        if isinstance(event, LegDtmf):
            self.log.info("caller pressed %s", event.digit)
            # Through the outbox: in order with the mark echoes, and never waited for here.
            self._send_control(self.dialect.dtmf(event.digit), "dtmf_dropped")
            return None
        if event.by_caller:
            return SessionResult(EndedReason.CUSTOMER_ENDED_CALL, caller_hung_up=True)
        self.log.error("media leg failed: %s", event.detail)
        return SessionResult(EndedReason.MEDIA_LEG_CLOSED, event.detail)

    async def _from_pipeline(self) -> SessionResult:
        while True:
            message = await self.stream.receive()
            if message is None:
                code = self.stream.close_code
                if self._ending is None and code in _CLEAN_CLOSE:
                    self._end_after_playout(
                        SessionResult(
                            EndedReason.ASSISTANT_ENDED_CALL, "pipeline closed the stream"
                        )
                    )
                if self._ending is not None:
                    # A pipeline that said goodbye and closed (Pipecat's end-call, then its
                    # EndFrame): the writer plays out what is queued and ends the session with
                    # the reason the pipeline gave.
                    if self.playout.idle:
                        return self._ending
                    await asyncio.Future()  # the writer finishes the session
                detail = f"pipeline connection lost (close code {code})"
                if self.stream.close_detail:
                    detail = f"{detail}: {self.stream.close_detail}"
                self.log.error("%s", detail)
                return SessionResult(EndedReason.PIPELINE_FAILED, detail)
            result = await self._handle(self.dialect.receive(message))
            if result is not None:
                return result

    async def _handle(self, event: object) -> SessionResult | None:
        if isinstance(event, AudioIn):
            if self._ending is not None and self.clock() >= self._ending_deadline:
                self.stats.extra["audio_after_end_call"] = (
                    self.stats.extra.get("audio_after_end_call", 0) + 1
                )
                return None
            pcm = self.transcoder.from_pipeline(event.data)
            dropped = self.playout.push(pcm)
            if dropped:
                self.stats.dropped_to_pbx += dropped
                self.log.warning("playout queue full: dropped %d frames", dropped)
        elif isinstance(event, Clear):
            cleared = self.playout.clear()
            self.transcoder.clear_from_pipeline()
            self.log.debug("clear: dropped queued audio, %d marks", len(cleared))
            self._marks_played(cleared)
        elif isinstance(event, MarkIn):
            self._marks_played(self.playout.mark(event.name))
        elif isinstance(event, EndCall):
            reason = EndedReason.ASSISTANT_ENDED_CALL
            if event.reason in {r.value for r in PIPELINE_END_REASONS}:
                reason = EndedReason(event.reason)
            self.log.info(
                "pipeline ends the call (%s); playing out %d frames first",
                reason.value,
                self.playout.queued_frames,
            )
            self._end_after_playout(SessionResult(reason, event.message))
            if self.playout.idle:
                return self._ending
        elif isinstance(event, TransferCall):
            try:
                self._transfers.put_nowait(event.destination)
            except asyncio.QueueFull:
                self.log.warning("ignored a transfer request: another transfer is under way")
        elif isinstance(event, SendDtmf):
            await self.control.send_dtmf(event.digits)
        elif isinstance(event, Report):
            self.control.report(event.kind, event.payload)
        elif isinstance(event, Ignored):
            self.stats.ignored_messages += 1
            # Once per kind of fault: a pipeline repeating one 50 times a second logs it once,
            # and a second kind of fault is still seen. Reasons are a fixed set of phrases.
            if event.reason not in self._ignored_reasons:
                self._ignored_reasons.add(event.reason)
                self.log.warning(
                    "ignored a pipeline message: %s%s (logged once per call)",
                    event.reason,
                    f": {event.detail}" if event.detail else "",
                )
        return None

    def _tap(self, tap: MediaTap, call: Callable[..., None], *args: bytes) -> None:
        try:
            call(*args)
        except Exception:
            # A tap's failure (a full disk behind a recorder) must never cost the call.
            self.log.exception("media tap %s failed; dropped for the rest of the call", tap)
            # A new tuple: a loop over the old one goes on to the other taps.
            self.taps = tuple(other for other in self.taps if other is not tap)

    def _end_after_playout(self, result: SessionResult) -> None:
        """Ends the session once the queued audio has played (at the latest by a deadline)."""
        if self._ending is None:
            self._ending = result
            queued_s = self.playout.queued_frames * FRAME_MS / 1000
            self._ending_deadline = self.clock() + queued_s + END_CALL_GRACE_S

    def _marks_played(self, names: list[str]) -> None:
        for name in names:
            self.stats.marks_played += 1
            self._send_control(self.dialect.mark(name), "marks_dropped")

    def _send_control(self, message: str | bytes, dropped_counter: str) -> None:
        """Queues a control message (a mark echo, a key press) for the pipeline."""
        try:
            self._outbox.put_nowait(message)
        except asyncio.QueueFull:
            self.stats.extra[dropped_counter] = self.stats.extra.get(dropped_counter, 0) + 1
            self.log.warning("pipeline is not reading: %s", dropped_counter.replace("_", " "))

    async def _writer(self) -> SessionResult:
        """The paced writer: the frame clock's ticks send what is due (see _write_due)."""
        done: asyncio.Future[SessionResult] = asyncio.get_running_loop().create_future()
        subscription, first_due = self.frame_clock.subscribe(_settling(done, self._write_due))
        self._pacer = Pacer(first_due)
        try:
            return await done
        finally:
            self.frame_clock.unsubscribe(subscription)

    def _write_due(self, now: float) -> SessionResult | None:
        """At a tick: sends the frames due by ``now`` (one, unless the loop was late), or sheds
        them when it was too late to catch up; returns the result once the session is over."""
        pacer, playout, leg, stats = self._pacer, self.playout, self.leg, self.stats
        behind = now - pacer.next_due
        missed = pacer.skip_missed(now)
        if missed:
            stats.late_frames += 1
            stats.max_lateness_s = max(stats.max_lateness_s, behind)
            self._shed(missed)
        # Half a period of slack: a tick's timer may fire a hair before its due time.
        while pacer.next_due <= now + pacer.period_s / 2:
            lateness = now - pacer.next_due
            if lateness > 0.005:
                stats.late_frames += 1
                stats.max_lateness_s = max(stats.max_lateness_s, lateness)
            frame, marks = playout.next_frame()
            if leg.send_audio(frame):
                stats.frames_to_pbx += 1
            else:
                stats.dropped_to_pbx += 1
                frame = bytes(len(frame))  # the caller heard nothing of it
            for tap in self.taps:
                self._tap(tap, tap.played_audio, frame)
            pacer.sent()
            if marks:
                self._marks_played(marks)
            if self._ending is not None and (playout.idle or self.clock() >= self._ending_deadline):
                return self._ending
        return None

    def _shed(self, missed: int) -> None:
        """The loop was starved past catching up: the audio due meanwhile is dropped, not
        played late, so the caller's delay stays bounded by the pacer's ``max_late_s``."""
        shed, marks = self.playout.skip(missed)
        self.stats.shed_stalls += 1
        if shed and self.stats.shed_stalls <= 3:
            self.log.warning(
                "media writer starved for %d ms: shed %d frames of queued audio",
                missed * FRAME_MS,
                shed,
            )
        silence = bytes(self.playout.frame_size)
        for _ in range(missed):
            for tap in self.taps:
                # What the caller heard meanwhile: nothing (recordings keep the call's time).
                self._tap(tap, tap.played_audio, silence)
        if marks:
            self._marks_played(marks)
