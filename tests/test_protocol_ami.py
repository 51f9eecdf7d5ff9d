from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.errors import LocalProtocolError, PbxActionError, RemoteProtocolError
from bridge.protocol import ami

# A SipbridgeOffer event captured from Asterisk 22.10.1 running dialplan/sipbridge.conf, for a
# call to "al(i)ce" whose X-Evil header held every character that could break a dialplan.
CAPTURED = (Path(__file__).parent / "data" / "ami_offer_event.txt").read_bytes().decode("utf-8")
EVIL = "a,b;c\"d'e)f}g${SHELL}%0Ah|i?j:k\\l&m=n(o{p$(1+1)q%25r~"


def parse(message: str) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for line in message.strip().split("\r\n"):
        key, _, value = line.partition(": ")
        fields.setdefault(key, value)
    return fields


def test_the_captured_offer_decodes_exactly() -> None:
    offer = ami.decode_offer(parse(CAPTURED))
    facts = offer.facts
    assert not offer.truncated
    assert (facts.pbx, facts.pbx_call_id, facts.channel) == (
        "asterisk",
        "1795455093.1",
        "PJSIP/anonymous-00000001",
    )
    assert facts.request_user == "al(i)ce" and facts.request_host == "127.0.0.1"
    assert facts.from_name == "José Müller, Jr."
    assert facts.from_number == "+15551230000" and facts.from_uri == "sip:+15551230000@127.0.0.1"
    assert facts.to_uri == "sip:al(i)ce@example.com"
    assert facts.sip_call_id == "1-15553@127.0.0.1"
    assert facts.headers == (
        ("X-First_Name", "John"),
        ("X-Account-Id", "42"),
        ("X-Evil", EVIL),
        ("X-Note", "hello, world"),
    )


def test_offer_without_identity_is_refused() -> None:
    with pytest.raises(RemoteProtocolError):
        ami.decode_offer({"Event": "UserEvent", "UserEvent": "SipbridgeOffer"})


def test_truncated_flag_and_repeated_keys() -> None:
    event = {**parse(CAPTURED), "SbTruncated": "1", "Exten": ["s", "dup"]}
    assert ami.decode_offer(event).truncated


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"Ann" <sip:ann@x>;tag=1', ("Ann", "sip:ann@x")),
        ('"A \\"B\\" C" <sip:abc@x>', ('A "B" C', "sip:abc@x")),
        ("Bob Smith <sip:bob@x:5060;transport=udp>", ("Bob Smith", "sip:bob@x:5060;transport=udp")),
        ("<sip:anon@x>", (None, "sip:anon@x")),
        ("sip:bare@x;tag=9", (None, "sip:bare@x")),
    ],
)
def test_name_addr(value: str, expected: tuple[str | None, str | None]) -> None:
    assert ami.parse_name_addr(value) == expected


SPACES = " " * 100_000


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # Each of these took the old regex (\s*, lazy token, \s* before "<") cubic time.
        (SPACES, (None, None)),
        (SPACES + "<sip:a@x>", (None, "sip:a@x")),
        ("a" + SPACES + "b <sip:a@x>", ("a" + SPACES + "b", "sip:a@x")),
        ('"' + SPACES, (None, '"')),
        (SPACES + '"x"' + SPACES + "<" + SPACES, (None, '"x"' + SPACES + "<")),
        ('"' + "\\ " * 50_000 + '" <sip:a@x>', (" " * 50_000, "sip:a@x")),
        ("<" * 100_000, (None, "<" * 100_000)),
        (SPACES + "<" + SPACES + ">", (None, None)),
        (
            "a" + SPACES + '"' + SPACES + "<sip:a@x>",
            (None, "a" + SPACES + '"' + SPACES + "<sip:a@x>"),
        ),
    ],
    ids=lambda value: repr(value)[:24] if isinstance(value, str) else "",
)
def test_name_addr_on_pathological_values(
    value: str, expected: tuple[str | None, str | None]
) -> None:
    # The scanner is linear by construction (no regex: each character is read by one step).
    assert ami.parse_name_addr(value) == expected


# What parse_name_addr meant when it was a regex: the reference for short values, where its
# backtracking costs nothing. (A quoted-pair of "\\" and CR differs: RFC 3261 forbids it.)
REFERENCE = re.compile(
    r'^\s*(?:"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<token>[^<"]*?))\s*<(?P<uri>[^>]*)>'
)


def reference_name_addr(value: str) -> tuple[str | None, str | None]:
    match = REFERENCE.match(value)
    if not match:
        return None, value.split(";", 1)[0].strip() or None
    quoted = match.group("quoted")
    name = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else match.group("token").strip()
    return name or None, match.group("uri").strip() or None


@given(st.text(alphabet=' \t\n\u00a0"\\<>;:@as', max_size=24))
def test_name_addr_agrees_with_the_regex_it_replaced(value: str) -> None:
    assert ami.parse_name_addr(value) == reference_name_addr(value)


def test_a_quoted_pair_never_escapes_a_line_break() -> None:
    assert ami.parse_name_addr('"a\\\r" <sip:a@x>') == (None, '"a\\\r" <sip:a@x>')


@pytest.mark.parametrize("cause", ["²", "١٦", " 16", "+16", "1_6", "9" * 5000, "-1", ""])
def test_a_hangup_cause_is_ascii_digits_or_nothing(cause: str) -> None:
    assert ami.hangup_cause({"Cause": cause}) == 0


def test_uri_user() -> None:
    assert ami.uri_user("sip:+15551234@host:5060;user=phone") == "+15551234"
    assert ami.uri_user("sips:al%40ce@x") == "al@ce"
    assert ami.uri_user("tel:+1555") is None and ami.uri_user(None) is None


def test_header_decoding_skips_broken_parts() -> None:
    assert ami.decode_headers("&X-A=1&broken&X-B=%2520") == [("X-A", "1"), ("X-B", " ")]
    assert ami.decode_headers("") == []


def test_actions_cannot_inject_fields() -> None:
    with pytest.raises(LocalProtocolError):
        ami.setvar("PJSIP/x", "V", "a\r\nAction: Originate")
    with pytest.raises(LocalProtocolError):
        ami.checked({"Bad: Key": "x"})
    with pytest.raises(LocalProtocolError):
        ami.reject("PJSIP/x", 200)


def test_reject_media_and_hangup_actions() -> None:
    assert ami.reject("PJSIP/x-1", 404) == {
        "Action": "PJSIPHangup",
        "Channel": "PJSIP/x-1",
        "Cause": "404",
    }
    assert ami.hangup("PJSIP/x-1") == {"Action": "Hangup", "Channel": "PJSIP/x-1", "Cause": "16"}
    setvars = ami.connect_media("PJSIP/x-1", "c1", "127.0.0.1:9092", "sipbridge-media")
    assert [a["Action"] for a in setvars] == ["Setvar", "Setvar", "Redirect"]
    assert setvars[2] == {
        "Action": "Redirect",
        "Channel": "PJSIP/x-1",
        "Context": "sipbridge-media",
        "Exten": "s",
        "Priority": "1",
    }
    assert ami.heartbeat(1700000000) == {
        "Action": "Setvar",
        "Variable": "SIPBRIDGE_HEARTBEAT",
        "Value": "1700000000",
    }


def test_sip_transfer_plan() -> None:
    plan = ami.transfer(
        "PJSIP/x-1",
        {
            "type": "sip",
            "sipUri": "sip:agent@pbx.example.com;transport=tcp",
            "sipHeaders": {"X-Account": "gold, plus", "X-Note": "a&b=c"},
            "callerId": "+14155550000",
        },
        endpoint="sipbridge-transfer",
        transfer_context="sipbridge-transfer",
    )
    values = {a.get("Variable"): a.get("Value") for a in plan.actions}
    assert (
        values["SIPBRIDGE_XFER_DIAL"]
        == "PJSIP/sipbridge-transfer/sip:agent@pbx.example.com;transport=tcp"
    )
    assert values["SIPBRIDGE_XFER_CALLERID"] == "+14155550000"
    assert values["__SIPBRIDGE_XFER_HEADERS"] == "X-Account=gold%2C%20plus&X-Note=a%26b%3Dc"
    assert plan.actions[-1]["Action"] == "Redirect" and plan.notes == []


def test_number_transfer_with_extension_and_a_bad_caller_id() -> None:
    plan = ami.transfer(
        "PJSIP/x-1",
        {"type": "number", "number": "+14155552671", "extension": "101", "callerId": "John <evil>"},
        endpoint="trunk",
        transfer_context="sipbridge-transfer",
    )
    values = {a.get("Variable"): a.get("Value") for a in plan.actions}
    assert values["SIPBRIDGE_XFER_DIAL"] == "PJSIP/+14155552671@trunk"
    assert values["SIPBRIDGE_XFER_OPTIONS"] == "D(101)"
    assert values["SIPBRIDGE_XFER_CALLERID"] == ""
    assert "callerId" in plan.notes[0]


@pytest.mark.parametrize(
    "destination",
    [
        {"type": "sip", "sipUri": "sip:a@b,SIP/evil"},
        {"type": "sip", "sipUri": "sip:a@b&PJSIP/x"},
        {"type": "sip", "sipUri": "sip:a@b)"},
        {"type": "number", "number": "123,456"},
        {"type": "number", "number": "123", "extension": "1)"},
        {"type": "assistant"},
    ],
)
def test_undialable_destinations_are_refused(destination: dict[str, Any]) -> None:
    with pytest.raises(PbxActionError):
        ami.transfer("PJSIP/x-1", destination, endpoint="e", transfer_context="c")


def test_channel_rows_and_hangup_causes() -> None:
    row = ami.channel_state(
        {
            "Event": "CoreShowChannel",
            "Channel": "PJSIP/a-1",
            "Uniqueid": "1.1",
            "Context": "sipbridge-offer",
            "Application": "Wait",
        }
    )
    assert row == ami.ChannelState("PJSIP/a-1", "1.1", "sipbridge-offer", "Wait")
    assert ami.channel_state({"Event": "CoreShowChannelsComplete"}) is None
    assert ami.hangup_cause({"Cause": "16"}) == 16 and ami.hangup_cause({"Cause": "x"}) == 0


def test_event_filters_name_only_the_events_acted_on() -> None:
    filters = ami.event_filters()
    assert [f["MatchCriteria"] for f in filters] == [
        f"action(include),name({name})" for name in ami.EVENTS_USED
    ]
    assert all(f["Action"] == "Filter" and f["Operation"] == "Add" for f in filters)
    # The login's event classes cover every event used: UserEvent is "user", Hangup "call".
    assert set(ami.EVENT_CLASSES.split(",")) == {"call", "user"}


@pytest.mark.parametrize(
    ("context", "outcome"),
    [
        ("sipbridge-media", ami.Redirected.DONE),
        ("sipbridge-offer", ami.Redirected.NOT_DONE),
        ("from-internal", ami.Redirected.ELSEWHERE),
        (None, ami.Redirected.GONE),
    ],
)
def test_a_lost_redirect_is_judged_by_where_the_channel_is(
    context: str | None, outcome: ami.Redirected
) -> None:
    state = None if context is None else ami.ChannelState("PJSIP/a-1", "1.1", context, "Wait")
    judged = ami.redirect_outcome(state, waiting="sipbridge-offer", target="sipbridge-media")
    assert judged is outcome


def test_an_outbound_call_is_originated_through_a_local_channel_named_by_the_call_id() -> None:
    action = ami.originate(
        "5c1d4e0a-0000-4000-8000-000000000001",
        target="PJSIP/sipbridge-outbound/sip:bob@192.0.2.10:5062",
        caller_id="+15550100",
        caller_name="Acme, Inc. (sales)",
        headers={"X-Campaign": "spring, 2027"},
        ring_timeout_s=45,
        audiosocket="127.0.0.1:9092",
        outbound_context="sipbridge-outbound",
        media_context="sipbridge-media",
    )
    assert action["Action"] == "Originate" and action["Async"] == "true"
    assert action["Channel"] == "Local/s@sipbridge-outbound"
    assert action["ChannelId"] == "5c1d4e0a-0000-4000-8000-000000000001"
    assert (action["Context"], action["Exten"], action["Priority"]) == ("sipbridge-media", "s", "1")
    assert action["Timeout"] == "55000"
    lines = action["Variable"]
    assert isinstance(lines, list)  # one Variable line each: a line holds at most 1024 bytes
    variables = dict(line.split("=", 1) for line in lines)
    assert variables["SIPBRIDGE_OUT_DIAL"] == "PJSIP/sipbridge-outbound/sip:bob@192.0.2.10:5062"
    assert variables["SIPBRIDGE_OUT_RING_S"] == "45"
    assert variables["SIPBRIDGE_OUT_CALLERID"] == "+15550100"
    # Text that could split the variable list travels URI-encoded.
    assert variables["SIPBRIDGE_OUT_CALLERNAME"] == "Acme%2C%20Inc.%20%28sales%29"
    assert variables["__SIPBRIDGE_XFER_HEADERS"] == "X-Campaign=spring%2C%202027"
    assert variables["SIPBRIDGE_CALL_ID"] == action["ChannelId"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("caller_id", "not a number"),
        ("target", "PJSIP/x/sip:a@b,c"),
        ("audiosocket", "h:1\r\nX: y"),
    ],
)
def test_an_originate_that_could_inject_is_refused(field: str, value: str) -> None:
    values: dict[str, Any] = {
        "target": "PJSIP/sipbridge-outbound/sip:bob@example.com",
        "caller_id": "100",
        "caller_name": "",
        "headers": {},
        "ring_timeout_s": 60,
        "audiosocket": "127.0.0.1:9092",
        "outbound_context": "sipbridge-outbound",
        "media_context": "sipbridge-media",
    }
    values[field] = value
    with pytest.raises(LocalProtocolError):
        ami.originate("call-1", **values)


def test_dial_targets_of_customers() -> None:
    assert ami.dial_target({"type": "sip", "sipUri": "sip:bob@h"}, "out", "customer") == (
        "PJSIP/out/sip:bob@h"
    )
    assert ami.dial_target({"type": "number", "number": "+4930123"}, "out", "customer") == (
        "PJSIP/+4930123@out"
    )
    with pytest.raises(PbxActionError, match="customer SIP URI"):
        ami.dial_target({"type": "sip", "sipUri": "sip:bob@h&PJSIP/evil"}, "out", "customer")


def test_the_dial_result_event() -> None:
    event = {
        "Event": "UserEvent",
        "UserEvent": "SipbridgeDialed",
        "SbCall": "call-1",
        "SbStatus": "BUSY",
        "SbSip": "SIP%2520486%2520Busy%2520Here",
    }
    assert ami.decode_dial_result(event) == ami.DialResult(
        "call-1", "BUSY", 486, "SIP 486 Busy Here"
    )
    assert ami.decode_dial_result({**event, "SbSip": ""}) == ami.DialResult(
        "call-1", "BUSY", None, ""
    )
    assert ami.decode_dial_result({**event, "UserEvent": "SipbridgeOffer"}) is None
