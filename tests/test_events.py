from __future__ import annotations

import logging
from typing import Any

import pytest

from bridge.events import MAX_X_HEADERS, InviteFacts, invite_facts


def facts(**overrides: Any) -> InviteFacts:
    values: dict[str, Any] = {
        "pbx": "test",
        "pbx_call_id": "1.0",
        "channel": "PJSIP/anonymous-00000001",
        "request_user": "alice",
        "request_host": "Sip.Example.com:5060",
    }
    values.update(overrides)
    return invite_facts(**values)


def test_request_host_is_lowercased_without_port() -> None:
    assert facts().request_host == "sip.example.com"
    assert facts(request_host="[2001:DB8::1]:5060").request_host == "[2001:db8::1]"
    assert facts().request_uri == "sip:alice@sip.example.com"


def test_hostile_header_values_lose_control_characters(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        cleaned = facts(
            headers=[
                ("X-Note", 'hello, world; "quoted"'),
                ("X-Inject", "a\r\nVia: evil\x00"),
                ("X-Long", "x" * 5000),
            ]
        )
    assert cleaned.headers[0] == ("X-Note", 'hello, world; "quoted"')
    assert cleaned.headers[1] == ("X-Inject", "aVia: evil")
    assert cleaned.headers[2] == ("X-Long", "x" * 1024)
    assert "X-Inject" in caplog.text


def test_only_x_headers_with_token_names_are_kept(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        cleaned = facts(
            headers=[
                ("Via", "x"),
                ("X-", "empty"),
                ("X-Bad Name", "1"),
                ("X-Ok", "1"),
                ("x-lower", "2"),
            ]
        )
    assert cleaned.headers == (("X-Ok", "1"), ("x-lower", "2"))


def test_header_count_is_capped() -> None:
    many = [(f"X-H{i}", str(i)) for i in range(MAX_X_HEADERS + 10)]
    assert len(facts(headers=many).headers) == MAX_X_HEADERS


def test_other_fields_are_cleaned() -> None:
    cleaned = facts(
        from_name="Jos\u00e9 M\u00fcller\r\n", from_number="+1555\x00", request_user="al\nice"
    )
    assert cleaned.from_name == "José Müller"
    assert cleaned.from_number == "+1555"
    assert cleaned.request_user == "alice"


def test_header_map_keeps_first_of_a_repeated_name() -> None:
    cleaned = facts(headers=[("X-A", "1"), ("x-a", "2"), ("X-B", "3")])
    assert cleaned.header_map() == {"X-A": "1", "X-B": "3"}
