from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from bridge.calls import Call, CallEvent, CallStatus, EndedReason, next_status
from bridge.errors import LocalProtocolError
from bridge.events import invite_facts

T0 = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)

ALLOWED = {
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
