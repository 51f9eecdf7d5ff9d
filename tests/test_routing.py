from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from bridge.calls import EndedReason
from bridge.events import InviteFacts, invite_facts
from bridge.routing import (
    Accept,
    AnswerAssistant,
    AnswerAssistantId,
    AnswerDestination,
    AnswerError,
    AnswerFailed,
    AskServer,
    Reject,
    RoutingDefaults,
    Transfer,
    UseAssistant,
    WebhookResult,
    accept,
    admit,
    admit_outbound,
    decide_answer,
    match_phone_number,
    outbound_caller_id,
    outbound_facts,
    parse_answer,
    pipeline_target,
    plan_call,
)

NOW = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
DEFAULTS = RoutingDefaults(pipeline_url="ws://127.0.0.1:9/pipe")
ASSISTANT = {"name": "Support", "firstMessage": "Hello {{first_name}}, you've reached me over SIP."}


def make_facts(
    user: str = "alice", host: str = "sip.example.com", headers: Any = ()
) -> InviteFacts:
    return invite_facts(
        pbx="test",
        pbx_call_id="p1",
        channel="chan1",
        request_user=user,
        request_host=host,
        from_number="+15551230000",
        from_name="John Doe",
        headers=headers or [("X-First_Name", "John"), ("X-Account-Id", "42")],
    )


def number(uri: str, created: str = "2024-01-01T00:00:00.000Z", **fields: Any) -> dict[str, Any]:
    return {
        "id": f"pn-{uri}-{created}",
        "provider": "vapi",
        "sipUri": uri,
        "createdAt": created,
        **fields,
    }


# ---- matching ------------------------------------------------------------------------------------


def test_user_part_matches_case_insensitively() -> None:
    numbers = [number("sip:Alice@sip.example.com"), number("sip:bob@sip.example.com")]
    assert match_phone_number(make_facts("ALICE"), numbers, ()) is numbers[0]
    assert match_phone_number(make_facts("carol"), numbers, ()) is None


def test_without_domains_any_host_matches_but_the_exact_host_wins() -> None:
    elsewhere = number("sip:alice@other.example.org", "2023-01-01T00:00:00.000Z")
    exact = number("sip:alice@10.0.0.5", "2024-06-01T00:00:00.000Z")
    assert match_phone_number(make_facts(host="10.0.0.5"), [elsewhere, exact], ()) is exact
    assert match_phone_number(make_facts(host="127.0.0.1"), [exact, elsewhere], ()) is elsewhere


def test_configured_domains_gate_the_request_host() -> None:
    numbers = [number("sip:alice@sip.example.com")]
    domains = ("sip.example.com", "pbx.example.com")
    assert match_phone_number(make_facts(host="pbx.example.com"), numbers, domains) is numbers[0]
    assert match_phone_number(make_facts(host="evil.example.net"), numbers, domains) is None
    foreign = [number("sip:alice@foreign.example.net")]
    assert match_phone_number(make_facts(host="pbx.example.com"), foreign, domains) is None


def test_ties_go_to_the_oldest_number() -> None:
    newer = number("sip:alice@a.example", "2024-02-01T00:00:00.000Z")
    older = number("sip:alice@b.example", "2024-01-01T00:00:00.000Z")
    assert match_phone_number(make_facts(host="c.example"), [newer, older], ()) is older


# ---- plan ----------------------------------------------------------------------------------------


def test_unknown_number_is_rejected_with_404() -> None:
    plan = plan_call(make_facts(), None, DEFAULTS)
    assert isinstance(plan, Reject)
    assert (plan.sip_status, plan.ended_reason) == (404, EndedReason.PHONE_NUMBER_NOT_FOUND)


def test_unknown_number_goes_to_the_default_assistant_when_configured() -> None:
    plan = plan_call(make_facts(), None, RoutingDefaults(default_assistant_id="a-default"))
    assert plan == UseAssistant("a-default")


def test_number_with_an_assistant_uses_it() -> None:
    assert plan_call(
        make_facts(), number("sip:alice@x", assistantId="a1"), DEFAULTS
    ) == UseAssistant("a1")


@pytest.mark.parametrize(
    ("fields", "expected_url"),
    [
        ({"server": {"url": "https://number/hook", "secret": "s"}}, "https://number/hook"),
        ({"serverUrl": "https://legacy/hook"}, "https://legacy/hook"),
        ({}, "https://default/hook"),
    ],
)
def test_without_an_assistant_the_server_is_asked(
    fields: dict[str, Any], expected_url: str
) -> None:
    defaults = RoutingDefaults(default_server={"url": "https://default/hook"})
    plan = plan_call(make_facts(), number("sip:alice@x", **fields), defaults)
    assert isinstance(plan, AskServer) and plan.server["url"] == expected_url


def test_neither_assistant_nor_server() -> None:
    plan = plan_call(make_facts(), number("sip:alice@x"), DEFAULTS)
    assert isinstance(plan, Reject)
    assert plan.ended_reason is EndedReason.NEITHER_ASSISTANT_NOR_SERVER
    assert plan.sip_status == 480


def test_squads_on_a_number_are_refused_clearly() -> None:
    plan = plan_call(make_facts(), number("sip:alice@x", squadId="sq1"), DEFAULTS)
    assert isinstance(plan, Reject) and "squadId" in plan.message


# ---- accept ----------------------------------------------------------------------------------------


def accept_assistant(assistant: dict[str, Any], facts: InviteFacts | None = None) -> Any:
    return accept(
        facts or make_facts(),
        call_id="c1",
        number=None,
        assistant=assistant,
        assistant_id="a1",
        now=NOW,
        defaults=DEFAULTS,
    )


def test_accept_renders_the_first_message_from_headers() -> None:
    decision = accept_assistant(ASSISTANT)
    assert isinstance(decision, Accept)
    assert decision.assistant["firstMessage"] == "Hello John, you've reached me over SIP."
    # As Vapi shows them to webhooks: lowercased, dashes kept, no underscore alias.
    assert decision.variable_values == {"first_name": "John", "account-id": "42"}
    assert decision.variables["account_id"] == decision.variables["account-id"] == "42"
    assert decision.variables["customer"] == {"number": "+15551230000", "name": "John Doe"}
    assert decision.variables["call"] == {"id": "c1", "type": "inboundPhoneCall"}
    assert decision.pipeline.url == "ws://127.0.0.1:9/pipe"
    assert (
        decision.pipeline.format,
        decision.pipeline.encoding,
        decision.pipeline.sample_rate,
    ) == (
        "raw",
        "pcm_s16le",
        16000,
    )


def test_pipeline_from_the_assistant_beats_the_defaults() -> None:
    assistant = {
        "sipbridge": {
            "pipeline": {
                "url": "wss://p/ws",
                "format": "twilio",
                "sampleRate": 24000,
                "headers": {"X-K": "v"},
            }
        }
    }
    target = pipeline_target(
        assistant, RoutingDefaults(pipeline_url="ws://d", pipeline_headers={"A": "1"})
    )
    assert target is not None
    assert (target.url, target.format, target.encoding, target.sample_rate) == (
        "wss://p/ws",
        "twilio",
        "mulaw",
        8000,
    )
    assert target.headers == {"A": "1", "X-K": "v"}
    raw_mulaw = pipeline_target({"sipbridge": {"pipeline": {"encoding": "mulaw"}}}, DEFAULTS)
    assert raw_mulaw is not None and raw_mulaw.sample_rate == 8000


def test_accept_without_any_pipeline_url_rejects() -> None:
    decision = accept(
        make_facts(),
        call_id="c1",
        number=None,
        assistant=ASSISTANT,
        assistant_id="a1",
        now=NOW,
        defaults=RoutingDefaults(),
    )
    assert isinstance(decision, Reject) and "pipeline" in decision.message


# ---- parse_answer ----------------------------------------------------------------------------------


def answer(body: Any, status: int = 200) -> WebhookResult:
    return WebhookResult(status, json.dumps(body).encode())


@pytest.mark.parametrize(
    ("result", "reason"),
    [
        (
            WebhookResult(None, failure="no answer within 7.5 s"),
            EndedReason.ASSISTANT_REQUEST_FAILED,
        ),
        (WebhookResult(None, failure="ClientConnectorError"), EndedReason.ASSISTANT_REQUEST_FAILED),
        (answer({"assistantId": "a1"}, status=500), EndedReason.ASSISTANT_REQUEST_FAILED),
        (answer({"assistantId": "a1"}, status=404), EndedReason.ASSISTANT_REQUEST_FAILED),
        (WebhookResult(200, b"not json"), EndedReason.ASSISTANT_REQUEST_FAILED),
        (WebhookResult(200, b"[1, 2]"), EndedReason.ASSISTANT_REQUEST_FAILED),
        (WebhookResult(200, b""), EndedReason.ASSISTANT_REQUEST_RETURNED_NO_ASSISTANT),
        (answer({}), EndedReason.ASSISTANT_REQUEST_RETURNED_NO_ASSISTANT),
        (
            answer({"assistantOverrides": {"variableValues": {"a": 1}}}),
            EndedReason.ASSISTANT_REQUEST_RETURNED_NO_ASSISTANT,
        ),
        (
            answer({"assistant": {"maxDurationSeconds": 1}}),
            EndedReason.ASSISTANT_REQUEST_RETURNED_INVALID_ASSISTANT,
        ),
        (answer({"assistant": "nope"}), EndedReason.ASSISTANT_REQUEST_RETURNED_INVALID_ASSISTANT),
        (answer({"assistantId": 7}), EndedReason.ASSISTANT_REQUEST_RETURNED_INVALID_ASSISTANT),
        (
            answer({"destination": {"type": "sip", "sipUri": "bad"}}),
            EndedReason.ASSISTANT_REQUEST_RETURNED_INVALID_ASSISTANT,
        ),
        (answer({"squadId": "sq"}), EndedReason.ASSISTANT_REQUEST_RETURNED_INVALID_ASSISTANT),
        (
            answer({"workflow": {"nodes": []}}),
            EndedReason.ASSISTANT_REQUEST_RETURNED_INVALID_ASSISTANT,
        ),
        (
            answer({"assistantId": "a1", "assistantOverrides": "x"}),
            EndedReason.ASSISTANT_REQUEST_RETURNED_INVALID_ASSISTANT,
        ),
        (
            answer({"assistantId": "a1", "assistantOverrides": {"variableValues": []}}),
            EndedReason.ASSISTANT_REQUEST_RETURNED_INVALID_ASSISTANT,
        ),
    ],
)
def test_unusable_answers(result: WebhookResult, reason: EndedReason) -> None:
    parsed = parse_answer(result)
    assert isinstance(parsed, AnswerFailed)
    assert parsed.reason is reason


def test_error_takes_precedence_over_everything() -> None:
    parsed = parse_answer(
        answer(
            {
                "error": "No credit.",
                "destination": {"type": "sip", "sipUri": "sip:a@b"},
                "assistantId": "a1",
            }
        )
    )
    assert parsed == AnswerError("No credit.")


def test_destination_takes_precedence_over_an_assistant() -> None:
    parsed = parse_answer(
        answer({"destination": {"type": "number", "number": "+14155552671"}, "assistantId": "a1"})
    )
    assert isinstance(parsed, AnswerDestination) and parsed.destination["number"] == "+14155552671"


def test_assistant_id_and_inline_assistant_answers() -> None:
    by_id = parse_answer(
        answer({"assistantId": "a1", "assistantOverrides": {"variableValues": {"x": "1"}}})
    )
    assert by_id == AnswerAssistantId("a1", {"variableValues": {"x": "1"}})
    inline = parse_answer(answer({"assistant": {"firstMessage": "Hey {{customerName}}"}}))
    assert isinstance(inline, AnswerAssistant) and inline.assistant == {
        "firstMessage": "Hey {{customerName}}"
    }


def test_message_response_envelope_is_unwrapped() -> None:
    assert parse_answer(answer({"messageResponse": {"assistantId": "a1"}})) == AnswerAssistantId(
        "a1", {}
    )


def test_any_2xx_is_an_answer() -> None:
    assert parse_answer(answer({"assistantId": "a1"}, status=201)) == AnswerAssistantId("a1", {})


# ---- decide_answer ---------------------------------------------------------------------------------

FALLBACK = {
    "type": "sip",
    "sipUri": "sip:operator@pbx.example.com",
    "message": "Sorry {{first_name}}",
}


def decide(parsed: Any, num: Any = None, saved: Any = None) -> Any:
    return decide_answer(
        parsed,
        facts=make_facts(),
        call_id="c1",
        number=num,
        now=NOW,
        defaults=DEFAULTS,
        saved_assistant=saved,
    )


def test_error_answer_rejects_with_603_and_no_fallback() -> None:
    decision = decide(
        AnswerError("No credit."), number("sip:alice@x", fallbackDestination=FALLBACK)
    )
    assert isinstance(decision, Reject)
    assert (decision.sip_status, decision.ended_reason, decision.message) == (
        603,
        EndedReason.ASSISTANT_REQUEST_RETURNED_ERROR,
        "No credit.",
    )


def test_failures_go_to_the_fallback_destination() -> None:
    failed = AnswerFailed(EndedReason.ASSISTANT_REQUEST_FAILED, "no answer within 7.5 s")
    decision = decide(failed, number("sip:alice@x", fallbackDestination=FALLBACK))
    assert isinstance(decision, Transfer)
    assert decision.ended_reason is EndedReason.ASSISTANT_REQUEST_FAILED
    assert decision.destination["message"] == "Sorry John"


def test_failures_without_fallback_reject_with_480() -> None:
    decision = decide(
        AnswerFailed(EndedReason.ASSISTANT_REQUEST_RETURNED_NO_ASSISTANT, "empty"),
        number("sip:alice@x"),
    )
    assert isinstance(decision, Reject)
    assert (decision.sip_status, decision.ended_reason) == (
        480,
        EndedReason.ASSISTANT_REQUEST_RETURNED_NO_ASSISTANT,
    )


def test_destination_answer_transfers_with_rendered_fields() -> None:
    destination = {
        "type": "sip",
        "sipUri": "sip:support@x",
        "sipHeaders": {"X-Account": "gold"},
        "callerId": "{{customer.number}}",
    }
    decision = decide(AnswerDestination(destination))
    assert isinstance(decision, Transfer)
    assert decision.ended_reason is EndedReason.ASSISTANT_REQUEST_RETURNED_FORWARDING
    assert decision.destination["callerId"] == "+15551230000"
    assert decision.destination["sipHeaders"] == {"X-Account": "gold"}


def test_named_assistant_that_does_not_exist() -> None:
    decision = decide(AnswerAssistantId("gone", {}), number("sip:alice@x"))
    assert isinstance(decision, Reject) and decision.ended_reason is EndedReason.ASSISTANT_NOT_FOUND
    with_fallback = decide(
        AnswerAssistantId("gone", {}), number("sip:alice@x", fallbackDestination=FALLBACK)
    )
    assert (
        isinstance(with_fallback, Transfer)
        and with_fallback.ended_reason is EndedReason.ASSISTANT_NOT_FOUND
    )


def test_named_assistant_with_variable_overrides() -> None:
    decision = decide(
        AnswerAssistantId("a1", {"variableValues": {"first_name": "Ann", "plan": "gold"}}),
        saved={"firstMessage": "Hi {{first_name}} ({{plan}}), account {{account_id}}"},
    )
    assert isinstance(decision, Accept)
    assert decision.assistant_id == "a1"
    assert decision.assistant["firstMessage"] == "Hi Ann (gold), account 42"
    assert decision.variable_values["first_name"] == "Ann"
    assert decision.variable_values["account-id"] == "42"


def test_inline_assistant_with_overrides_of_fields() -> None:
    decision = decide(
        AnswerAssistant(
            {"firstMessage": "x", "name": "Inline"},
            {"firstMessage": "Hey {{first_name}}", "variableValues": {}},
        )
    )
    assert isinstance(decision, Accept)
    assert decision.assistant_id is None and decision.assistant["name"] == "Inline"
    assert decision.assistant["firstMessage"] == "Hey John"


def test_overrides_that_break_the_assistant_are_an_invalid_assistant() -> None:
    decision = decide(
        AnswerAssistantId("a1", {"maxDurationSeconds": 1}), saved={"firstMessage": "x"}
    )
    assert isinstance(decision, Reject)
    assert decision.ended_reason is EndedReason.ASSISTANT_REQUEST_RETURNED_INVALID_ASSISTANT
    assert "assistantOverrides.maxDurationSeconds" in decision.message


def test_defaults_from_settings_carry_the_secret_pipeline_headers() -> None:
    from bridge.settings import Settings

    settings = Settings(
        api={"lab_mode": True},
        pipeline={"default_url": "ws://127.0.0.1:9/p", "default_headers": {"X-Token": "t0k"}},
    )
    defaults = RoutingDefaults.from_settings(settings)
    assert defaults.pipeline_headers == {"X-Token": "t0k"}
    target = pipeline_target({}, defaults)
    assert target is not None and target.headers == {"X-Token": "t0k"}


def test_admission_limits() -> None:
    """0 means no limit; the count includes the call being offered."""
    assert admit(10_000, 5.0, RoutingDefaults()) is None
    limits = RoutingDefaults(max_calls=2, max_event_loop_lag_s=0.15)
    assert admit(2, 0.1, limits) is None
    limit, reject = admit(3, 0.1, limits) or ("", None)
    assert limit == "max_calls" and reject is not None
    assert (reject.sip_status, reject.ended_reason) == (
        503,
        EndedReason.CONCURRENCY_LIMIT_REACHED,
    )
    limit, reject = admit(1, 0.2, limits) or ("", None)
    assert limit == "event_loop_lag" and reject is not None and "200 ms late" in reject.message


def test_a_template_broken_by_a_callers_header_still_accepts_the_call() -> None:
    # [hardening] 1: a 300-character X-Tz made the date filter raise OSError out of accept().
    assistant = {
        "firstMessage": '{{ "now" | date: "%H:%M", tz }}',
        "model": {"messages": [{"role": "system", "content": "Caller: {{ first_name }}"}]},
    }
    facts = make_facts(headers=[("X-First_Name", "John"), ("X-Tz", "A" * 300)])
    decision = accept_assistant(assistant, facts)
    assert isinstance(decision, Accept)
    assert decision.assistant["firstMessage"] == assistant["firstMessage"]
    assert decision.assistant["model"]["messages"][0]["content"] == "Caller: John"


def test_outbound_caps_count_calls_under_way_and_calls_started_lately() -> None:
    capped = RoutingDefaults(outbound_max_concurrent=2, outbound_max_calls_per_second=2)
    assert admit_outbound(1, [9.5], 10.0, capped) is None
    assert "max_concurrent = 2" in (admit_outbound(2, [], 10.0, capped) or "")
    assert "max_calls_per_second = 2" in (admit_outbound(0, [9.2, 9.5], 10.0, capped) or "")
    assert admit_outbound(0, [8.9, 9.5], 10.0, capped) is None  # one of them is over a second old
    uneven = RoutingDefaults(outbound_max_calls_per_second=1.5)  # 2 calls in any 1.33 s
    assert admit_outbound(0, [9.0], 10.0, uneven) is None
    assert admit_outbound(0, [8.8, 9.0], 10.0, uneven) is not None
    assert admit_outbound(0, [8.6, 9.0], 10.0, uneven) is None
    slow = RoutingDefaults(outbound_max_calls_per_second=0.1)  # one call in any 10 s
    assert admit_outbound(0, [1.0], 10.5, slow) is not None
    assert admit_outbound(0, [0.4], 10.5, slow) is None
    assert admit_outbound(100, [10.0] * 100, 10.0, RoutingDefaults()) is None  # no caps set


def test_an_outbound_call_shows_its_number_and_knows_its_customer() -> None:
    number = {"id": "n1", "sipUri": "sip:+15550100@pbx.example.com", "name": "Acme"}
    assert outbound_caller_id(number) == "+15550100"
    assert outbound_caller_id({**number, "number": "+4930123"}) == "+4930123"
    assert outbound_caller_id({"sipUri": "sip:sales.team@pbx.example.com"}) is None
    facts = outbound_facts(
        "asterisk",
        "c-1",
        number,
        {"sipUri": "sip:bob@example.org", "name": "Bob"},
        {"X-Campaign": "spring"},
    )
    assert facts.outbound and (facts.pbx_call_id, facts.channel) == ("c-1", "c-1")
    assert facts.customer() == {"name": "Bob", "sipUri": "sip:bob@example.org"}
    assert facts.request_uri == "sip:+15550100@pbx.example.com"
    decision = accept(
        facts,
        call_id="c-1",
        number=number,
        assistant={
            "name": "Out",
            "firstMessage": "Hi {{customer.name}} ({{call.type}}) {{campaign}}",
        },
        assistant_id="a1",
        now=NOW,
        defaults=DEFAULTS,
    )
    assert isinstance(decision, Accept)
    assert decision.assistant["firstMessage"] == "Hi Bob (outboundPhoneCall) spring"
