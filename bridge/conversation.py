"""A conversation: one accepted call's pipeline stream and, once the PBX connects the call's
audio, the media session between the two.

The call flow owns each conversation and awaits it: :meth:`Conversations.open` opens the
pipeline while the call still rings (so it can begin speaking the first message),
:meth:`Conversation.run` pumps the call's audio until the conversation ends and says why, and
:meth:`Conversation.close` tells the pipeline the call's final end reason and closes the stream.
The pipeline's requests reach the call only through the :class:`CallControl` the flow hands to
:meth:`Conversation.run`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from bridge.audio import FRAME_MS, PlayoutBuffer, Transcoder, frame_bytes
from bridge.calls import Call
from bridge.events import MediaLeg
from bridge.media.clock import FrameClock
from bridge.media.session import CallControl, MediaSession, MediaTap, SessionResult
from bridge.models import without_secrets
from bridge.pipeline import PipelineConnection
from bridge.protocol.dialects import build_dialect
from bridge.protocol.pipeline import Dialect, SessionInfo
from bridge.routing import Accept, PipelineTarget
from bridge.settings import MediaSettings, PipelineSettings

log = logging.getLogger(__name__)

# How long a call's report waits for its media taps to finish (a recording's last second).
TAP_WRAP_UP_S = 5.0


def dialect_for(target: PipelineTarget, info: SessionInfo, org_id: str) -> Dialect:
    """The translator for a pipeline target's format."""
    return build_dialect(target.format, target.encoding, target.sample_rate, info, org_id)


def session_info(call: Call, decision: Accept, stream_id: str) -> SessionInfo:
    """What the pipeline's start message says about the call."""
    number = call.phone_number or {}
    return SessionInfo(
        call_id=call.id,
        stream_id=stream_id,
        pbx_call_id=call.facts.pbx_call_id,
        customer=call.facts.customer(),
        called_uri=call.facts.request_uri,
        headers=call.facts.header_map(),
        variables=decision.variables,
        # The pipeline is told the assistant, not the secrets that reach its servers.
        assistant=without_secrets(decision.assistant) or {},
        phone_number={k: number.get(k) for k in ("id", "sipUri", "name")} if number else None,
        encoding=decision.pipeline.encoding,
        sample_rate=decision.pipeline.sample_rate,
        call_type=call.facts.call_type,
    )


@dataclass(frozen=True)
class ConversationResult:
    """How a conversation ended, and what it counted (``call.sipbridge.media``; the taps'
    counters join once the conversation is closed, :meth:`Conversation.tap_counters`)."""

    session: SessionResult
    media: Mapping[str, int] = field(default_factory=dict)


class Conversation:
    """One call's pipeline stream, and its media session once the audio is connected."""

    def __init__(
        self,
        stream: PipelineConnection,
        dialect: Dialect,
        media_settings: MediaSettings,
        taps: Sequence[MediaTap] = (),
        frame_clock: FrameClock | None = None,
    ) -> None:
        self._stream = stream
        self._frame_clock = frame_clock
        self._dialect = dialect
        self._media_settings = media_settings
        self._taps = taps
        self._session: MediaSession | None = None
        self._closed = False
        self.running = False  # the media session is pumping audio right now
        self.session_over = asyncio.Event()  # set once the media session has stopped

    async def run(
        self,
        leg: MediaLeg,
        control: CallControl,
        ended: asyncio.Event,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = log,
    ) -> ConversationResult:
        """Pumps the call's audio over ``leg`` until the conversation ends (the caller or the
        pipeline ends it, or ``ended`` is set); the stream stays open for :meth:`close`."""
        size = frame_bytes(leg.rate)
        session = MediaSession(
            leg=leg,
            stream=self._stream,
            dialect=self._dialect,
            transcoder=Transcoder(self._dialect.encoding, self._dialect.sample_rate, leg.rate),
            playout=PlayoutBuffer(size, max_frames=self._media_settings.playout_max_ms // FRAME_MS),
            control=control,
            ended=ended,
            logger=logger,
            taps=self._taps,
            frame_clock=self._frame_clock,
        )
        self._session = session
        self.running = True
        try:
            result = await session.run()
        finally:
            self.running = False
            self.session_over.set()
        stats, playout = session.stats, session.playout
        logger.info(
            "media ended: %d frames from the caller, %d to the caller (%d of them silence), "
            "%d dropped toward the pipeline, %d toward the caller, %d late, %d shed late, "
            "%d cleared, %d unplayed at the end",
            stats.frames_from_pbx,
            stats.frames_to_pbx,
            playout.silence_frames,
            stats.dropped_to_pipeline,
            stats.dropped_to_pbx,
            stats.late_frames,
            playout.shed_frames,
            playout.cleared_frames,
            playout.queued_frames,
        )
        return ConversationResult(
            result,
            {
                "framesFromCaller": stats.frames_from_pbx,
                "framesToCaller": stats.frames_to_pbx,
                "silenceFramesToCaller": playout.silence_frames,
                "framesToPipeline": stats.frames_to_pipeline,
                "droppedToPipeline": stats.dropped_to_pipeline,
                "droppedToCaller": stats.dropped_to_pbx,
                "lateFrames": stats.late_frames,
                "marksPlayed": stats.marks_played,
                # The pipeline's audio, frame by frame: every one played, dropped (queue full),
                # shed (its time passed while the event loop was starved), cleared (barge-in)
                # or still queued when the call ended.
                "assistantFrames": playout.pushed_frames,
                "assistantFramesPlayed": playout.played_frames,
                "assistantFramesDroppedFull": playout.dropped_frames,
                "assistantFramesShedLate": playout.shed_frames,
                "assistantFramesCleared": playout.cleared_frames,
                "assistantFramesUnplayedAtEnd": playout.queued_frames,
            },
        )

    def tap_counters(self) -> dict[str, int]:
        """What the media taps counted (for ``call.sipbridge.media``), once :meth:`close`
        has waited for them; nothing if the media never ran."""
        counters: dict[str, int] = {}
        if self._session is None:
            return counters
        for tap in self._taps:
            try:
                counters.update(tap.counters())
            except Exception:  # a tap's bug must not cost the call its report
                log.exception("media tap %s could not count", tap)
        return counters

    async def close(self, reason: str) -> None:
        """Tells the pipeline the call's final end reason (``stop``, once the media ran) and
        closes the stream; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        if self._session is not None:
            await self._session.finish(reason)
            await self._wait_for_taps(self._session)
        else:
            await self._stream.aclose(reason)

    async def _wait_for_taps(self, session: MediaSession) -> None:
        # After the PBX hung up and the pipeline was told: only the report waits for this.
        for tap in self._taps:
            if tap not in session.taps:
                # The session dropped it for failing and never closed it: its files (a
                # recording's) are closed now, off the call's path.
                try:
                    tap.close()
                except Exception:
                    log.exception("media tap %s failed to close", tap)
                    continue
            try:
                async with asyncio.timeout(TAP_WRAP_UP_S):
                    await tap.wait_closed()
            except TimeoutError:
                log.warning("media tap %s still busy after %.0f s", tap, TAP_WRAP_UP_S)
            except Exception:  # a tap's bug must not cost the call its report
                log.exception("media tap %s failed to close", tap)


# Makes a call's media tap (None: this call has none), e.g. a recorder.
TapFactory = Callable[[Call, Accept], MediaTap | None]


class Conversations:
    """Opens the pipelines of accepted calls (the flow's source of conversations).

    Args:
        taps: each may give an accepted call a media tap (see docs/architecture.md).
        tls: the context wss:// pipelines are opened with (see :mod:`bridge.tls`).
    """

    def __init__(
        self,
        pipeline: PipelineSettings,
        media: MediaSettings,
        taps: Sequence[TapFactory] = (),
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._pipeline_settings = pipeline
        self._tls = tls
        self._media_settings = media
        self._tap_factories = taps
        # Every call's paced writer runs on this one clock's ticks.
        self.frame_clock = FrameClock()

    async def open(
        self,
        call: Call,
        decision: Accept,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = log,
    ) -> Conversation:
        """Opens the call's pipeline and sends the start message.

        Raises:
            PipelineError: the pipeline cannot be reached.
        """
        target = decision.pipeline
        stream = await PipelineConnection.open(
            target.url, target.headers, self._pipeline_settings, self._tls
        )
        info = session_info(call, decision, str(uuid.uuid4()))
        dialect = dialect_for(target, info, call.org_id)
        try:
            for message in dialect.opening(info):
                await stream.send(message)
        except BaseException:
            await stream.aclose("start failed")
            raise
        logger.info("pipeline %s open (%s)", target.url, dialect.name)
        taps = [tap for make in self._tap_factories if (tap := make(call, decision)) is not None]
        return Conversation(stream, dialect, self._media_settings, taps, self.frame_clock)
