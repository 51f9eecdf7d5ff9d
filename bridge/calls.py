"""Calls: the status machine, the end reasons, and the call record in Vapi's ``Call`` shape.

Rules of the status machine (the only place they are written):

- An inbound call starts ``ringing`` when the PBX offers it, while sipbridge decides who
  takes it. An outbound call starts ``queued`` (``POST /call``); ``ring`` moves it to
  ``ringing`` once the PBX dials the customer.
- ``answer`` moves it to ``in-progress``: the PBX answered and the audio goes to the pipeline.
- ``forward`` moves a ringing or in-progress call to ``forwarding`` (a transfer was started);
  ``resume`` brings a failed transfer back to ``in-progress``.
- ``end`` moves any live call to ``ended`` with exactly one ``endedReason``; a second ``end`` is
  ignored, so the first reason wins when the PBX and the pipeline race to hang up.
- Nothing leaves ``ended``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from bridge.errors import LocalProtocolError
from bridge.events import InviteFacts, invite_facts
from bridge.models import format_timestamp, parse_timestamp, without_secrets


class CallStatus(StrEnum):
    """Vapi's ``call.status`` values that a SIP call goes through."""

    QUEUED = "queued"
    RINGING = "ringing"
    IN_PROGRESS = "in-progress"
    FORWARDING = "forwarding"
    ENDED = "ended"


class CallEvent(StrEnum):
    """What moves a call from one status to the next."""

    RING = "ring"
    ANSWER = "answer"
    FORWARD = "forward"
    RESUME = "resume"
    END = "end"


_TRANSITIONS: dict[tuple[CallStatus, CallEvent], CallStatus] = {
    (CallStatus.QUEUED, CallEvent.RING): CallStatus.RINGING,
    (CallStatus.QUEUED, CallEvent.END): CallStatus.ENDED,
    (CallStatus.RINGING, CallEvent.ANSWER): CallStatus.IN_PROGRESS,
    (CallStatus.RINGING, CallEvent.FORWARD): CallStatus.FORWARDING,
    (CallStatus.IN_PROGRESS, CallEvent.FORWARD): CallStatus.FORWARDING,
    (CallStatus.FORWARDING, CallEvent.RESUME): CallStatus.IN_PROGRESS,
    (CallStatus.RINGING, CallEvent.END): CallStatus.ENDED,
    (CallStatus.IN_PROGRESS, CallEvent.END): CallStatus.ENDED,
    (CallStatus.FORWARDING, CallEvent.END): CallStatus.ENDED,
}


def next_status(status: CallStatus, event: CallEvent) -> CallStatus:
    """The status after ``event``.

    Raises:
        LocalProtocolError: the event is not allowed in that status (a bug in the caller).
    """
    try:
        return _TRANSITIONS[(status, event)]
    except KeyError:
        raise LocalProtocolError(f"call event {event} is not allowed when {status}") from None


class EndedReason(StrEnum):
    """Every ``endedReason`` sipbridge reports, all from Vapi's enum (spec ``Call.endedReason``)."""

    # Call start and assistant resolution (docs.vapi.ai/calls/call-ended-reason).
    NEITHER_ASSISTANT_NOR_SERVER = "call-start-error-neither-assistant-nor-server-set"
    PHONE_NUMBER_NOT_FOUND = "call.start.error-get-phone-number"
    ASSISTANT_NOT_FOUND = "assistant-not-found"
    ASSISTANT_NOT_VALID = "assistant-not-valid"
    ASSISTANT_REQUEST_FAILED = "assistant-request-failed"
    ASSISTANT_REQUEST_RETURNED_ERROR = "assistant-request-returned-error"
    ASSISTANT_REQUEST_RETURNED_INVALID_ASSISTANT = "assistant-request-returned-invalid-assistant"
    ASSISTANT_REQUEST_RETURNED_NO_ASSISTANT = "assistant-request-returned-no-assistant"
    ASSISTANT_REQUEST_RETURNED_FORWARDING = "assistant-request-returned-forwarding-phone-number"
    START_ERROR_DATABASE = "call.start.error-vapifault-database-error"
    CONCURRENCY_LIMIT_REACHED = "call.start.error-subscription-concurrency-limit-reached"
    # Normal endings.
    CUSTOMER_ENDED_CALL = "customer-ended-call"
    CALLER_HUNG_UP_BEFORE_CONNECT = "call.ringing.sip-inbound-caller-hungup-before-call-connect"
    ASSISTANT_ENDED_CALL = "assistant-ended-call"
    ASSISTANT_ENDED_CALL_AFTER_MESSAGE = "assistant-ended-call-after-message-spoken"
    ASSISTANT_SAID_END_CALL_PHRASE = "assistant-said-end-call-phrase"
    ASSISTANT_FORWARDED_CALL = "assistant-forwarded-call"
    CUSTOMER_ENDED_CALL_DURING_TRANSFER = "customer-ended-call-during-transfer"
    EXCEEDED_MAX_DURATION = "exceeded-max-duration"
    SILENCE_TIMED_OUT = "silence-timed-out"
    MANUALLY_CANCELED = "manually-canceled"
    # Outbound calls the customer did not take.
    CUSTOMER_BUSY = "customer-busy"
    CUSTOMER_DID_NOT_ANSWER = "customer-did-not-answer"
    SIP_OUTBOUND_FAILED_TO_CONNECT = "call.in-progress.error-sip-outbound-call-failed-to-connect"
    OUTBOUND_SIP_403 = "call.in-progress.error-providerfault-outbound-sip-403-forbidden"
    OUTBOUND_SIP_407 = (
        "call.in-progress.error-providerfault-outbound-sip-407-proxy-authentication-required"
    )
    OUTBOUND_SIP_408 = "call.in-progress.error-providerfault-outbound-sip-408-request-timeout"
    OUTBOUND_SIP_480 = (
        "call.in-progress.error-providerfault-outbound-sip-480-temporarily-unavailable"
    )
    OUTBOUND_SIP_503 = "call.in-progress.error-providerfault-outbound-sip-503-service-unavailable"
    # Transport, media and pipeline failures.
    SIP_COMPLETED_CALL = "call.in-progress.sip-completed-call"
    SIP_INBOUND_FAILED_TO_CONNECT = "call.ringing.error-sip-inbound-call-failed-to-connect"
    MEDIA_NEVER_CONNECTED = "call.in-progress.error-vapifault-transport-never-connected"
    PIPELINE_CONNECTION_FAILED = "call.in-progress.error-pipeline-ws-model-connection-failed"
    PIPELINE_FAILED = "pipeline-error-custom-llm-llm-failed"
    TRANSFER_FAILED = "call.in-progress.error-transfer-failed"
    MEDIA_LEG_CLOSED = "phone-call-provider-closed-websocket"
    WORKER_DIED = "call.in-progress.error-vapifault-worker-died"
    WORKER_SHUTDOWN = "worker-shutdown"


# The SIP responses Vapi names a providerfault reason after; other failures are generic.
_OUTBOUND_SIP_FAULTS = {
    403: EndedReason.OUTBOUND_SIP_403,
    407: EndedReason.OUTBOUND_SIP_407,
    408: EndedReason.OUTBOUND_SIP_408,
    480: EndedReason.OUTBOUND_SIP_480,
    503: EndedReason.OUTBOUND_SIP_503,
}
# Busy Here, Busy Everywhere, Decline: the customer (or their phone) said no.
_BUSY_SIP = (486, 600, 603)
_Q850_USER_BUSY = 17
_Q850_NO_ANSWER = (18, 19)


def outbound_not_answered(
    dial_status: str | None, sip_status: int | None, cause: int = 0
) -> EndedReason:
    """Why an outbound call ended before the customer answered, from what the PBX said: its
    dial status (Asterisk's ``DIALSTATUS``), the customer's final SIP response, the Q.850
    cause of the hangup. The SIP response is the most precise, when there is one."""
    if sip_status in _OUTBOUND_SIP_FAULTS:
        return _OUTBOUND_SIP_FAULTS[sip_status]
    if sip_status in _BUSY_SIP or dial_status == "BUSY" or cause == _Q850_USER_BUSY:
        return EndedReason.CUSTOMER_BUSY
    if dial_status == "NOANSWER" or (sip_status is None and cause in _Q850_NO_ANSWER):
        return EndedReason.CUSTOMER_DID_NOT_ANSWER
    return EndedReason.SIP_OUTBOUND_FAILED_TO_CONNECT


# What a caller hears when a call is refused before answer: the SIP status of the final response.
SIP_NOT_FOUND = 404
SIP_TEMPORARILY_UNAVAILABLE = 480
SIP_DECLINE = 603
SIP_SERVER_ERROR = 500
SIP_SERVICE_UNAVAILABLE = 503


@dataclass
class Call:
    """One call as sipbridge knows it; :meth:`to_json` is Vapi's ``Call`` object.

    Attributes:
        variable_values: the call's ``assistantOverrides.variableValues``: X- header variables
            plus what an assistant-request answer set (Vapi shows header variables here).
        variables: every variable templates saw (defaults included): ``artifact.variableValues``.
    """

    id: str
    org_id: str
    facts: InviteFacts
    created_at: datetime
    status: CallStatus = CallStatus.RINGING
    updated_at: datetime | None = None
    phone_number: dict[str, Any] | None = None
    assistant_id: str | None = None
    assistant: dict[str, Any] | None = None
    variable_values: dict[str, Any] = field(default_factory=dict)
    variables: dict[str, Any] = field(default_factory=dict)
    started_at: datetime | None = None
    ended_at: datetime | None = None
    ended_reason: EndedReason | None = None
    ended_message: str | None = None
    destination: dict[str, Any] | None = None
    sip_status: int | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    transcript: str = ""
    media: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], phone_number: dict[str, Any] | None) -> Call:
        """The call a stored record (:meth:`to_json`) describes, as far as it says: what a
        restarted sipbridge needs to settle a call its previous run left live.

        Raises:
            LocalProtocolError: the record is not a call record sipbridge wrote.
        """
        try:
            extension = record["sipbridge"]
            sip = record["phoneCallProviderDetails"]["sip"]
            outbound = record.get("type") == "outboundPhoneCall"
            # Outbound, the URI is the customer's; the SIP number's is kept in the extension.
            uri = extension.get("numberSipUri") if outbound else sip["uri"]
            user, _, host = str(uri or "").removeprefix("sip:").partition("@")
            customer = record.get("customer") or {}
            sip_headers = sip.get("headers") or {}
            headers = [
                (name, str(value))
                for name, value in sip_headers.items()
                if name.lower().startswith("x-")
            ]
            to = sip_headers.get("to")
            facts = invite_facts(
                pbx=extension["pbx"],
                pbx_call_id=record["phoneCallProviderId"],
                channel=extension["channel"],
                request_user=user,
                request_host=host,
                headers=headers,
                to_uri=str(to).strip("<>") if to else None,
                from_number=customer.get("number"),
                from_name=customer.get("name"),
                from_uri=customer.get("sipUri"),
                sip_call_id=extension.get("sipCallId"),
                outbound=outbound,
            )
            call = cls(
                id=record["id"],
                org_id=record["orgId"],
                facts=facts,
                created_at=parse_timestamp(record["createdAt"]),
                status=CallStatus(record["status"]),
                updated_at=parse_timestamp(record["updatedAt"]),
                phone_number=phone_number,
                assistant_id=record.get("assistantId"),
                assistant=record.get("assistant"),
                variable_values=dict(record["assistantOverrides"]["variableValues"]),
                variables=dict(record["artifact"]["variableValues"]),
                started_at=(
                    parse_timestamp(record["startedAt"]) if record.get("startedAt") else None
                ),
                destination=record.get("destination"),
                messages=list(record["artifact"]["messages"]),
                transcript=str(record["artifact"]["transcript"]),
                media=dict(extension.get("media") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LocalProtocolError(f"not a sipbridge call record: {exc!r}") from None
        return call

    @property
    def is_ended(self) -> bool:
        """True once the call has its ``endedReason``."""
        return self.status is CallStatus.ENDED

    def apply(self, event: CallEvent, at: datetime) -> CallStatus:
        """Moves to the next status (see the module rules) and stamps the time.

        Raises:
            LocalProtocolError: the event is not allowed now.
        """
        self.status = next_status(self.status, event)
        self.updated_at = at
        if event is CallEvent.ANSWER and self.started_at is None:
            self.started_at = at
        return self.status

    def end(
        self,
        reason: EndedReason,
        at: datetime,
        *,
        message: str | None = None,
        sip_status: int | None = None,
    ) -> bool:
        """Ends the call once; returns False (and changes nothing) if it had already ended."""
        if self.is_ended:
            return False
        self.apply(CallEvent.END, at)
        self.ended_at = at
        self.ended_reason = reason
        self.ended_message = message
        if sip_status is not None:
            self.sip_status = sip_status
        return True

    @property
    def duration_seconds(self) -> float:
        """Seconds from answer to end (0 for a call never answered); up to now if still live."""
        if self.started_at is None:
            return 0.0
        end = self.ended_at or self.updated_at or self.started_at
        return round(max(0.0, (end - self.started_at).total_seconds()), 3)

    @property
    def sip_uri(self) -> str:
        """The INVITE's request-URI: the SIP number dialled (inbound), or the customer's URI
        (outbound, a number as ``sip:<number>@<the SIP number's host>`` when it has no URI)."""
        facts = self.facts
        if not facts.outbound:
            return facts.request_uri
        return facts.from_uri or f"sip:{facts.from_number}@{facts.request_host}"

    def sip_headers_json(self) -> dict[str, str]:
        """``phoneCallProviderDetails.sip.headers``: the X- headers plus to/from when known."""
        headers = self.facts.header_map()
        if self.facts.to_uri:
            headers.setdefault("to", f"<{self.facts.to_uri}>")
        if self.facts.from_uri and not self.facts.outbound:
            # (Outbound, from_* describe the customer: the To, not the From.)
            sender = f"<{self.facts.from_uri}>"
            if self.facts.from_name:
                sender = f'"{self.facts.from_name}" {sender}'
            headers.setdefault("from", sender)
        return headers

    def to_json(self) -> dict[str, Any]:
        """Vapi's ``Call`` object, with a ``sipbridge`` object for what Vapi has no field for."""
        facts = self.facts
        body: dict[str, Any] = {
            "id": self.id,
            "orgId": self.org_id,
            "type": facts.call_type,
            "phoneCallProvider": "vapi",
            "phoneCallTransport": "sip",
            "status": self.status.value,
            "phoneNumberId": (self.phone_number or {}).get("id"),
            "assistantId": self.assistant_id,
            "customer": facts.customer(),
            "transport": {"provider": "vapi.sip", "callSid": facts.pbx_call_id},
            "phoneCallProviderId": facts.pbx_call_id,
            "phoneCallProviderDetails": {
                "sip": {"uri": self.sip_uri, "headers": self.sip_headers_json()}
            },
            "assistantOverrides": {"variableValues": dict(self.variable_values)},
            "createdAt": format_timestamp(self.created_at),
            "updatedAt": format_timestamp(self.updated_at or self.created_at),
            "cost": 0,
            "artifact": {
                "variableValues": dict(self.variables),
                "messages": list(self.messages),
                "transcript": self.transcript,
            },
            "sipbridge": {
                "pbx": facts.pbx,
                "channel": facts.channel,
                "sipCallId": facts.sip_call_id,
                "sipStatus": self.sip_status,
                "durationSeconds": self.duration_seconds,
                "media": dict(self.media),
            },
        }
        if facts.outbound:
            body["sipbridge"]["numberSipUri"] = facts.request_uri
        if self.assistant is not None:
            body["assistant"] = without_secrets(self.assistant)
        if self.started_at is not None:
            body["startedAt"] = format_timestamp(self.started_at)
        if self.ended_at is not None:
            body["endedAt"] = format_timestamp(self.ended_at)
        if self.ended_reason is not None:
            body["endedReason"] = self.ended_reason.value
        if self.ended_message:
            body["endedMessage"] = self.ended_message
        if self.destination is not None:
            body["destination"] = self.destination
        return body
