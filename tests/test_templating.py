from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest

from bridge.templating import (
    header_variables,
    merge_variables,
    render,
    render_assistant,
    render_destination,
    time_variables,
)

NOW = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)


def test_header_names_become_lowercase_variables() -> None:
    variables = header_variables(
        [("X-First_Name", "John"), ("x-LAST_NAME", "Doe"), ("X-FIRST_NAME", "second"), ("Via", "x")]
    )
    assert variables == {"first_name": "John", "last_name": "Doe"}


def test_dashed_names_are_reachable_both_ways() -> None:
    variables = header_variables([("X-Account-Id", "42"), ("X-Our-Call-ID", "c1")])
    assert variables == {
        "account-id": "42",
        "account_id": "42",
        "our-call-id": "c1",
        "our_call_id": "c1",
    }
    assert render("{{account-id}}/{{account_id}}", variables, NOW) == "42/42"
    # An explicit underscore header keeps its own value.
    both = header_variables([("X-A-B", "dash"), ("X-A_B", "underscore")])
    assert both == {"a-b": "dash", "a_b": "underscore"}
    # What the call shows as variableValues: the lowercased names only.
    exact = header_variables([("X-Account-Id", "42")], underscore_aliases=False)
    assert exact == {"account-id": "42"}


def test_headers_cannot_forge_identity(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        variables = header_variables(
            [("X-Customer", "evil"), ("X-Call", "x"), ("X-Transport", "t")]
        )
    assert variables == {}
    assert "shadow" in caplog.text


def test_precedence_overrides_then_headers_then_defaults() -> None:
    defaults = {**time_variables(NOW), "customer": {"number": "+1555"}}
    merged = merge_variables(
        defaults, {"first_name": "John", "date": "header"}, {"first_name": "Ann"}
    )
    assert merged["first_name"] == "Ann"
    assert merged["date"] == "header"
    assert merged["customer"] == {"number": "+1555"}


def test_default_time_variables_in_utc() -> None:
    assert time_variables(datetime(2024, 1, 1, 0, 5, tzinfo=UTC)) == {
        "now": "Jan 1, 2024 12:05 AM",
        "date": "Jan 1, 2024",
        "time": "12:05 AM",
        "year": "2024",
        "month": "January",
        "day": "1",
        "currentDateTime": "Jan 1, 2024 12:05 AM",
    }


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (
            "Hello {{first_name}}, you've reached me over SIP.",
            "Hello John, you've reached me over SIP.",
        ),
        ("{{ first_name }}", "John"),
        ("{{ customer.number }} / {{ customer.name | upcase }}", "+15551230000 / JOHN DOE"),
        ("{{ nickname | default: 'friend' }}", "friend"),
        ("{{ first_name | downcase }} {{ 'mIXED' | capitalize }}", "john Mixed"),
        ('{{ "now" | date: "%b %d, %Y, %I:%M %p", "America/New_York" }}', "Jan 01, 2024, 07:00 AM"),
        ('{{ "now" | date: "%H:%M" }}', "12:00"),
        ('{{ signup | date: "%Y-%m-%d", "Asia/Tokyo" }}', "2024-03-05"),
        ("{% if first_name %}Hi {{first_name}}{% else %}Hi{% endif %}", "Hi John"),
        ("no template at all", "no template at all"),
    ],
)
def test_liquid_rendering(template: str, expected: str) -> None:
    variables = {
        "first_name": "John",
        "customer": {"number": "+15551230000", "name": "John Doe"},
        "signup": "2024-03-04T20:00:00Z",
    }
    assert render(template, variables, NOW) == expected


def test_undefined_renders_empty_and_logs_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="bridge.templating"):
        assert render("Hi {{missing}}{{a.b.c}}!", {}, NOW) == "Hi !"
    assert "'missing' is not defined" in caplog.text


@pytest.mark.parametrize(
    "template",
    [
        "Hello {{ first_name",
        "{% bogus %}",
        "{{ x | nosuchfilter }}",
        '{{ "now" | date: "%H", "Mars/Olympus" }}',
        "{% for i in (1..1000000) %}x{% endfor %}",
    ],
)
def test_malformed_templates_render_literally_with_a_warning(
    template: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        assert render(template, {"x": 1}, NOW) == template
    assert "using it literally" in caplog.text


def test_header_values_are_data_not_templates() -> None:
    assert render("{{first_name}}", {"first_name": "{{secret}}"}, NOW) == "{{secret}}"


def test_render_assistant_renders_the_text_fields_only() -> None:
    assistant = {
        "firstMessage": "Hello {{first_name}}",
        "endCallMessage": "Bye {{first_name}}",
        "voicemailMessage": "VM {{first_name}}",
        "name": "{{first_name}}",
        "model": {
            "messages": [
                {"role": "system", "content": "Caller is {{first_name}} on {{date}}"},
                {"role": "user", "content": [{"type": "text"}]},
            ],
            "tools": [
                {
                    "type": "transferCall",
                    "destinations": [
                        {
                            "type": "number",
                            "number": "+1",
                            "message": "To {{first_name}}",
                            "callerId": "{{customer.number}}",
                        }
                    ],
                }
            ],
        },
    }
    variables = {**time_variables(NOW), "first_name": "John", "customer": {"number": "+1555"}}
    rendered = render_assistant(assistant, variables, NOW)
    assert rendered["firstMessage"] == "Hello John"
    assert rendered["endCallMessage"] == "Bye John"
    assert rendered["voicemailMessage"] == "VM John"
    assert rendered["name"] == "{{first_name}}"
    assert rendered["model"]["messages"][0]["content"] == "Caller is John on Jan 1, 2024"
    assert rendered["model"]["messages"][1] == {"role": "user", "content": [{"type": "text"}]}
    destination = rendered["model"]["tools"][0]["destinations"][0]
    assert destination["message"] == "To John" and destination["callerId"] == "+1555"
    assert assistant["firstMessage"] == "Hello {{first_name}}"  # the input is not modified


def test_render_destination_with_custom_message() -> None:
    destination = {
        "type": "sip",
        "sipUri": "sip:{{first_name}}@x",
        "message": {
            "type": "custom-message",
            "content": "Hi {{first_name}}",
            "contents": [{"content": "Bye {{first_name}}"}],
        },
        "callerId": "{{phoneNumber.number}}",
    }
    rendered = render_destination(
        destination, {"first_name": "Ann", "phoneNumber": {"number": "sip:x@y"}}, NOW
    )
    assert rendered["sipUri"] == "sip:{{first_name}}@x"
    assert rendered["message"]["content"] == "Hi Ann"
    assert rendered["message"]["contents"] == [{"content": "Bye Ann"}]
    assert rendered["callerId"] == "sip:x@y"
