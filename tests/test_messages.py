from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from bridge.calls import Call, CallEvent, EndedReason
from bridge.events import invite_facts
from bridge.messages import (
    WebhookTarget,
    assistant_request,
    end_of_call_report,
    status_update,
    target_for,
)
from bridge.models import without_secrets

T0 = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
DEFAULT = {"url": "https://default/hook"}


def make_call(**fields: Any) -> Call:
    facts = invite_facts(
        pbx="asterisk",
        pbx_call_id="1700000000.1",
        channel="PJSIP/anonymous-00000001",
        request_user="alice",
        request_host="sip.example.com",
        from_number="+15551230000",
        from_name="John Doe",
        headers=[("X-First_Name", "John")],
    )
    call = Call(id="c1", org_id="o1", facts=facts, created_at=T0, **fields)
    call.variable_values = {"first_name": "John"}
    return call


def test_assistant_request_goes_to_the_number_then_the_default() -> None:
    number = {
        "id": "pn1",
        "server": {"url": "https://number/hook", "secret": "s1", "headers": {"X-A": "1"}},
    }
    target = target_for("assistant-request", make_call(phone_number=number), DEFAULT)
    assert target == WebhookTarget("https://number/hook", "s1", {"X-A": "1"}, None)
    assert target_for(
        "assistant-request", make_call(phone_number={"id": "pn1"}), DEFAULT
    ) == WebhookTarget("https://default/hook")
    assert target_for("assistant-request", make_call(), None) is None


def test_other_messages_prefer_the_assistant_server() -> None:
    call = make_call(
        phone_number={"server": {"url": "https://number/hook"}},
        assistant={"server": {"url": "https://assistant/hook", "timeoutSeconds": 3}},
    )
    target = target_for("status-update", call, DEFAULT)
    assert target is not None and (target.url, target.timeout_s) == ("https://assistant/hook", 3.0)
    call.assistant = {"serverUrl": "https://legacy-assistant/hook"}
    assert target_for("end-of-call-report", call, DEFAULT).url == "https://legacy-assistant/hook"  # type: ignore[union-attr]
    call.assistant = {}
    assert target_for("end-of-call-report", call, DEFAULT).url == "https://number/hook"  # type: ignore[union-attr]


def test_server_messages_filter() -> None:
    call = make_call(
        assistant={"serverMessages": ["end-of-call-report"]},
        phone_number={"serverUrl": "https://n"},
    )
    assert target_for("status-update", call, DEFAULT) is None
    assert target_for("end-of-call-report", call, DEFAULT) is not None
    call.assistant = {}
    assert target_for("status-update", call, DEFAULT) is not None  # Vapi's default list has it
    assert target_for("transcript", call, DEFAULT) is None  # the default list does not


def test_secrets_never_reach_a_payload() -> None:
    call = make_call(
        phone_number={
            "id": "pn1",
            "server": {"url": "https://n", "secret": "s1"},
            "serverUrlSecret": "s1",
        },
        assistant={
            "server": {"url": "https://a", "secret": "s2"},
            "serverUrlSecret": "s2",
            "sipbridge": {"pipeline": {"url": "wss://p", "headers": {"Authorization": "s3"}}},
        },
    )
    for payload in (
        assistant_request(call, T0),
        status_update(call, T0),
        end_of_call_report(call, T0),
    ):
        text = repr(payload)
        assert "s1" not in text and "s2" not in text and "s3" not in text
        assert "wss://p" in text
    assert without_secrets(None) is None


def test_assistant_request_shape() -> None:
    call = make_call(
        phone_number={"id": "pn1", "sipUri": "sip:alice@sip.example.com", "provider": "vapi"}
    )
    message = assistant_request(call, T0)["message"]
    assert message["type"] == "assistant-request"
    assert message["timestamp"] == int(T0.timestamp() * 1000)
    assert message["phoneNumber"]["id"] == "pn1"
    assert message["customer"] == {"number": "+15551230000", "name": "John Doe"}
    assert message["call"]["phoneCallProviderDetails"]["sip"]["headers"]["X-First_Name"] == "John"
    assert message["call"]["assistantOverrides"]["variableValues"] == {"first_name": "John"}
    assert message["assistantVersion"] is None
    assert "assistant" not in message


def test_status_updates() -> None:
    call = make_call()
    assert status_update(call, T0)["message"]["status"] == "ringing"
    call.destination = {"type": "sip", "sipUri": "sip:op@x"}
    call.apply(CallEvent.FORWARD, T0)
    forwarding = status_update(call, T0)["message"]
    assert (
        forwarding["status"] == "forwarding" and forwarding["destination"]["sipUri"] == "sip:op@x"
    )
    call.end(EndedReason.ASSISTANT_REQUEST_RETURNED_FORWARDING, T0)
    ended = status_update(call, T0)["message"]
    assert ended["status"] == "ended"
    assert ended["endedReason"] == "assistant-request-returned-forwarding-phone-number"


def test_end_of_call_report() -> None:
    call = make_call(assistant={"name": "Support"})
    call.variables = {"first_name": "John", "year": "2024"}
    call.messages = [
        {"role": "bot", "message": "Hello John", "time": 1},
        {"role": "user", "message": "Hi", "time": 2},
    ]
    call.transcript = "AI: Hello John\nUser: Hi"
    call.apply(CallEvent.ANSWER, T0)
    call.end(EndedReason.CUSTOMER_ENDED_CALL, T0 + timedelta(seconds=12.25))
    message = end_of_call_report(call, T0 + timedelta(seconds=13))["message"]
    assert message["type"] == "end-of-call-report"
    assert message["endedReason"] == "customer-ended-call"
    assert message["startedAt"] == "2024-01-01T12:00:00.000Z"
    assert message["endedAt"] == "2024-01-01T12:00:12.250Z"
    assert message["durationSeconds"] == 12.25
    assert message["artifact"]["variableValues"] == {"first_name": "John", "year": "2024"}
    assert message["artifact"]["transcript"] == "AI: Hello John\nUser: Hi"
    assert message["artifact"]["messagesOpenAIFormatted"] == [
        {"role": "assistant", "content": "Hello John"},
        {"role": "user", "content": "Hi"},
    ]
    assert message["transcript"] == message["artifact"]["transcript"]  # legacy top-level copy
    assert message["assistant"] == {"name": "Support"}
    assert message["analysis"] == {} and message["cost"] == 0
    assert "recordingUrl" not in message["artifact"]


def test_a_recorded_call_reports_its_links_in_the_artifact() -> None:
    call = make_call()
    call.end(EndedReason.CUSTOMER_ENDED_CALL, T0)
    links = {"recordingUrl": "https://x/r.mono.wav", "stereoRecordingUrl": "https://x/r.wav"}
    artifact = end_of_call_report(call, T0, links)["message"]["artifact"]
    assert artifact["recordingUrl"] == "https://x/r.mono.wav"
    assert artifact["stereoRecordingUrl"] == "https://x/r.wav" and "transcript" in artifact
