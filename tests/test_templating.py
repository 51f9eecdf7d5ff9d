from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest

from bridge import templating
from bridge.templating import (
    MAX_MARKUP,
    MAX_OUTPUT_CHARS,
    MAX_SOURCE_CHARS,
    MAX_VALUE_CHARS,
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
    assert "used literally" in caplog.text


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


# ---- [hardening] 1: any exception while rendering means the template is used literally -------


@pytest.mark.parametrize(
    ("template", "variables"),
    [
        ('{{ "now" | date: "%H:%M", tz }}', {"tz": "A" * 300}),  # OSError: name too long
        ("{{ 3.5 | modulo: 0 }}", {}),  # decimal.InvalidOperation
        ('{{ x | split: "," | sum }}', {"x": "1,a"}),  # decimal.InvalidOperation
        ('{{ 99999999999999999999 | date: "%Y" }}', {}),  # OSError/OverflowError
    ],
)
def test_any_failure_renders_literally_with_one_warning_naming_the_field(
    template: str, variables: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="bridge.templating"):
        rendered = render(template, variables, NOW, field="firstMessage")
    assert rendered == template
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].getMessage().startswith("firstMessage (")
    assert warnings[0].exc_info is None  # one line, no traceback
    assert "AAAA" not in caplog.text  # the caller's value is not logged


def test_a_broken_template_in_an_assistant_leaves_the_other_fields_rendered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assistant = {
        "firstMessage": "Hi {{ first_name }}",
        "model": {"messages": [{"role": "system", "content": "{{ 3.5 | modulo: 0 }}"}]},
    }
    with caplog.at_level(logging.WARNING, logger="bridge.templating"):
        rendered = render_assistant(assistant, {"first_name": "Ann"}, NOW)
    assert rendered["firstMessage"] == "Hi Ann"
    assert rendered["model"]["messages"][0]["content"] == "{{ 3.5 | modulo: 0 }}"
    assert "model.messages[0].content (" in caplog.text


# ---- [hardening] 2: a template cannot stall the service ------------------------------------


def _doublings(filter_: str, rounds: int, start: str) -> str:
    """``rounds`` assigns of x to x combined with itself; says what became of x (not x itself:
    a number of millions of digits cannot be printed, so printing it would fail anyway)."""
    tail = "{{ x | size }}" if start.startswith('"') else "{% if x > 1 %}grew{% endif %}"
    return f"{{% assign x = {start} %}}" + f"{{% assign x = x | {filter_}: x %}}" * rounds + tail


# Each renders (slowly, or to something huge) without the limits; 22 doublings stay within what
# a test machine can hold without them: 2**22-digit numbers, 8 M characters.
HOSTILE = {
    "times squares a number each round": _doublings("times", 22, "2"),
    "times in a loop": "{% assign x = 2 %}{% for i in (1..22) %}{% assign x = x | times: x %}"
    "{% endfor %}{% if x > 1 %}grew{% endif %}",
    "append doubles a string each round": _doublings("append", 22, '"ab"'),
    "prepend in a loop": '{% assign x = "ab" %}{% for i in (1..22) %}'
    "{% assign x = x | prepend: x %}{% endfor %}{{ x | size }}",
    "replace squares a string": '{% assign x = "' + "a" * 400 + '" %}'
    '{% assign y = x | replace: "a", x %}{{ y | size }}',
    "join with a long separator": '{% assign s = "' + "b" * 1000 + '" %}'
    "{{ (1..5000) | join: s | size }}",
    "uniq on many items": '{{ (1..5000) | join: "," | split: "," | uniq | size }}',
    "deep nesting": "{% if true %}" * 1000 + "x" + "{% endif %}" * 1000,
    "a long output": '{% for i in (1..10000) %}{{ "0123456789" | append: i }}{% endfor %}',
    "a template too long": "{{ x }}" + " " * MAX_SOURCE_CHARS,
    "too many tags to parse": "{{ x }}" * (MAX_MARKUP + 1),
}


@pytest.mark.parametrize("template", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_templates_render_literally(template: str) -> None:
    assert render(template, {}, NOW) == template


def test_values_within_the_limits_still_render() -> None:
    assert render(_doublings("times", 10, "2"), {}, NOW) == "grew"  # 1024 bits
    assert render("{{ x | times: x }}", {"x": 2**2000}, NOW) == str(2**4000)
    assert render(_doublings("append", 10, '"ab"'), {}, NOW) == "2048"
    assert render("{{ x | append: x | size }}", {"x": "y" * 1000}, NOW) == "2000"
    assert render("{{ (1..500) | join: ',' | split: ',' | uniq | size }}", {}, NOW) == "500"
    long = "{% for i in (1..2000) %}{{ i | modulo: 10 }}{% endfor %}"
    assert len(render(long, {}, NOW)) == 2000


def test_output_is_bounded() -> None:
    template = "{% for i in (1..10000) %}{{ s }}{% endfor %}"
    rendered = render(template, {"s": "z" * 100}, NOW)
    assert rendered == template or len(rendered) <= MAX_OUTPUT_CHARS
    assert len(render("{{ s | append: s }}", {"s": "z" * MAX_VALUE_CHARS}, NOW)) <= MAX_OUTPUT_CHARS


class TickingClock:
    """A CPU clock that advances 10 ms each time it is read: no real time involved."""

    def __init__(self) -> None:
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.reads * 0.01


def test_the_cpu_budget_stops_loops_without_filters() -> None:
    # Many empty loops in a row have no filter to check limits in; each iteration counts.
    endless = "{% for i in (1..10000) %}{% endfor %}" * 20 + "done"
    assert render(endless, {}, NOW, cpu_clock=TickingClock()) == endless
    assert render(endless, {}, NOW) == "done"  # no clock, no time budget: only the size limits
    short = "{% for i in (1..10) %}{{ i | plus: 1 }}{% endfor %}"
    assert render(short, {}, NOW, cpu_clock=TickingClock()) == "234567891011"


def test_an_assistants_templates_share_one_budget() -> None:
    slow = "{% for i in (1..10000) %}{% endfor %}" * 20
    assistant = {
        "firstMessage": slow,
        "endCallMessage": "Bye {{ first_name }}",  # rendered after the budget is spent
    }
    rendered = render_assistant(assistant, {"first_name": "Ann"}, NOW, cpu_clock=TickingClock())
    assert rendered == assistant


def test_only_reviewed_filters_exist() -> None:
    # A filter python-liquid adds is unknown until its cost is reviewed (see _LINEAR_FILTERS).
    reviewed = templating._LINEAR_FILTERS | templating._SIZE_ESTIMATES.keys()
    assert set(templating._ENVIRONMENT.filters) == reviewed
