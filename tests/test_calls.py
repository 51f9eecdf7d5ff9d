from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from bridge.calls import (
    Call,
    CallEvent,
    CallStatus,
    EndedReason,
    next_status,
    outbound_not_answered,
)
from bridge.errors import LocalProtocolError
from bridge.events import invite_facts

T0 = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)

ALLOWED = {
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


@pytest.mark.parametrize(("status", "event"), list(itertools.product(CallStatus, CallEvent)))
def test_transition_table(status: CallStatus, event: CallEvent) -> None:
    if (status, event) in ALLOWED:
        assert next_status(status, event) is ALLOWED[(status, event)]
    else:
        with pytest.raises(LocalProtocolError):
            next_status(status, event)


def make_call() -> Call:
    facts = invite_facts(
        pbx="asterisk",
        pbx_call_id="1700000000.1",
        channel="PJSIP/anonymous-00000001",
        request_user="alice",
        request_host="sip.example.com",
        from_number="+15551230000",
        from_name="John Doe",
        from_uri="sip:+15551230000@10.0.0.9",
        to_uri="sip:alice@sip.example.com",
        headers=[("X-First_Name", "John")],
        sip_call_id="abc@10.0.0.9",
    )
    return Call(id="c1", org_id="o1", facts=facts, created_at=T0)


def test_a_call_ends_once_and_the_first_reason_wins() -> None:
    call = make_call()
    call.apply(CallEvent.ANSWER, T0 + timedelta(seconds=1))
    assert call.end(EndedReason.CUSTOMER_ENDED_CALL, T0 + timedelta(seconds=11.5))
    assert not call.end(EndedReason.ASSISTANT_ENDED_CALL, T0 + timedelta(seconds=12))
    assert call.ended_reason is EndedReason.CUSTOMER_ENDED_CALL
    assert call.duration_seconds == 10.5


def test_unanswered_call_has_zero_duration() -> None:
    call = make_call()
    call.end(EndedReason.PHONE_NUMBER_NOT_FOUND, T0 + timedelta(seconds=3), sip_status=404)
    assert call.duration_seconds == 0.0
    assert call.sip_status == 404


def test_call_json_has_vapis_shape() -> None:
    call = make_call()
    call.phone_number = {"id": "pn1"}
    call.assistant_id = "a1"
    call.variable_values = {"first_name": "John"}
    call.apply(CallEvent.ANSWER, T0 + timedelta(seconds=1))
    call.end(EndedReason.CUSTOMER_ENDED_CALL, T0 + timedelta(seconds=5))
    body = call.to_json()
    assert body["type"] == "inboundPhoneCall"
    assert body["status"] == "ended" and body["endedReason"] == "customer-ended-call"
    assert body["phoneNumberId"] == "pn1" and body["assistantId"] == "a1"
    assert body["customer"] == {
        "number": "+15551230000",
        "name": "John Doe",
        "sipUri": "sip:+15551230000@10.0.0.9",
    }
    assert body["transport"] == {"provider": "vapi.sip", "callSid": "1700000000.1"}
    assert body["phoneCallProviderDetails"]["sip"] == {
        "uri": "sip:alice@sip.example.com",
        "headers": {
            "X-First_Name": "John",
            "to": "<sip:alice@sip.example.com>",
            "from": '"John Doe" <sip:+15551230000@10.0.0.9>',
        },
    }
    assert body["assistantOverrides"] == {"variableValues": {"first_name": "John"}}
    assert body["createdAt"] == "2024-01-01T12:00:00.000Z"
    assert body["startedAt"] == "2024-01-01T12:00:01.000Z"
    assert body["endedAt"] == "2024-01-01T12:00:05.000Z"
    assert body["sipbridge"]["durationSeconds"] == 4.0
    assert body["sipbridge"]["sipCallId"] == "abc@10.0.0.9"


def test_a_live_record_gives_back_its_call() -> None:
    """What a restarted sipbridge reads to settle a call its previous run left live."""
    call = make_call()
    call.assistant_id = "a1"
    call.assistant = {"name": "Support"}
    call.variable_values = {"first_name": "John"}
    call.variables = {"first_name": "John", "now": "x"}
    call.apply(CallEvent.ANSWER, T0 + timedelta(seconds=1))
    call.messages.append({"role": "user", "message": "hi"})
    call.transcript = "User: hi"
    call.media = {"framesFromCaller": 5}
    back = Call.from_record(call.to_json(), {"id": "pn1"})
    assert back.to_json() == call.to_json() | {"phoneNumberId": "pn1"}
    assert back.facts == call.facts
    with pytest.raises(LocalProtocolError):
        Call.from_record({"id": "x"}, None)


def test_ended_reasons_are_unique_strings() -> None:
    values = [reason.value for reason in EndedReason]
    assert len(values) == len(set(values))


@pytest.mark.parametrize(
    ("dial_status", "sip_status", "cause", "reason"),
    [
        ("BUSY", 486, 17, EndedReason.CUSTOMER_BUSY),
        ("CONGESTION", 603, 21, EndedReason.CUSTOMER_BUSY),  # Decline: the customer said no
        (None, None, 17, EndedReason.CUSTOMER_BUSY),  # only the hangup's cause was known
        ("NOANSWER", None, 19, EndedReason.CUSTOMER_DID_NOT_ANSWER),
        (None, None, 19, EndedReason.CUSTOMER_DID_NOT_ANSWER),
        ("CONGESTION", 480, 18, EndedReason.OUTBOUND_SIP_480),  # the SIP answer is precise
        ("CHANUNAVAIL", 403, 21, EndedReason.OUTBOUND_SIP_403),
        ("CONGESTION", 503, 34, EndedReason.OUTBOUND_SIP_503),
        ("CONGESTION", 404, 1, EndedReason.SIP_OUTBOUND_FAILED_TO_CONNECT),
        ("CHANUNAVAIL", None, 0, EndedReason.SIP_OUTBOUND_FAILED_TO_CONNECT),
    ],
)
def test_why_an_outbound_call_was_not_answered(
    dial_status: str | None, sip_status: int | None, cause: int, reason: EndedReason
) -> None:
    assert outbound_not_answered(dial_status, sip_status, cause) is reason


def test_an_outbound_call_record_says_so_and_shows_the_customers_uri() -> None:
    facts = invite_facts(
        pbx="asterisk",
        pbx_call_id="c-1",
        channel="c-1",
        request_user="+15550100",
        request_host="pbx.example.com",
        from_name="Ada",
        from_uri="sip:ada@example.org",
        to_uri="sip:ada@example.org",
        outbound=True,
    )
    call = Call(id="c-1", org_id="o", facts=facts, created_at=T0, status=CallStatus.QUEUED)
    record = call.to_json()
    assert (record["type"], record["status"]) == ("outboundPhoneCall", "queued")
    assert record["customer"] == {"name": "Ada", "sipUri": "sip:ada@example.org"}
    assert record["phoneCallProviderDetails"]["sip"]["uri"] == "sip:ada@example.org"
    assert record["sipbridge"]["numberSipUri"] == "sip:+15550100@pbx.example.com"
    restored = Call.from_record(record, None)
    assert restored.facts.outbound and restored.facts.request_user == "+15550100"
    assert restored.status is CallStatus.QUEUED
