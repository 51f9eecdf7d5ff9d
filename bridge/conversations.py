"""Conversations: each accepted call's pipeline stream, joined to its PBX audio leg.

For an accepted call the flow calls :meth:`Conversations.prepare` while the call still rings:
the pipeline websocket opens and gets the start message (so it can begin speaking the first
message). When the PBX's media leg connects with the call's id, :meth:`attach` runs the
:class:`MediaSession` until the conversation ends, then ends the call with the session's reason.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from bridge.audio import FRAME_MS, PlayoutBuffer, Transcoder, frame_bytes
from bridge.calls import EndedReason
from bridge.media.session import MediaLeg, MediaSession, SessionHooks, SessionResult
from bridge.models import without_secrets
from bridge.pipeline import PipelineConnection
from bridge.protocol.pipeline import Dialect, RawDialect, SessionInfo
from bridge.protocol.twilio import TwilioDialect
from bridge.settings import MediaSettings, PipelineSettings
from bridge.tasks import TaskSet

if TYPE_CHECKING:
    from bridge.callflow import CallFlow, LiveCall
    from bridge.routing import PipelineTarget

log = logging.getLogger(__name__)


def dialect_for(target: PipelineTarget, info: SessionInfo, org_id: str) -> Dialect:
    """The translator for a pipeline target's format."""
    if target.format == "twilio":
        return TwilioDialect(info, org_id)
    return RawDialect(target.encoding, target.sample_rate)


def session_info(live: LiveCall, stream_id: str) -> SessionInfo:
    """What the pipeline's start message says about the call."""
    call, decision = live.call, live.decision
    assert decision is not None
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
    )


@dataclass
class _Prepared:
    stream: PipelineConnection
    dialect: Dialect


class Conversations:
    """Opens pipelines for accepted calls and runs their media sessions."""

    def __init__(self, pipeline: PipelineSettings, media: MediaSettings) -> None:
        self._pipeline_settings = pipeline
        self._media_settings = media
        self._flow: CallFlow | None = None
        self._prepared: dict[str, _Prepared] = {}
        self._tasks = TaskSet("conversations")
        self.sessions = 0

    def bind(self, flow: CallFlow) -> None:
        """The flow whose calls these are (the two refer to each other)."""
        self._flow = flow

    async def prepare(self, live: LiveCall) -> None:
        """Opens the pipeline and sends the start message.

        Raises:
            PipelineError: the pipeline cannot be reached.
        """
        decision = live.decision
        assert decision is not None
        target = decision.pipeline
        stream = await PipelineConnection.open(target.url, target.headers, self._pipeline_settings)
        info = session_info(live, str(uuid.uuid4()))
        dialect = dialect_for(target, info, live.call.org_id)
        for message in dialect.opening(info):
            await stream.send(message)
        if live.call.is_ended:
            await stream.aclose("call ended")
            return
        self._prepared[live.call.id] = _Prepared(stream, dialect)
        live.log.info("pipeline %s open (%s)", target.url, dialect.name)

    def discard(self, call_id: str) -> None:
        """Closes the pipeline of a call that ended before its media attached."""
        prepared = self._prepared.pop(call_id, None)
        if prepared is not None:
            self._tasks.spawn(prepared.stream.aclose("call ended"), f"close-{call_id}")

    async def attach(self, call_id: str, leg: MediaLeg) -> None:
        """Runs the conversation of ``call_id`` over ``leg`` until it ends."""
        flow = self._flow
        assert flow is not None
        live = flow.attach_media(call_id)
        prepared = self._prepared.pop(call_id, None)
        if live is None or prepared is None:
            log.warning("media for %s, which no live call is waiting for: hanging it up", call_id)
            leg.send_hangup()
            if prepared is not None:
                await prepared.stream.aclose("no such call")
            return
        decision = live.decision
        assert decision is not None
        size = frame_bytes(leg.rate)
        session = MediaSession(
            leg=leg,
            stream=prepared.stream,
            dialect=prepared.dialect,
            transcoder=Transcoder(
                prepared.dialect.encoding, prepared.dialect.sample_rate, leg.rate
            ),
            playout=PlayoutBuffer(size, max_frames=self._media_settings.playout_max_ms // FRAME_MS),
            hooks=SessionHooks(
                transfer=lambda destination: flow.transfer(call_id, destination),
                send_dtmf=lambda digits: flow.send_dtmf(call_id, digits),
                report=lambda kind, payload: flow.report(call_id, kind, payload),
                ending=lambda result: self._ending(call_id, result),
            ),
            ended=live.ended,
            logger=live.log,
        )
        self.sessions += 1
        try:
            result = await session.run()
        finally:
            stats = session.stats
            live.call.media = {
                "framesFromCaller": stats.frames_from_pbx,
                "framesToCaller": stats.frames_to_pbx,
                "silenceFramesToCaller": session.playout.silence_frames,
                "framesToPipeline": stats.frames_to_pipeline,
                "droppedToPipeline": stats.dropped_to_pipeline,
                "droppedToCaller": stats.dropped_to_pbx,
                "lateFrames": stats.late_frames,
                "marksPlayed": stats.marks_played,
            }
            live.media_done.set()
        live.log.info(
            "media ended: %d frames from the caller, %d to the caller (%d of them silence), "
            "%d dropped toward the pipeline, %d toward the caller, %d late",
            stats.frames_from_pbx,
            stats.frames_to_pbx,
            session.playout.silence_frames,
            stats.dropped_to_pipeline,
            stats.dropped_to_pbx,
            stats.late_frames,
        )
        if result.fallback:
            assert result.reason is not None
            # Before returning: the leg must stay up until the PBX has taken the transfer.
            await flow.pipeline_failed(call_id, result.reason, result.message)
        elif result.reason is not None:
            await flow.end_call(
                call_id, result.reason, message=result.message, hangup=result.hangup
            )

    def _ending(self, call_id: str, result: SessionResult) -> SessionResult:
        flow = self._flow
        if flow is None or result.reason is None:
            return result
        if result.reason is EndedReason.PIPELINE_FAILED and flow.can_fall_back(call_id):
            return replace(result, hangup=False, fallback=True)
        flow.end_now(call_id, result.reason, result.message)
        return result

    async def aclose(self) -> None:
        """Closes pipelines that never got their media."""
        for call_id in list(self._prepared):
            self.discard(call_id)
        await self._tasks.join()

    def describe(self) -> dict[str, Any]:
        """Counts for /health."""
        return {"waitingForMedia": len(self._prepared), "sessions": self.sessions}
