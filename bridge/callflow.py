"""The PBX-neutral call flow: from an offered INVITE to an ended call record.

PBX backends report calls as :mod:`bridge.events` (:meth:`CallFlow.post`) and carry out the
decisions through :class:`bridge.backend.PbxControl`; everything between (routing, the
assistant-request, status updates, the conversation, the end-of-call report, timers, the call
record) is written once, here. Each call has one task, which owns everything the call opens::

    offer ── ringing ── route (store, maybe assistant-request) ──┬─ Reject:   PBX rejects, ended
                                                                  ├─ Transfer: forwarding, PBX
                                                                  │            transfers, ended
                                                                  └─ Accept:   pipeline opens,
        PBX answers ── in-progress ── leg connects ── conversation runs ── ended ── PBX hangs up
        (unless it said the call is gone) ── pipeline told the reason ── end-of-call-report

A call ends exactly once (see :mod:`bridge.calls`); whoever ends it first names the reason, and
the record and the server messages follow from that single transition. The conversation never
calls back into the flow except through the narrow :class:`bridge.media.session.CallControl`
(transfer, send-dtmf, transcripts); it returns one result, which the call's task acts on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bridge.backend import PbxControl
from bridge.calls import (
    SIP_SERVER_ERROR,
    SIP_SERVICE_UNAVAILABLE,
    SIP_TEMPORARILY_UNAVAILABLE,
    Call,
    CallEvent,
    CallStatus,
    EndedReason,
    outbound_not_answered,
)
from bridge.conversation import Conversation, ConversationResult, Conversations
from bridge.errors import (
    CallRefused,
    LocalProtocolError,
    PbxActionError,
    PbxError,
    PipelineError,
    StoreError,
    ValidationFailed,
)
from bridge.events import (
    CallGone,
    CallOffered,
    InviteFacts,
    LegConnected,
    MediaLeg,
    OutboundDial,
    PbxEvent,
    PbxKind,
)
from bridge.logs import CallLogger, call_logger
from bridge.media.session import SessionResult
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
from bridge.models import DEFAULT_MAX_DURATION_S, validate_destination, validate_outbound_call
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
    admit,
    admit_outbound,
    call_variables,
    decide_answer,
    fallback_or_reject,
    match_phone_number,
    outbound_caller_id,
    outbound_facts,
    outbound_rate_window,
    parse_answer,
    plan_call,
)
from bridge.tasks import TaskSet, cancel_and_wait
from bridge.templating import render_destination
from bridge.webhooks import WebhookClient, WebhookDispatcher

log = logging.getLogger(__name__)

# Templates render on the event loop; this clock bounds the CPU they may take there
# (templating.RENDER_BUDGET_S). CPU time, so a busy machine does not turn templates literal.
RENDER_CPU_CLOCK = time.thread_time

PBX_ACTION_TIMEOUT_S = 10.0
# A transfer is done once the PBX knows it worked: the destination may ring for a minute
# (freeswitch_conf/sipbridge_context.xml gives it 60 s).
TRANSFER_TIMEOUT_S = 90.0
# The PBX answers a transfer before it reports the channel gone (AMI answers the Redirect before
# the Hangup event; FreeSWITCH fails the transfer as the channel ends), yet both may reach the
# flow in either order: once the channel is gone, the transfer's answer still decides. This
# bounds the wait for a backend that never gives one.
TRANSFER_SETTLE_S = PBX_ACTION_TIMEOUT_S
MEDIA_WRAP_UP_S = 3.0
# An outbound dial the PBX has not ended this long after its ring timeout is ended here.
OUTBOUND_RING_GRACE_S = 15.0


@dataclass(eq=False)  # compared and hashed by identity: one object per call
class LiveCall:
    """A call that has not been wrapped up yet, with what its task needs to control it."""

    call: Call
    pbx: PbxControl
    log: CallLogger
    decision: Accept | None = None
    task: asyncio.Task[None] | None = None
    conversation: Conversation | None = None
    # Resolved by the PBX's LegConnected for this call, while the call waits for its audio.
    leg_waiter: asyncio.Future[MediaLeg] | None = None
    leg: MediaLeg | None = None
    # A transfer the pipeline asked for, while the PBX carries it out: it outlives the
    # conversation (the leg closes as the PBX moves the call away, which ends the session).
    transfer_in_flight: asyncio.Task[bool] | None = None
    # The PBX said the channel is gone: there is nothing left to hang up, and an action still
    # waiting on the PBX (a transfer ringing its destination) is moot.
    pbx_gone: bool = False
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    # The channel went on to a transfer: it is no longer sipbridge's to hang up.
    transferred: bool = False
    # The PBX is carrying out a transfer; and how it said the call ended meanwhile, which stands
    # only if the transfer did not work (see hung_up).
    transferring: bool = False
    gone_during_transfer: tuple[EndedReason, datetime | None] | None = None
    hangup_started: bool = False
    reported: bool = False
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    timers: list[asyncio.TimerHandle] = field(default_factory=list)


class _NoPbx:
    """The control of a call whose PBX is no longer enabled: nothing can be asked of it."""

    kind: PbxKind = "test"

    async def reject(self, facts: InviteFacts, sip_status: int) -> None:
        raise PbxActionError("no backend for this PBX")

    async def transfer(self, facts: InviteFacts, destination: Mapping[str, Any]) -> None:
        raise PbxActionError("no backend for this PBX")

    async def connect_media(self, facts: InviteFacts, call_id: str) -> None:
        raise PbxActionError("no backend for this PBX")

    def check_dial(self, dial: OutboundDial) -> str | None:
        return "no backend for this PBX"

    async def originate(self, facts: InviteFacts, call_id: str, dial: OutboundDial) -> None:
        raise PbxActionError("no backend for this PBX")

    async def hangup(self, facts: InviteFacts) -> None:
        raise PbxActionError("no backend for this PBX")

    async def send_dtmf(self, facts: InviteFacts, digits: str) -> None:
        raise PbxActionError("no backend for this PBX")


class _CallControl:
    """The pipeline's requests for one call (:class:`bridge.media.session.CallControl`)."""

    def __init__(self, flow: CallFlow, live: LiveCall) -> None:
        self._flow = flow
        self._live = live

    async def transfer(self, destination: Mapping[str, Any]) -> bool:
        live = self._live
        task = asyncio.ensure_future(self._flow._transfer_requested(live, destination))
        live.transfer_in_flight = task
        # Shielded: the session may be torn down meanwhile (the PBX closing the leg as it moves
        # the call is what ends it), and a PBX action must never be cut off halfway.
        return await asyncio.shield(task)

    async def send_dtmf(self, digits: str) -> None:
        await self._flow._send_dtmf(self._live, digits)

    def report(self, kind: str, payload: Mapping[str, Any]) -> None:
        _keep_for_report(self._live.call, kind, payload, self._flow._clock())


class CallFlow:
    """Runs every call from offer to report. Owns the calls' tasks and timers.

    Args:
        conversations: opens accepted calls' pipelines; None for a flow without a media path
            (the API-only service, tests): an accepted call then stays up until it is ended.
        recording_links: a call's recording links for its end-of-call-report's ``artifact``
            (none when it was not recorded).
    """

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
        conversations: Conversations | None = None,
        assistant_request_budget_s: float = ASSISTANT_REQUEST_BUDGET_S,
        event_loop_lag: Callable[[], float] = lambda: 0.0,
        recording_links: Callable[[Call, datetime], Mapping[str, Any]] = lambda call, now: {},
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
        self._conversations = conversations
        # Fixed by Vapi's contract; only tests shorten it.
        self._budget_s = assistant_request_budget_s
        self._event_loop_lag = event_loop_lag
        self._recording_links = recording_links
        self._controls: dict[str, PbxControl] = {}
        self._by_id: dict[str, LiveCall] = {}
        self._by_pbx: dict[tuple[str, str], LiveCall] = {}
        # Calls whose task has not finished (ended calls still closing their conversation).
        self._unfinished: set[LiveCall] = set()
        self._tasks = TaskSet("callflow")
        # When the last outbound calls started (Unix seconds), for the calls-per-second cap.
        self._outbound_starts: deque[float] = deque()
        self.draining = False
        # The pipeline's frames shed because the event loop was starved (/health).
        self.frames_shed = 0

    def register(self, control: PbxControl) -> None:
        """The PBX whose offers carry ``control.kind`` is controlled through ``control``."""
        self._controls[control.kind] = control

    # ---- queries ------------------------------------------------------------------------------

    def active(self) -> list[Call]:
        """Calls not yet ended, oldest first."""
        return [live.call for live in self._by_id.values()]

    def get(self, call_id: str) -> Call | None:
        """A live call by sipbridge id."""
        live = self._by_id.get(call_id)
        return live.call if live else None

    def wrapping_up(self, call_id: str) -> bool:
        """An ended call whose task still runs (its conversation closing, its report not sent)."""
        return any(live.call.id == call_id for live in self._unfinished)

    def find_pbx_call(self, pbx: str, pbx_call_id: str) -> Call | None:
        """A live call by the PBX's id for it."""
        live = self._by_pbx.get((pbx, pbx_call_id))
        return live.call if live else None

    def live_calls(self, pbx: PbxKind) -> set[str]:
        """The PBX call ids of the calls still live on ``pbx`` (for a backend's resync)."""
        return {pbx_call_id for (kind, pbx_call_id) in self._by_pbx if kind == pbx}

    def describe_media(self) -> dict[str, int]:
        """Conversations for ``/health``: waiting for the PBX's audio, and running now."""
        waiting = sum(
            1
            for live in self._unfinished
            if live.leg_waiter is not None and not live.leg_waiter.done()
        )
        running = sum(
            1 for live in self._unfinished if live.conversation and live.conversation.running
        )
        return {"waitingForMedia": waiting, "sessions": running}

    # ---- from the PBX -------------------------------------------------------------------------

    def post(self, event: PbxEvent) -> None:
        """One event from a PBX backend (link changes are the composition root's business)."""
        if isinstance(event, CallOffered):
            control = self._controls.get(event.facts.pbx)
            if control is None:
                log.error("an offer from %s, which no backend controls", event.facts.pbx)
                return
            self.offer(event.facts, control)
        elif isinstance(event, CallGone):
            self.hung_up(
                event.pbx,
                event.pbx_call_id,
                by_caller=event.by_caller,
                ended_at=event.ended_at,
                unanswered=event,
            )
        elif isinstance(event, LegConnected):
            self._leg_connected(event.call_id, event.leg)

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
        self._unfinished.add(live)
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
        self._start(live, lambda: self._route_and_apply(live))
        return call

    async def create_outbound(self, body: Mapping[str, Any], pbx: PbxControl) -> Call:
        """``POST /call``: checks the body, the caps and the resources it names, renders the
        assistant for the customer, and places the call (it is ``queued`` when this returns).

        Raises:
            ValidationFailed: the body, or what it names, cannot make a call (400).
            CallRefused: a cap is reached (429), or sipbridge is stopping or overloaded (503).
        """
        checked = validate_outbound_call(body)
        if self.draining:
            raise CallRefused(503, "sipbridge is shutting down")
        number_id = checked["phoneNumberId"]
        number = await self._resources.find("phone_number", number_id)
        if number is None:
            raise ValidationFailed([f"phoneNumberId: no phone number {number_id!r}"])
        caller_id = outbound_caller_id(number)
        if caller_id is None:
            raise ValidationFailed(
                [
                    "phoneNumberId: the number's sipUri user part is no caller id (letters and "
                    "digits, optional +); give the phone number a number"
                ]
            )
        assistant_id = checked.get("assistantId")
        assistant = checked.get("assistant")
        if assistant_id is not None:
            assistant = await self._resources.find("assistant", assistant_id)
            if assistant is None:
                raise ValidationFailed([f"assistantId: no assistant {assistant_id!r}"])
        assert assistant is not None  # validate_outbound_call: exactly one of the two
        customer = checked["customer"]
        headers = (checked.get("sipbridge") or {}).get("sipHeaders") or {}
        call_id = self._new_call_id()
        facts = outbound_facts(pbx.kind, call_id, number, customer, headers)
        decision = accept(
            facts,
            call_id=call_id,
            number=number,
            assistant=assistant,
            assistant_id=assistant_id,
            now=self._clock(),
            defaults=self._defaults,
            overrides=checked.get("assistantOverrides"),
            cpu_clock=RENDER_CPU_CLOCK,
        )
        if isinstance(decision, Reject):
            raise ValidationFailed([decision.message or "the assistant cannot run"])
        dial = OutboundDial(
            customer=(
                {"type": "sip", "sipUri": customer["sipUri"]}
                if customer.get("sipUri")
                else {"type": "number", "number": customer["number"]}
            ),
            caller_id=caller_id,
            caller_name=str(number.get("name") or ""),
            headers=tuple(headers.items()),
            ring_timeout_s=self._defaults.outbound_ring_timeout_s,
        )
        problem = pbx.check_dial(dial)
        if problem is not None:
            raise ValidationFailed([f"customer: cannot be dialled: {problem}"])
        if self.draining:  # it may have begun during the lookups above
            raise CallRefused(503, "sipbridge is shutting down")
        # The caps last: a request that could never work is told so (400) before "later".
        moment = self._clock().timestamp()
        starts = self._outbound_starts
        window_s, _ = outbound_rate_window(self._defaults.outbound_max_calls_per_second)
        while starts and starts[0] < moment - window_s:
            starts.popleft()
        limit = admit_outbound(self.outbound_active(), starts, moment, self._defaults)
        if limit is not None:
            self._metrics.calls_refused_total.labels("outbound_cap").inc()
            raise CallRefused(429, limit)
        refusal = admit(len(self._by_id) + 1, self._event_loop_lag(), self._defaults)
        if refusal is not None:
            self._metrics.calls_refused_total.labels(refusal[0]).inc()
            raise CallRefused(503, refusal[1].message)
        starts.append(moment)
        return self.place(facts, dict(number), decision, dial, pbx)

    def place(
        self,
        facts: InviteFacts,
        number: dict[str, Any],
        decision: Accept,
        dial: OutboundDial,
        pbx: PbxControl,
    ) -> Call:
        """A new outbound call, already routed: recorded ``queued``, then dialled. ``facts``
        describe the customer and the SIP number it comes from; ``facts.pbx_call_id`` is the
        id the PBX will know the call by (the call's id)."""
        now = self._clock()
        call = Call(
            id=facts.pbx_call_id,
            org_id=self._org_id,
            facts=facts,
            created_at=now,
            updated_at=now,
            status=CallStatus.QUEUED,
            phone_number=number,
        )
        live = LiveCall(call, pbx, call_logger(log, call.id))
        self._by_id[call.id] = live
        self._by_pbx[(facts.pbx, facts.pbx_call_id)] = live
        self._unfinished.add(live)
        self._metrics.calls_active.set(len(self._by_id))
        self._metrics.calls_total.labels("outbound").inc()
        live.log.info(
            "outbound through %s: %s to %s (%s)",
            facts.pbx,
            facts.request_uri,
            _describe(dial.customer),
            facts.from_name or "no name",
        )
        call.assistant = decision.assistant
        call.assistant_id = decision.assistant_id
        call.variables = decision.variables
        call.variable_values = dict(decision.variable_values)
        live.decision = decision
        self._recorder.save(call.to_json())
        self._notify(call, STATUS_UPDATE)
        self._start(live, lambda: self._dial(live, decision, dial))
        return call

    def outbound_active(self) -> int:
        """Outbound calls not yet ended (for the outbound cap)."""
        return sum(1 for live in self._by_id.values() if live.call.facts.outbound)

    def _start(self, live: LiveCall, work: Callable[[], Awaitable[None]]) -> None:
        live.task = self._tasks.spawn(self._run(live, work), f"call-{live.call.id}")
        live.task.add_done_callback(lambda _: self._finished(live))

    def hung_up(
        self,
        pbx: str,
        pbx_call_id: str,
        *,
        by_caller: bool = True,
        ended_at: datetime | None = None,
        unanswered: CallGone | None = None,
    ) -> None:
        """The PBX reports the call is gone (``by_caller``: the caller's side ended it;
        ``unanswered``: how an outbound call's dial ended, when the PBX said)."""
        live = self._by_pbx.get((pbx, pbx_call_id))
        if live is None:
            return
        live.pbx_gone = True
        live.gone.set()
        status = live.call.status
        if live.call.facts.outbound and status in (CallStatus.QUEUED, CallStatus.RINGING):
            # Not cancelled: the task sees the call end (it waits for the leg or the end), and
            # closes a leg that connected meanwhile.
            waiter = live.leg_waiter
            if waiter is not None and waiter.done() and not waiter.cancelled():
                # The customer answered, then hung up before the task took the answer in.
                self._end(live, EndedReason.CUSTOMER_ENDED_CALL, at=ended_at)
                return
            dial_status = unanswered.dial_status if unanswered else None
            sip_status = unanswered.sip_status if unanswered else None
            cause = unanswered.cause if unanswered else 0
            detail = unanswered.detail if unanswered else ""
            if not detail and dial_status:
                detail = f"dial status {dial_status}"
            self._end(
                live,
                outbound_not_answered(dial_status, sip_status, cause),
                at=ended_at,
                message=detail or None,
                sip_status=sip_status,
            )
            return
        if status is CallStatus.RINGING:
            if live.task is not None and not live.task.done():
                # Routing, the pipeline's opening and the answer are all moot now.
                live.task.cancel()
            if by_caller:
                self._metrics.calls_total.labels("abandoned").inc()
            reason = (
                EndedReason.CALLER_HUNG_UP_BEFORE_CONNECT
                if by_caller
                else EndedReason.SIP_INBOUND_FAILED_TO_CONNECT
            )
        elif status is CallStatus.FORWARDING:
            # The transfer was not known to have worked yet (it would have ended the call).
            reason = (
                EndedReason.CUSTOMER_ENDED_CALL_DURING_TRANSFER
                if by_caller
                else EndedReason.TRANSFER_FAILED
            )
            if live.transferring:
                # Its answer may have come first and still be on its way to the flow (a
                # destination that answers and hangs up at once): the transfer settles it.
                live.gone_during_transfer = (reason, ended_at)
                return
        else:
            reason = (
                EndedReason.CUSTOMER_ENDED_CALL if by_caller else EndedReason.SIP_COMPLETED_CALL
            )
        self._end(live, reason, at=ended_at)

    def _leg_connected(self, call_id: str, leg: MediaLeg) -> None:
        live = self._by_id.get(call_id)
        waiter = live.leg_waiter if live is not None else None
        if live is None or waiter is None or waiter.done():
            log.warning("media for %s, which no live call is waiting for: closing it", call_id)
            self._tasks.spawn(leg.aclose(), f"refuse-leg-{call_id}")
            return
        live.log.info("media attached")
        waiter.set_result(leg)

    # ---- calls a previous run left -------------------------------------------------------------

    async def settle_left_over(self, records: Sequence[Mapping[str, Any]]) -> int:
        """Ends the calls a previous run of sipbridge left live (it crashed or was killed mid-call).

        Their conversations died with that run, and a PBX may still hold the caller in silence
        (FreeSWITCH keeps a parked channel until the caller gives up): each call ends once with
        ``call.in-progress.error-vapifault-worker-died``, gets its status update and its
        end-of-call-report, and is hung up at its PBX (where a channel already gone is done,
        and one the link cannot reach yet is hung up once it can).

        Returns:
            How many calls were settled.
        """
        settled = 0
        now = self._clock()
        for record in records:
            number_id = record.get("phoneNumberId")
            number = await self._resources.find("phone_number", number_id) if number_id else None
            try:
                call = Call.from_record(record, dict(number) if number else None)
            except LocalProtocolError as exc:
                log.error("cannot settle call record %s: %s", record.get("id"), exc)
                continue
            if call.is_ended:
                continue
            live = LiveCall(
                call, self._controls.get(call.facts.pbx) or _NoPbx(), call_logger(log, call.id)
            )
            call.end(
                EndedReason.WORKER_DIED,
                now,
                message=f"sipbridge stopped during the call ({call.status.value} then)",
            )
            live.log.warning("settled a call the previous run left %s", record.get("status"))
            self._metrics.calls_ended_total.labels(EndedReason.WORKER_DIED.value).inc()
            self._recorder.save(call.to_json())
            self._notify(call, STATUS_UPDATE)
            self._report(live)
            if call.facts.pbx in self._controls:
                self._tasks.spawn(self._pbx_hangup(live), f"settle-{call.id}")
            settled += 1
        return settled

    # ---- from operators -----------------------------------------------------------------------

    async def hangup(self, call_id: str) -> bool:
        """Hangs up a live call on an operator's request (``manually-canceled``).

        Returns:
            False if the call had already ended.
        """
        live = self._by_id.get(call_id)
        if live is None or not self._end(live, EndedReason.MANUALLY_CANCELED):
            return False
        await self._pbx_hangup(live)
        return True

    # ---- the call's task ----------------------------------------------------------------------

    async def _run(self, live: LiveCall, work: Callable[[], Awaitable[None]]) -> None:
        """The whole life of one call after its offer or its placing (:meth:`_finished`
        reports it)."""
        try:
            await work()
        except Exception as exc:
            # Task boundary: a bug must cost this call only, and the caller still gets an end.
            live.log.exception("the call flow failed")
            if self._end(live, EndedReason.WORKER_DIED, message=f"internal error: {exc!r}"):
                await self._pbx_hangup(live)
        finally:
            # Also when cancelled (the caller hung up while it rang, or sipbridge stops).
            conversation = live.conversation
            if conversation is not None:
                reason = live.call.ended_reason
                await conversation.close(reason.value if reason else "ended")
                live.call.media.update(conversation.tap_counters())

    async def _route_and_apply(self, live: LiveCall) -> None:
        """An inbound call: who takes it, then that decision carried out."""
        decision = await self._route(live)
        if decision is not None and not live.call.is_ended:
            await self._apply(live, decision)

    async def _dial(self, live: LiveCall, decision: Accept, dial: OutboundDial) -> None:
        """An outbound call: the PBX dials the customer; once they answer (their audio leg
        connects), the pipeline opens and the conversation runs as for an inbound call. A
        dial that fails ends the call through :meth:`hung_up`, with the PBX's reason."""
        call = live.call
        loop = asyncio.get_running_loop()
        live.leg_waiter = loop.create_future()
        if call.is_ended:  # cancelled before its task began
            return
        placed = await self._pbx_action(
            live,
            "dialling the customer",
            live.pbx.originate(call.facts, call.id, dial),
            failure=EndedReason.SIP_OUTBOUND_FAILED_TO_CONNECT,
        )
        ended = live.ended.is_set()  # (the call may have ended while the PBX took the dial)
        if placed and ended and not live.pbx_gone:
            # Ended (an operator, a shutdown) while the PBX took the dial: the hangup sent
            # then may have found no channel yet. This one waits for it.
            await self._pbx_action(live, "hanging up the dial", live.pbx.hangup(call.facts))
        if not placed or ended:
            return
        call.apply(CallEvent.RING, self._clock())
        self._recorder.save(call.to_json())
        self._notify(call, STATUS_UPDATE)
        # The PBX ends an unanswered dial itself; this only bounds a PBX that never says.
        live.timers.append(
            loop.call_later(
                dial.ring_timeout_s + OUTBOUND_RING_GRACE_S,
                self._expire,
                live,
                EndedReason.CUSTOMER_DID_NOT_ANSWER,
            )
        )
        leg = await self._wait_for_leg(live)
        if leg is None:
            return
        try:
            call.apply(CallEvent.ANSWER, self._clock())
            self._recorder.save(call.to_json())
            self._notify(call, STATUS_UPDATE)
            for timer in live.timers:
                timer.cancel()
            live.timers.clear()
            max_duration = decision.assistant.get("maxDurationSeconds") or DEFAULT_MAX_DURATION_S
            live.timers.append(
                loop.call_later(
                    float(max_duration), self._expire, live, EndedReason.EXCEEDED_MAX_DURATION
                )
            )
            if self._conversations is None:
                await live.ended.wait()  # no media path: the call lives until something ends it
                return
            try:
                live.conversation = await self._conversations.open(call, decision, live.log)
            except PipelineError as exc:
                live.log.error("%s", exc)
                if self._end(live, EndedReason.PIPELINE_CONNECTION_FAILED, message=str(exc)):
                    await self._pbx_hangup(live)
                return
            if not call.is_ended:
                await self._converse(live, live.conversation, leg)
        finally:
            await leg.aclose()

    def _finished(self, live: LiveCall) -> None:
        """The call's task is over (even one cancelled before it began): report, once."""
        self._unfinished.discard(live)
        if not live.call.is_ended:
            live.log.error("the call's task ended before the call did")
            if self._end(live, EndedReason.WORKER_DIED, message="call task ended early"):
                self._tasks.spawn(self._pbx_hangup(live), f"hangup-{live.call.id}")
        self._report(live)

    async def _route(self, live: LiveCall) -> Decision | None:
        call = live.call
        try:
            if self.draining:
                return Reject(
                    SIP_SERVICE_UNAVAILABLE,
                    EndedReason.WORKER_SHUTDOWN,
                    "sipbridge is shutting down",
                )
            refusal = admit(len(self._by_id), self._event_loop_lag(), self._defaults)
            if refusal is not None:
                limit, reject = refusal
                self._metrics.calls_refused_total.labels(limit).inc()
                live.log.warning("refusing the call: %s", reject.message)
                return reject
            return await self._decide(live)
        except StoreError as exc:
            live.log.error("routing failed, the store is unavailable: %s", exc)
            return Reject(
                SIP_SERVICE_UNAVAILABLE,
                EndedReason.START_ERROR_DATABASE,
                f"store unavailable: {exc}",
            )
        except Exception as exc:
            # The caller still gets an answer.
            live.log.exception("routing failed unexpectedly")
            if call.is_ended:
                return None
            return Reject(SIP_SERVER_ERROR, EndedReason.WORKER_DIED, f"internal error: {exc!r}")

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
                cpu_clock=RENDER_CPU_CLOCK,
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
            cpu_clock=RENDER_CPU_CLOCK,
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
        """Transfers the call where routing or a failure sent it; the call ends either way."""
        call = live.call
        self._metrics.calls_total.labels("transferred").inc()
        call.variables = dict(decision.variables) or call.variables
        call.destination = decision.destination
        call.apply(CallEvent.FORWARD, self._clock())
        live.log.info("transferring to %s (%s)", _describe(decision.destination), decision.detail)
        self._recorder.save(call.to_json())
        self._notify(call, STATUS_UPDATE)
        transferred = await self._pbx_transfer(
            live, decision.destination, failure=EndedReason.TRANSFER_FAILED
        )
        if not transferred:
            return
        live.transferred = True
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
        if self._conversations is not None:
            try:
                live.conversation = await self._conversations.open(call, decision, live.log)
            except PipelineError as exc:
                await self._pipeline_never_connected(live, exc)
                return
            if call.is_ended:
                return
        loop = asyncio.get_running_loop()
        live.leg_waiter = loop.create_future()
        if self._media_timeout_s is not None:
            live.timers.append(loop.call_later(self._media_timeout_s, self._media_timed_out, live))
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
            loop.call_later(
                float(max_duration), self._expire, live, EndedReason.EXCEEDED_MAX_DURATION
            )
        )
        leg = await self._wait_for_leg(live)
        if leg is None:
            return
        try:
            if live.conversation is None:
                await live.ended.wait()  # no media path: the call lives until something ends it
            else:
                await self._converse(live, live.conversation, leg)
        finally:
            await leg.aclose()

    async def _pipeline_never_connected(self, live: LiveCall, exc: PipelineError) -> None:
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
            live, "rejecting", live.pbx.reject(live.call.facts, SIP_TEMPORARILY_UNAVAILABLE)
        )

    async def _wait_for_leg(self, live: LiveCall) -> MediaLeg | None:
        """The call's audio leg once the PBX connects it; None if the call ended first."""
        waiter = live.leg_waiter
        assert waiter is not None
        ended = asyncio.ensure_future(live.ended.wait())
        either: set[asyncio.Future[Any]] = {waiter, ended}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
        if waiter.done():
            live.leg = waiter.result()
            if not live.call.is_ended:
                return live.leg
            await live.leg.aclose()  # connected just as the call ended
            return None
        waiter.cancel()
        return None

    async def _converse(self, live: LiveCall, conversation: Conversation, leg: MediaLeg) -> None:
        """Runs the conversation to its end, then ends the call the way its result says."""
        result = await self._converse_within_wrap_up(live, conversation, leg)
        live.call.media = dict(result.media)
        self._metrics.count_assistant_frames(result.media)
        self.frames_shed += result.media.get("assistantFramesShedLate", 0)
        outcome = result.session
        transfer = live.transfer_in_flight
        if transfer is not None:
            # What ended the session may be the transfer itself: its outcome decides.
            await asyncio.wait([transfer])
            if not transfer.cancelled() and transfer.exception() is not None:
                live.log.error("the transfer failed", exc_info=transfer.exception())
        if outcome.caller_hung_up:
            live.pbx_gone = True
        if outcome.reason is None or live.call.is_ended:
            # Ended from outside (the PBX, a timer, an operator): that reason stands.
            if not live.transferred:
                await self._pbx_hangup(live)
            return
        if outcome.reason is EndedReason.PIPELINE_FAILED and not live.call.facts.outbound:
            # (A number's fallbackDestination is for its callers, not for those it calls.)
            fallback = self._fallback(live, outcome.reason, outcome.message or "")
            if fallback is not None:
                # The leg stays up until the PBX has taken the transfer.
                await self._transfer(live, fallback)
                return
        self._end(live, outcome.reason, message=outcome.message)
        if not live.transferred:
            await self._pbx_hangup(live)

    async def _converse_within_wrap_up(
        self, live: LiveCall, conversation: Conversation, leg: MediaLeg
    ) -> ConversationResult:
        """The conversation's result; once the call has ended it has MEDIA_WRAP_UP_S to stop."""
        running = asyncio.ensure_future(
            conversation.run(leg, _CallControl(self, live), live.ended, live.log)
        )
        ended = asyncio.ensure_future(live.ended.wait())
        either: set[asyncio.Future[Any]] = {running, ended}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not running.done():
                done, _ = await asyncio.wait({running}, timeout=MEDIA_WRAP_UP_S)
                if not done:
                    live.log.warning(
                        "media did not wrap up within %.0f s; ending it", MEDIA_WRAP_UP_S
                    )
                    await cancel_and_wait([running])
                    return ConversationResult(SessionResult(None))
            return running.result()
        finally:
            ended.cancel()
            if not running.done():
                await cancel_and_wait([running])

    # ---- the pipeline's requests (through _CallControl) ---------------------------------------

    async def _transfer_requested(self, live: LiveCall, destination: Mapping[str, Any]) -> bool:
        """Blind-transfers a live call (the pipeline asked); True once the PBX took it.

        The destination is validated like a phone number's fallbackDestination and its
        ``message``/``callerId`` rendered with the call's variables. On failure the call goes
        on with its assistant.
        """
        if live.call.is_ended:
            return False
        try:
            checked = validate_destination(destination)
        except ValidationFailed as exc:
            live.log.warning("refused a transfer request: %s", "; ".join(exc.problems))
            return False
        call = live.call
        rendered = render_destination(
            checked, call.variables, self._clock(), cpu_clock=RENDER_CPU_CLOCK
        )
        previous = call.status
        call.destination = rendered
        call.apply(CallEvent.FORWARD, self._clock())
        self._recorder.save(call.to_json())
        self._notify(call, STATUS_UPDATE)
        live.log.info("pipeline transfers the call to %s", _describe(rendered))
        if await self._pbx_transfer(live, rendered):
            live.transferred = True
            self._end(live, EndedReason.ASSISTANT_FORWARDED_CALL)
            return True
        if not call.is_ended and previous is CallStatus.IN_PROGRESS:
            call.apply(CallEvent.RESUME, self._clock())
            call.destination = None
            self._recorder.save(call.to_json())
            self._notify(call, STATUS_UPDATE)
        return False

    async def _send_dtmf(self, live: LiveCall, digits: str) -> None:
        if not live.call.is_ended:
            await self._pbx_action(
                live, "sending DTMF", live.pbx.send_dtmf(live.call.facts, digits)
            )

    # ---- ending -------------------------------------------------------------------------------

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
            cpu_clock=RENDER_CPU_CLOCK,
        )
        return decision if isinstance(decision, Transfer) else None

    def _end(
        self,
        live: LiveCall,
        reason: EndedReason,
        *,
        message: str | None = None,
        sip_status: int | None = None,
        at: datetime | None = None,
    ) -> bool:
        call = live.call
        if not call.end(reason, at or self._clock(), message=message, sip_status=sip_status):
            return False
        live.ended.set()
        for timer in live.timers:
            timer.cancel()
        live.timers.clear()
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
        if live not in self._unfinished:
            self._report(live)  # its task is over: nothing more will be learnt
        return True

    def _report(self, live: LiveCall) -> None:
        """The end-of-call report, once, "when post-processing is complete": after the
        conversation handed over its counters and last transcript lines."""
        if live.reported:
            return
        live.reported = True
        self._recorder.save(live.call.to_json())
        self._notify(live.call, END_OF_CALL_REPORT)

    async def _pbx_hangup(self, live: LiveCall) -> None:
        """Asks the PBX to end the call, once, unless the PBX already said it is gone."""
        if live.hangup_started or live.pbx_gone:
            return
        live.hangup_started = True
        await self._pbx_action(live, "hanging up at the PBX", live.pbx.hangup(live.call.facts))

    async def _pbx_transfer(
        self,
        live: LiveCall,
        destination: Mapping[str, Any],
        failure: EndedReason | None = None,
    ) -> bool:
        """Has the PBX transfer the call; True once it worked (see :meth:`_pbx_action`).

        The PBX saying the channel is gone meanwhile does not cut the transfer short: its answer
        decides (TRANSFER_SETTLE_S), and only a transfer that failed ends the call the way the
        PBX said.
        """
        live.transferring = True
        try:
            return await self._pbx_action(
                live,
                "transferring",
                live.pbx.transfer(live.call.facts, destination),
                failure=failure,
                timeout_s=TRANSFER_TIMEOUT_S,
                settle_s=TRANSFER_SETTLE_S,
            )
        finally:
            live.transferring = False

    async def _pbx_action(
        self,
        live: LiveCall,
        what: str,
        action: Awaitable[None],
        failure: EndedReason | None = None,
        timeout_s: float = PBX_ACTION_TIMEOUT_S,
        *,
        settle_s: float = 0.0,
    ) -> bool:
        """Runs one PBX action within its time limit; True if it succeeded.

        Once the PBX says the channel is gone the action is moot, unless ``settle_s`` gives its
        answer that long to arrive. On failure the error is logged and the call ends the way the
        PBX said it did during a transfer, else, when ``failure`` is given, with that reason
        and is hung up (the PBX may still hold it).
        """
        running = asyncio.ensure_future(action)
        gone = asyncio.ensure_future(live.gone.wait())
        try:
            either: set[asyncio.Future[Any]] = {running, gone}
            await asyncio.wait(either, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if settle_s > 0 and gone.done() and not running.done():
                await asyncio.wait({running}, timeout=settle_s)
        finally:
            gone.cancel()
            if not running.done():
                await cancel_and_wait([running])
        if running.cancelled():
            # Not done in time, or moot: the PBX said the channel is gone meanwhile.
            error: BaseException = (
                PbxActionError("the channel is gone") if live.gone.is_set() else TimeoutError()
            )
        elif (raised := running.exception()) is None:
            return True
        elif isinstance(raised, PbxError | TimeoutError):
            error = raised
        else:
            raise raised
        live.log.error("%s failed: %s", what, error or type(error).__name__)
        if live.gone_during_transfer is not None:
            reason, at = live.gone_during_transfer
            self._end(live, reason, at=at)
        elif failure is not None and self._end(live, failure, message=str(error) or None):
            await self._pbx_hangup(live)
        return False

    def _media_timed_out(self, live: LiveCall) -> None:
        if live.leg_waiter is not None and not live.leg_waiter.done():
            live.log.error("the PBX never connected the call's media")
            self._expire(live, EndedReason.MEDIA_NEVER_CONNECTED)

    def _expire(self, live: LiveCall, reason: EndedReason) -> None:
        if self._end(live, reason):
            self._tasks.spawn(self._pbx_hangup(live), f"hangup-{live.call.id}")

    async def aclose(self) -> None:
        """Ends every live call (``worker-shutdown``), hanging each up, lets the calls wrap up
        (pipelines told, reports sent) for up to MEDIA_WRAP_UP_S, and stops all tasks."""
        self.draining = True
        lives = list(self._by_id.values())
        hangups = [
            self._pbx_hangup(live) for live in lives if self._end(live, EndedReason.WORKER_SHUTDOWN)
        ]
        await asyncio.gather(*hangups)
        tasks = [live.task for live in self._unfinished if live.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=MEDIA_WRAP_UP_S)
        await self._tasks.aclose()

    async def wait_idle(self) -> None:
        """Returns once no call is live or wrapping up (for a graceful drain)."""
        while self._unfinished:
            live = next(iter(self._unfinished))
            if live.task is None:
                self._unfinished.discard(live)
                continue
            await asyncio.wait([live.task])

    # ---- internals ----------------------------------------------------------------------------

    def _notify(self, call: Call, message_type: str) -> None:
        target = target_for(message_type, call, self._defaults.default_server)
        if target is None:
            return
        now = self._clock()
        payload = (
            end_of_call_report(call, now, self._recording_links(call, now))
            if message_type == END_OF_CALL_REPORT
            else status_update(call, now)
        )
        self._dispatcher.submit(call.id, target, payload, message_type)


def _keep_for_report(call: Call, kind: str, payload: Mapping[str, Any], now: datetime) -> None:
    """A transcript or message from the pipeline, kept for the end-of-call report.

    ``transcript`` messages with ``transcriptType: final`` add a line to the transcript and a
    message (``role`` user or bot); ``message``/``conversation-update`` messages with a
    ``message`` object or ``messages`` list are added as they are.
    """
    now_ms = int(now.timestamp() * 1000)
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
    items = messages if isinstance(messages, list) else [single] if isinstance(single, dict) else []
    for item in items[:100]:
        if isinstance(item, dict) and isinstance(item.get("role"), str):
            call.messages.append(dict(item))


def _describe(destination: Mapping[str, Any]) -> str:
    return str(destination.get("sipUri") or destination.get("number") or destination.get("type"))
