from __future__ import annotations

from datetime import UTC, datetime

import pytest

from bridge.errors import ValidationFailed
from bridge.models import (
    apply_patch,
    format_timestamp,
    parse_sip_uri,
    parse_timestamp,
    server_of,
    sip_uri_key,
    validate_assistant,
    validate_destination,
    validate_outbound_call,
    validate_phone_number,
)


def problems(func, body) -> list[str]:
    with pytest.raises(ValidationFailed) as caught:
        func(body)
    return caught.value.problems


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("sip:alice@sip.example.com", ("alice", "sip.example.com", None)),
        ("sip:Alice@Example.COM:5080", ("Alice", "example.com", 5080)),
        ("sip:+15551234@10.0.0.5", ("+15551234", "10.0.0.5", None)),
        ("sip:bob@[2001:db8::1]", ("bob", "[2001:db8::1]", None)),
    ],
)
def test_sip_uri_parsing(uri: str, expected: tuple[str, str, int | None]) -> None:
    assert parse_sip_uri(uri) == expected


@pytest.mark.parametrize(
    "uri",
    [
        "alice@example.com",
        "sip:@example.com",
        "sip:alice@",
        "sip:a b@x",
        "sips:a@x",
        "sip:a@x;transport=tcp",
        "sip:a@x:0",
        "sip:a@x:70000",
        "sip:a@-x",
        "sip:a@x:\u0665\u0660\u0666\u0660",  # Arabic-Indic 5060: \\d and int() take it
    ],
)
def test_malformed_sip_uris(uri: str) -> None:
    assert parse_sip_uri(uri) is None


def test_sip_uri_key_is_case_insensitive() -> None:
    assert sip_uri_key("sip:Alice@Example.com") == sip_uri_key("sip:alice@EXAMPLE.COM")
    # Routing ignores the port, so uniqueness does too.
    assert sip_uri_key("sip:alice@example.com:5060") == sip_uri_key("sip:alice@example.com")


def test_timestamps_look_like_vapis() -> None:
    moment = datetime(2024, 1, 2, 3, 4, 5, 678_900, tzinfo=UTC)
    assert format_timestamp(moment) == "2024-01-02T03:04:05.678Z"
    assert parse_timestamp("2024-01-02T03:04:05.678Z") == moment.replace(microsecond=678000)
    with pytest.raises(ValueError):
        parse_timestamp("2024-01-02T03:04:05")  # no zone: no moment


def test_assistant_keeps_unknown_fields_and_checks_known_ones() -> None:
    body = {
        "name": "Support",
        "firstMessage": "Hello {{first_name}}",
        "firstMessageMode": "assistant-speaks-first",
        "model": {"provider": "openai", "messages": [{"role": "system", "content": "Be nice"}]},
        "voice": {"provider": "11labs", "voiceId": "x"},
        "endCallPhrases": ["goodbye"],
        "maxDurationSeconds": 300,
        "silenceTimeoutSeconds": 30,
        "metadata": {"team": "a"},
        "serverMessages": ["end-of-call-report"],
        "backgroundSound": "off",
        "somethingNew": {"nested": [1, 2]},
        "sipbridge": {"pipeline": {"url": "wss://pipe.example/ws", "format": "twilio"}},
    }
    assert validate_assistant(body) == body


def test_assistant_problems_are_listed_one_per_field() -> None:
    found = problems(
        validate_assistant,
        {
            "name": "x" * 41,
            "maxDurationSeconds": 5,
            "firstMessageMode": "whenever",
            "silenceTimeoutSeconds": "30",
            "model": {"messages": "not a list"},
            "sipbridge": {"pipeline": {"url": "http://wrong", "sampleRate": 44100}},
        },
    )
    fields = sorted(p.split(":")[0] for p in found)
    assert fields == [
        "firstMessageMode",
        "maxDurationSeconds",
        "model",
        "name",
        "silenceTimeoutSeconds",
        "sipbridge.pipeline.sampleRate",
        "sipbridge.pipeline.url",
    ]


def test_body_must_be_an_object() -> None:
    assert problems(validate_assistant, ["a"]) == ["body: must be a JSON object"]


def test_phone_number_accepts_both_server_forms_and_shows_both() -> None:
    legacy = validate_phone_number(
        {
            "provider": "vapi",
            "sipUri": "sip:a@b.c",
            "serverUrl": "https://h/x",
            "serverUrlSecret": "s",
        }
    )
    assert legacy["server"] == {"url": "https://h/x", "secret": "s"}
    assert legacy["serverUrl"] == "https://h/x" and legacy["serverUrlSecret"] == "s"
    current = validate_phone_number(
        {"sipUri": "sip:a@b.c", "server": {"url": "https://h/x", "timeoutSeconds": 10}}
    )
    assert current["provider"] == "vapi"
    assert current["serverUrl"] == "https://h/x" and "serverUrlSecret" not in current


def test_phone_number_rejections() -> None:
    assert problems(validate_phone_number, {"provider": "twilio", "sipUri": "sip:a@b"}) == [
        "provider: must be 'vapi' (sipbridge serves SIP phone numbers only)"
    ]
    assert problems(validate_phone_number, {"sipUri": "tel:+1555"}) == [
        "sipUri: must be a SIP URI like sip:user@host"
    ]
    assert problems(
        validate_phone_number, {"sipUri": "sip:a@b", "numberDesiredAreaCode": "415"}
    ) == ["numberDesiredAreaCode: not supported: sipbridge serves SIP URIs, not PSTN numbers"]
    conflict = problems(
        validate_phone_number,
        {"sipUri": "sip:a@b", "server": {"url": "https://one"}, "serverUrl": "https://two"},
    )
    assert conflict == ["serverUrl: differs from server.url; send one of them"]
    assert problems(
        validate_phone_number,
        {"sipUri": "sip:a@b", "server": {"url": "ftp://x", "timeoutSeconds": 0}},
    ) == [
        "server.url: must be an http:// or https:// URL",
        "server.timeoutSeconds: Input should be greater than or equal to 1",
    ]


@pytest.mark.parametrize(
    ("destination", "expected"),
    [
        (
            {"type": "sip", "sipUri": "nope"},
            "fallbackDestination.sipUri: must be a SIP URI like sip:agent@pbx.example.com",
        ),
        (
            {"type": "number", "number": "+1 555"},
            "fallbackDestination.number: must be a number like +14155552671 (letters and digits, optional +)",
        ),
        (
            {"type": "sip", "sipUri": "sip:a@b", "sipHeaders": {"X-A": "1\r\nVia: evil"}},
            "fallbackDestination.sipHeaders: header 'X-A' contains a control character",
        ),
        (
            {"type": "sip", "sipUri": "sip:a@b", "sipHeaders": {"Bad Name": "1"}},
            "fallbackDestination.sipHeaders: header name 'Bad Name' is not a valid token",
        ),
    ],
)
def test_fallback_destination_is_checked(destination: dict[str, object], expected: str) -> None:
    assert problems(
        validate_phone_number, {"sipUri": "sip:a@b", "fallbackDestination": destination}
    ) == [expected]


def test_destinations() -> None:
    sip = {
        "type": "sip",
        "sipUri": "sip:agent@pbx.example.com",
        "sipHeaders": {"X-Account": "gold"},
        "message": "",
    }
    assert validate_destination(sip) == sip
    number = {
        "type": "number",
        "number": "+14155552671",
        "extension": "101",
        "callerId": "{{customer.number}}",
    }
    assert validate_destination(number) == number
    with pytest.raises(ValidationFailed, match=r"destination.type: must be 'number' or 'sip'"):
        validate_destination({"type": "assistant", "assistantName": "x"})


def test_patch_semantics() -> None:
    existing = {
        "id": "1",
        "orgId": "o",
        "createdAt": "t",
        "updatedAt": "t",
        "provider": "vapi",
        "sipUri": "sip:a@b",
        "assistantId": "asst",
        "name": "old",
    }
    patched = apply_patch(existing, {"assistantId": None, "name": "new", "id": "hacked"})
    assert "assistantId" not in patched and patched["name"] == "new"
    assert "id" not in patched  # read-only fields are the caller's to restore


def test_patch_with_legacy_fields_updates_server() -> None:
    existing = validate_phone_number(
        {"sipUri": "sip:a@b", "server": {"url": "https://old", "timeoutSeconds": 5}}
    )
    patched = validate_phone_number(apply_patch(existing, {"serverUrl": "https://new"}))
    assert patched["server"] == {"url": "https://new", "timeoutSeconds": 5}
    assert patched["serverUrl"] == "https://new"
    cleared = validate_phone_number(apply_patch(patched, {"server": None}))
    assert "server" not in cleared and "serverUrl" not in cleared
    # The SDK's PATCH: {"provider": "vapi", "server": {"url": ...}, "assistantId": null}
    sdk = validate_phone_number(
        apply_patch(
            existing, {"provider": "vapi", "server": {"url": "https://sdk"}, "assistantId": None}
        )
    )
    assert sdk["server"] == {"url": "https://sdk"} and sdk["serverUrl"] == "https://sdk"


def test_server_of() -> None:
    assert server_of(None) is None
    assert server_of({"serverUrl": "https://x", "serverUrlSecret": "s"}) == {
        "url": "https://x",
        "secret": "s",
    }
    assert server_of({"server": {"url": "https://y"}}) == {"url": "https://y"}
    assert server_of({"server": {}}) is None


def test_an_outbound_call_body_names_one_customer_and_one_assistant() -> None:
    body = {
        "assistantId": "a1",
        "phoneNumberId": "n1",
        "customer": {"sipUri": "sip:bob@example.com", "name": "Bob"},
        "sipbridge": {"sipHeaders": {"X-Campaign": "spring"}},
    }
    assert validate_outbound_call(body)["customer"]["sipUri"] == "sip:bob@example.com"
    inline = {**body, "assistantId": None, "assistant": {"name": "Inline"}}
    del inline["assistantId"]
    assert validate_outbound_call(inline)["assistant"]["name"] == "Inline"
    cases = [
        (
            {**body, "customer": {"name": "Nobody"}},
            "customer: needs exactly one of number and sipUri",
        ),
        (
            {**body, "customer": {"number": "+1555", "sipUri": "sip:b@h"}},
            "customer: needs exactly one of number and sipUri",
        ),
        (
            {**body, "assistant": {"name": "Both"}},
            "assistantId: send exactly one of assistantId and assistant",
        ),
        ({**body, "customer": {"number": "+1 555 01"}}, "customer.number: must be a number"),
        ({**body, "customer": {"sipUri": "bob@example.com"}}, "customer.sipUri: must be a SIP URI"),
        ({**body, "sipbridge": {"sipHeaders": {"Via": "x"}}}, "is not an X- header"),
        ({k: v for k, v in body.items() if k != "phoneNumberId"}, "phoneNumberId: Field required"),
    ]
    for document, problem in cases:
        with pytest.raises(ValidationFailed) as failed:
            validate_outbound_call(document)
        assert any(problem in line for line in failed.value.problems), failed.value.problems
