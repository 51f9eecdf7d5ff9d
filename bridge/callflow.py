"""The PBX-neutral call flow: from an offered INVITE to an ended call record.

Both PBX adapters report calls as :mod:`bridge.events` facts and carry out the decisions through
the :class:`PbxControl` interface; everything between (routing, the assistant-request, status
updates, the end-of-call report, timers, the call record) is written once, here.

For each offered call::

    offer() ── ringing ── route (store, maybe assistant-request) ──┬─ Reject:   PBX rejects, ended
                                                                    ├─ Transfer: forwarding, PBX
                                                                    │            transfers, ended
                                                                    └─ Accept:   PBX answers and
                     connects media ── in-progress ── media attached ── ... ── end_call()/hung_up()

A call ends exactly once (see :mod:`bridge.calls`); whoever ends it first names the reason, and
the record and the server messages follow from that single transition.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from bridge.calls import (
    SIP_SERVER_ERROR,
    SIP_SERVICE_UNAVAILABLE,
    SIP_TEMPORARILY_UNAVAILABLE,
    Call,
    CallEvent,
    CallStatus,
    EndedReason,
)
from bridge.errors import PbxError, PipelineError, StoreError, ValidationFailed
from bridge.events import InviteFacts, PbxKind
from bridge.logs import CallLogger, call_logger
from bridge.messages import (
    END_OF_CALL_REPORT,
    STATUS_UPDATE,
    WebhookTarget,
    assistant_request,
    end_of_call_report,
    status_update,
    target_for,
)
from bridge.metrics import Metrics
from bridge.models import DEFAULT_MAX_DURATION_S, validate_destination
from bridge.records import CallRecorder
from bridge.resources import Resources
from bridge.routing import (
    ASSISTANT_REQUEST_BUDGET_S,
    Accept,
    AnswerAssistantId,
    AskServer,
    Decision,
    Reject,
    RoutingDefaults,
    Transfer,
    UseAssistant,
    accept,
    call_variables,
    decide_answer,
    fallback_or_reject,
    match_phone_number,
    parse_answer,
    plan_call,
)
from bridge.tasks import TaskSet
from bridge.templating import render_destination
from bridge.webhooks import WebhookClient, WebhookDispatcher

log = logging.getLogger(__name__)

PBX_ACTION_TIMEOUT_S = 10.0
MEDIA_WRAP_UP_S = 3.0


class PbxControl(Protocol):
    """What the call flow asks of a PBX adapter. Every method may raise :class:`PbxError`."""

    kind: PbxKind

    async def reject(self, facts: InviteFacts, sip_status: int) -> None:
        """Refuses the (unanswered) call with this final SIP status."""

    async def transfer(self, facts: InviteFacts, destination: Mapping[str, Any]) -> None:
        """Blind-transfers the call to a Vapi transfer destination (``number`` or ``sip``)."""

    async def connect_media(self, facts: InviteFacts, call_id: str) -> None:
        """Answers the call and connects its audio to sipbridge's media server, tagged call_id."""

    async def hangup(self, facts: InviteFacts) -> None:
        """Ends the call."""

    async def send_dtmf(self, facts: InviteFacts, digits: str) -> None:
        """Plays DTMF digits to the caller."""


class MediaHooks(Protocol):
    """How the flow gets a call's conversation ready (implemented by the conversations)."""

    async def prepare(self, live: LiveCall) -> None:
        """Opens the call's pipeline before the PBX answers.

        Raises:
            PipelineError: the pipeline cannot be reached; the call is refused.
        """

    def discard(self, call_id: str) -> None:
        """The call ended before its media leg attached: releases what prepare() opened."""


class NoMedia:
    """Media hooks for a flow without a media path (the API-only service, tests)."""

    async def prepare(self, live: LiveCall) -> None:
        """Nothing to open."""

    def discard(self, call_id: str) -> None:
        """Nothing to release."""


@dataclass
class LiveCall:
    """A call that has not ended, with what the flow needs to control it."""

    call: Call
    pbx: PbxControl
    log: CallLogger
    decision: Accept | None = None
    routing: asyncio.Task[None] | None = None
    media_prepared: bool = False
    media_attached: bool = False
    media_done: asyncio.Event = field(default_factory=asyncio.Event)
    transfer_reason: EndedReason | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    timers: list[asyncio.TimerHandle] = field(default_factory=list)


class CallFlow:
    """Runs every call from offer to end. Owns the calls' tasks and timers."""

    def __init__(
        self,
        *,
        resources: Resources,
        recorder: CallRecorder,
        webhook_client: WebhookClient,
        dispatcher: WebhookDispatcher,
        defaults: RoutingDefaults,
        metrics: Metrics,
        clock: Callable[[], datetime],
        org_id: str,
        media_timeout_s: float | None,
        new_call_id: Callable[[], str],
        media: MediaHooks | None = None,
        assistant_request_budget_s: float = ASSISTANT_REQUEST_BUDGET_S,
    ) -> None:
        self._resources = resources
        self._recorder = recorder
        self._webhook_client = webhook_client
        self._dispatcher = dispatcher
        self._defaults = defaults
        self._metrics = metrics
        self._clock = clock
        self._org_id = org_id
        self._media_timeout_s = media_timeout_s
        self._new_call_id = new_call_id
        self._media: MediaHooks = media or NoMedia()
        # Fixed by Vapi's contract; only tests shorten it.
        self._budget_s = assistant_request_budget_s
        self._by_id: dict[str, LiveCall] = {}
        self._by_pbx: dict[tuple[str, str], LiveCall] = {}
        self._tasks = TaskSet("callflow")
        self.draining = False

    # ---- queries ------------------------------------------------------------------------------

    def active(self) -> list[Call]:
        """Calls not yet ended, oldest first."""
        return [live.call for live in self._by_id.values()]

    def get(self, call_id: str) -> Call | None:
        """A live call by sipbridge id."""
        live = self._by_id.get(call_id)
        return live.call if live else None

    def find_pbx_call(self, pbx: str, pbx_call_id: str) -> Call | None:
        """A live call by the PBX's id for it."""
        live = self._by_pbx.get((pbx, pbx_call_id))
        return live.call if live else None

    # ---- from the PBX -------------------------------------------------------------------------

    def offer(self, facts: InviteFacts, pbx: PbxControl) -> Call | None:
        """A new inbound call: records it and starts deciding who takes it.

        Returns:
            The new call, or None if the PBX offered a call already known (e.g. after a resync).
        """
        key = (facts.pbx, facts.pbx_call_id)
        if key in self._by_pbx:
            return None
        now = self._clock()
        call = Call(
            id=self._new_call_id(), org_id=self._org_id, facts=facts, created_at=now, updated_at=now
        )
        live = LiveCall(call, pbx, call_logger(log, call.id))
        self._by_id[call.id] = live
        self._by_pbx[key] = live
        self._metrics.calls_active.set(len(self._by_id))
        live.log.info(
            "offered by %s: %s from %s (%s), %d X- headers",
            facts.pbx,
            facts.request_uri,
            facts.from_number,
            facts.from_name,
            len(facts.headers),
        )
        self._recorder.save(call.to_json())
        live.routing = self._tasks.spawn(self._route(live), f"route-{call.id}")
        return call

    def hung_up(self, pbx: str, pbx_call_id: str, *, by_caller: bool = True) -> None:
        """The PBX reports the call is gone."""
        live = self._by_pbx.get((pbx, pbx_call_id))
        if live is None:
            return
        status = live.call.status
        if status is CallStatus.RINGING:
            if live.routing is not None and not live.routing.done():
                live.routing.cancel()
            self._metrics.calls_total.labels("abandoned").inc()
            reason = EndedReason.CALLER_HUNG_UP_BEFORE_CONNECT
        elif status is CallStatus.FORWARDING:
            reason = live.transfer_reason or EndedReason.ASSISTANT_FORWARDED_CALL
        else:
            reason = (
                EndedReason.CUSTOMER_ENDED_CALL if by_caller else EndedReason.SIP_COMPLETED_CALL
            )
        self._end(live, reason)

    # ---- from the media side ------------------------------------------------------------------

    def attach_media(self, call_id: str) -> LiveCall | None:
        """The PBX opened the audio leg for ``call_id``; None if no accepted call is waiting."""
        live = self._by_id.get(call_id)
        if live is None or live.decision is None or live.media_attached or live.call.is_ended:
            return None
        live.media_attached = True
        live.log.info("media attached")
        return live

    # ---- ending -------------------------------------------------------------------------------

    async def end_call(
        self, call_id: str, reason: EndedReason, *, message: str | None = None, hangup: bool = True
    ) -> bool:
        """Ends a live call for ``reason`` and (by default) hangs it up at the PBX.

        Returns:
            False if the call had already ended.
        """
        live = self._by_id.get(call_id)
        if live is None or not self._end(live, reason, message=message):
            return False
        if hangup:
            await self._pbx_hangup(live)
        return True

    def end_now(self, call_id: str, reason: EndedReason, message: str | None = None) -> bool:
        """Ends a live call without touching the PBX (the caller tells it next)."""
        live = self._by_id.get(call_id)
        return live is not None and self._end(live, reason, message=message)

    async def pbx_hangup(self, live: LiveCall) -> None:
        """Asks the PBX to hang up a call (ended or not); failures are logged."""
        await self._pbx_hangup(live)

    async def hangup(self, call_id: str) -> bool:
        """Hangs up a live call on an operator's request (``manually-canceled``)."""
        return await self.end_call(call_id, EndedReason.MANUALLY_CANCELED)

    # ---- pipeline failures --------------------------------------------------------------------

    def can_fall_back(self, call_id: str) -> bool:
        """Whether a pipeline failure would send this call to a fallbackDestination."""
        live = self._by_id.get(call_id)
        return (
            live is not None and self._fallback(live, EndedReason.PIPELINE_FAILED, "") is not None
        )

    async def pipeline_failed(self, call_id: str, reason: EndedReason, detail: str | None) -> None:
        """The pipeline failed mid-call: on to the fallbackDestination if there is one (the
        call's endedReason stays ``reason``), else the call ends and is hung up."""
        live = self._by_id.get(call_id)
        if live is None:
            return
        fallback = self._fallback(live, reason, detail or "")
        if fallback is None:
            await self.end_call(call_id, reason, message=detail)
            return
        await self._transfer(live, fallback)

    def _fallback(self, live: LiveCall, reason: EndedReason, detail: str) -> Transfer | None:
        if not self._defaults.pipeline_fallback or live.call.is_ended:
            return None
        call = live.call
        decision = fallback_or_reject(
            call.phone_number,
            reason,
            detail,
            variables=(call.variable_values, call.variables),
            now=self._clock(),
        )
        return decision if isinstance(decision, Transfer) else None

    # ---- requests from the pipeline -----------------------------------------------------------

    async def transfer(self, call_id: str, destination: Mapping[str, Any]) -> bool:
        """Blind-transfers a live call (the pipeline asked); True once the PBX took it.

        The destination is validated like a phone number's fallbackDestination and its
        ``message``/``callerId`` rendered with the call's variables. On failure the call goes
        on with its assistant.
        """
        live = self._by_id.get(call_id)
        if live is None or live.call.is_ended:
            return False
        try:
            checked = validate_destination(destination)
        except ValidationFailed as exc:
            live.log.warning("refused a transfer request: %s", "; ".join(exc.problems))
            return False
        call = live.call
        rendered = render_destination(checked, call.variables, self._clock())
        previous = call.status
        call.destination = rendered
        call.apply(CallEvent.FORWARD, self._clock())
        live.transfer_reason = EndedReason.ASSISTANT_FORWARDED_CALL
        self._recorder.save(call.to_json())
        self._notify(call, STATUS_UPDATE)
        live.log.info("pipeline transfers the call to %s", _describe(rendered))
        if await self._pbx_action(live, "transferring", live.pbx.transfer(call.facts, rendered)):
            self._end(live, EndedReason.ASSISTANT_FORWARDED_CALL)
            return True
        if not call.is_ended and previous is CallStatus.IN_PROGRESS:
            call.apply(CallEvent.RESUME, self._clock())
            call.destination = None
            self._recorder.save(call.to_json())
            self._notify(call, STATUS_UPDATE)
        return False

    async def send_dtmf(self, call_id: str, digits: str) -> None:
        """Plays DTMF to the caller (the pipeline asked)."""
        live = self._by_id.get(call_id)
        if live is not None and not live.call.is_ended:
            await self._pbx_action(
                live, "sending DTMF", live.pbx.send_dtmf(live.call.facts, digits)
            )

    def report(self, call_id: str, kind: str, payload: Mapping[str, Any]) -> None:
        """A transcript or message from the pipeline, kept for the end-of-call report.

        ``transcript`` messages with ``transcriptType: final`` add a line to the transcript
        and a message (``role`` user or bot); ``message``/``conversation-update`` messages with
        a ``message`` object or ``messages`` list are added as they are.
        """
        live = self._by_id.get(call_id)
        if live is None:
            return
        call = live.call
        now_ms = int(self._clock().timestamp() * 1000)
        started = call.started_at or call.created_at
        if kind == "transcript":
            if payload.get("transcriptType", "final") != "final":
                return
            text = str(payload.get("transcript", "")).strip()
            if not text:
                return
            role = "bot" if payload.get("role") in ("assistant", "bot") else "user"
            call.messages.append(
                {
                    "role": role,
                    "message": text,
                    "time": now_ms,
                    "secondsFromStart": round(now_ms / 1000 - started.timestamp(), 3),
                }
            )
            speaker = "AI" if role == "bot" else "User"
            call.transcript = f"{call.transcript}\n{speaker}: {text}".lstrip("\n")
            return
        messages = payload.get("messages")
        single = payload.get("message")
        items = (
            messages if isinstance(messages, list) else [single] if isinstance(single, dict) else []
        )
        for item in items[:100]:
            if isinstance(item, dict) and isinstance(item.get("role"), str):
                call.messages.append(dict(item))

    def _end(
        self,
        live: LiveCall,
        reason: EndedReason,
        *,
        message: str | None = None,
        sip_status: int | None = None,
    ) -> bool:
        call = live.call
        if not call.end(reason, self._clock(), message=message, sip_status=sip_status):
            return False
        live.ended.set()
        for timer in live.timers:
            timer.cancel()
        live.timers.clear()
        if live.media_prepared and not live.media_attached:
            self._media.discard(call.id)
        self._by_id.pop(call.id, None)
        self._by_pbx.pop((call.facts.pbx, call.facts.pbx_call_id), None)
        self._metrics.calls_active.set(len(self._by_id))
        self._metrics.calls_ended_total.labels(reason.value).inc()
        live.log.info(
            "ended: %s%s after %.1f s",
            reason.value,
            f" ({message})" if message else "",
            call.duration_seconds,
        )
        self._recorder.save(call.to_json())
        self._notify(call, STATUS_UPDATE)
        if live.media_attached and not live.media_done.is_set():
            # The report comes "when post-processing is complete": after the media session
            # has handed over its counters and last transcript lines.
            self._tasks.spawn(self._report_after_media(live), f"report-{call.id}")
        else:
            self._report(call)
        return True

    def _report(self, call: Call) -> None:
        self._recorder.save(call.to_json())
        self._notify(call, END_OF_CALL_REPORT)

    async def _report_after_media(self, live: LiveCall) -> None:
        try:
            async with asyncio.timeout(MEDIA_WRAP_UP_S):
                await live.media_done.wait()
        except TimeoutError:
            live.log.warning(
                "media did not wrap up within %.0f s; reporting without it", MEDIA_WRAP_UP_S
            )
        finally:
            self._report(live.call)

    async def _pbx_hangup(self, live: LiveCall) -> None:
        await self._pbx_action(live, "hanging up at the PBX", live.pbx.hangup(live.call.facts))

    async def _pbx_action(
        self,
        live: LiveCall,
        what: str,
        action: Awaitable[None],
        failure: EndedReason | None = None,
    ) -> bool:
        """Runs one PBX action within its time limit; True if it succeeded.

        On failure the error is logged and, when ``failure`` is given, the call ends with that
        reason and is hung up (the PBX may still hold it).
        """
        try:
            async with asyncio.timeout(PBX_ACTION_TIMEOUT_S):
                await action
        except (PbxError, TimeoutError) as exc:
            live.log.error("%s failed: %s", what, exc or type(exc).__name__)
            if failure is not None and self._end(live, failure, message=str(exc) or None):
                await self._pbx_hangup(live)
            return False
        return True

    async def aclose(self) -> None:
        """Ends every live call (``worker-shutdown``), hanging each up, and stops all tasks."""
        self.draining = True
        lives = list(self._by_id.values())
        for live in lives:
            if live.routing is not None:
                live.routing.cancel()
        hangups = [
            self._pbx_hangup(live) for live in lives if self._end(live, EndedReason.WORKER_SHUTDOWN)
        ]
        await asyncio.gather(*hangups)
        await self._tasks.aclose()

    async def wait_idle(self) -> None:
        """Returns once no call is live (for a graceful drain)."""
        while self._by_id:
            await next(iter(self._by_id.values())).ended.wait()

    # ---- internals ----------------------------------------------------------------------------

    def _notify(self, call: Call, message_type: str) -> None:
        target = target_for(message_type, call, self._defaults.default_server)
        if target is None:
            return
        now = self._clock()
        payload = (
            end_of_call_report(call, now)
            if message_type == END_OF_CALL_REPORT
            else status_update(call, now)
        )
        self._dispatcher.submit(call.id, target, payload, message_type)

    async def _route(self, live: LiveCall) -> None:
        call = live.call
        try:
            if self.draining:
                decision: Decision = Reject(
                    SIP_SERVICE_UNAVAILABLE,
                    EndedReason.WORKER_SHUTDOWN,
                    "sipbridge is shutting down",
                )
            else:
                decision = await self._decide(live)
        except StoreError as exc:
            live.log.error("routing failed, the store is unavailable: %s", exc)
            decision = Reject(
                SIP_SERVICE_UNAVAILABLE,
                EndedReason.START_ERROR_DATABASE,
                f"store unavailable: {exc}",
            )
        except Exception as exc:
            # Task boundary: a bug must cost this call only, and the caller still gets an answer.
            live.log.exception("routing failed unexpectedly")
            decision = Reject(SIP_SERVER_ERROR, EndedReason.WORKER_DIED, f"internal error: {exc!r}")
        if call.is_ended:
            return
        await self._apply(live, decision)

    async def _decide(self, live: LiveCall) -> Decision:
        call, facts = live.call, live.call.facts
        numbers = await self._resources.phone_numbers_for_user(facts.request_user)
        number = match_phone_number(facts, numbers, self._defaults.sip_domains)
        now = self._clock()
        call.phone_number = dict(number) if number is not None else None
        call.variable_values, call.variables = call_variables(facts, call.id, number, now)
        self._notify(call, STATUS_UPDATE)
        plan = plan_call(facts, number, self._defaults)
        if isinstance(plan, Reject):
            return plan
        if isinstance(plan, UseAssistant):
            assistant = await self._resources.find("assistant", plan.assistant_id)
            if assistant is None:
                return Reject(
                    SIP_TEMPORARILY_UNAVAILABLE,
                    EndedReason.ASSISTANT_NOT_FOUND,
                    f"assistant {plan.assistant_id} does not exist",
                    call.variable_values,
                )
            return accept(
                facts,
                call_id=call.id,
                number=number,
                assistant=assistant,
                assistant_id=plan.assistant_id,
                now=now,
                defaults=self._defaults,
            )
        assert isinstance(plan, AskServer)
        target = WebhookTarget.from_server(plan.server)
        live.log.info("asking %s for an assistant", target.url)
        result = await self._webhook_client.assistant_request(
            target, assistant_request(call, now), self._budget_s
        )
        parsed = parse_answer(result)
        live.log.info("assistant-request answer: %s", type(parsed).__name__)
        saved = None
        if isinstance(parsed, AnswerAssistantId):
            saved = await self._resources.find("assistant", parsed.assistant_id)
        return decide_answer(
            parsed,
            facts=facts,
            call_id=call.id,
            number=number,
            now=self._clock(),
            defaults=self._defaults,
            saved_assistant=saved,
        )

    async def _apply(self, live: LiveCall, decision: Decision) -> None:
        call = live.call
        call.variable_values = dict(decision.variable_values)
        if isinstance(decision, Reject):
            self._metrics.calls_total.labels("rejected").inc()
            live.log.info("rejecting with SIP %d: %s", decision.sip_status, decision.message)
            self._end(
                live,
                decision.ended_reason,
                message=decision.message,
                sip_status=decision.sip_status,
            )
            await self._pbx_action(
                live, "rejecting", live.pbx.reject(call.facts, decision.sip_status)
            )
            return
        if isinstance(decision, Transfer):
            await self._transfer(live, decision)
            return
        await self._connect(live, decision)

    async def _transfer(self, live: LiveCall, decision: Transfer) -> None:
        call = live.call
        self._metrics.calls_total.labels("transferred").inc()
        call.variables = dict(decision.variables) or call.variables
        call.destination = decision.destination
        live.transfer_reason = decision.ended_reason
        call.apply(CallEvent.FORWARD, self._clock())
        live.log.info("transferring to %s (%s)", _describe(decision.destination), decision.detail)
        self._recorder.save(call.to_json())
        self._notify(call, STATUS_UPDATE)
        transferred = await self._pbx_action(
            live,
            "transferring",
            live.pbx.transfer(call.facts, decision.destination),
            failure=EndedReason.TRANSFER_FAILED,
        )
        if not transferred:
            return
        # The call has left sipbridge's hands: its record ends now, as a Vapi call does.
        self._end(live, decision.ended_reason, message=decision.detail or None)

    async def _connect(self, live: LiveCall, decision: Accept) -> None:
        call = live.call
        self._metrics.calls_total.labels("accepted").inc()
        call.assistant = decision.assistant
        call.assistant_id = decision.assistant_id
        call.variables = decision.variables
        live.decision = decision
        live.log.info(
            "accepted by assistant %s (%s); pipeline %s (%s)",
            decision.assistant_id or "inline",
            decision.assistant.get("name"),
            decision.pipeline.url,
            decision.pipeline.format,
        )
        self._recorder.save(call.to_json())
        try:
            await self._media.prepare(live)
        except PipelineError as exc:
            live.log.error("%s", exc)
            fallback = self._fallback(live, EndedReason.PIPELINE_CONNECTION_FAILED, str(exc))
            if fallback is not None:
                await self._transfer(live, fallback)
                return
            self._end(
                live,
                EndedReason.PIPELINE_CONNECTION_FAILED,
                message=str(exc),
                sip_status=SIP_TEMPORARILY_UNAVAILABLE,
            )
            await self._pbx_action(
                live, "rejecting", live.pbx.reject(call.facts, SIP_TEMPORARILY_UNAVAILABLE)
            )
            return
        live.media_prepared = True
        if call.is_ended:
            return
        if self._media_timeout_s is not None:
            live.timers.append(
                asyncio.get_running_loop().call_later(
                    self._media_timeout_s, self._media_timed_out, live
                )
            )
        connected = await self._pbx_action(
            live,
            "answering and connecting media",
            live.pbx.connect_media(call.facts, call.id),
            failure=EndedReason.SIP_INBOUND_FAILED_TO_CONNECT,
        )
        if not connected or call.is_ended:
            return
        call.apply(CallEvent.ANSWER, self._clock())
        self._recorder.save(call.to_json())
        self._notify(call, STATUS_UPDATE)
        max_duration = decision.assistant.get("maxDurationSeconds") or DEFAULT_MAX_DURATION_S
        live.timers.append(
            asyncio.get_running_loop().call_later(
                float(max_duration), self._expire, live, EndedReason.EXCEEDED_MAX_DURATION
            )
        )

    def _media_timed_out(self, live: LiveCall) -> None:
        if not live.media_attached:
            live.log.error("the PBX never connected the call's media")
            self._expire(live, EndedReason.MEDIA_NEVER_CONNECTED)

    def _expire(self, live: LiveCall, reason: EndedReason) -> None:
        if self._end(live, reason):
            self._tasks.spawn(self._pbx_hangup(live), f"hangup-{live.call.id}")


def _describe(destination: Mapping[str, Any]) -> str:
    return str(destination.get("sipUri") or destination.get("number") or destination.get("type"))
