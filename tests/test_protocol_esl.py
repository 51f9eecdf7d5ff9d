"""The Event Socket codec against real FreeSWITCH 1.10.12 captures (tests/data/freeswitch/)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from bridge.errors import LocalProtocolError, RemoteProtocolError
from bridge.protocol.esl import (
    API_RESPONSE,
    AUTH_REQUEST,
    COMMAND_REPLY,
    DISCONNECT_NOTICE,
    EVENT_JSON,
    EVENT_PLAIN,
    EslDecoder,
    EslEvent,
    EslMessage,
    channel_data,
    command,
    ended_by_caller,
    event_time,
    execute,
    hangup,
    hangup_cause_code,
    invite_facts_of,
    parked_channels,
    parse_dump,
    parse_event,
    sendmsg,
    unicast,
)

CAPTURES = Path(__file__).parent / "data" / "freeswitch"
RX_FILES = sorted(path.name for path in CAPTURES.glob("*.rx.bin"))
LIVE_FILES = sorted(
    path.relative_to(CAPTURES).as_posix()
    for path in CAPTURES.glob("*/**/*.bin")
    if path.name.endswith(("s2c.bin",))
)
CALL_1 = "b3c872c2-6bbe-4ccf-81fa-c71492244ae0"


def decode_all(data: bytes, chunks: list[int] | None = None) -> list[EslMessage]:
    decoder = EslDecoder()
    messages: list[EslMessage] = []
    if chunks is None:
        decoder.receive_data(data)
        messages += decoder.messages()
    else:
        offset = 0
        for size in chunks:
            decoder.receive_data(data[offset : offset + size])
            offset += size
            messages += decoder.messages()
        assert offset >= len(data)
    assert decoder.pending_bytes == 0
    decoder.receive_eof()
    return messages


def rx(name: str) -> list[EslMessage]:
    return decode_all((CAPTURES / name).read_bytes())


def events(name: str) -> list[tuple[EslMessage, EslEvent]]:
    return [(m, parse_event(m)) for m in rx(name) if m.content_type in (EVENT_PLAIN, EVENT_JSON)]


@pytest.mark.parametrize("name", RX_FILES)
def test_every_capture_decodes_whole_in_any_chunking(name: str) -> None:
    data = (CAPTURES / name).read_bytes()
    whole = decode_all(data)
    assert whole
    rng = random.Random(name)
    sizes = [rng.choice((1, 2, 3, 7, 64, 1500, 9000)) for _ in range(len(data))]
    assert decode_all(data, sizes) == whole
    # Every event body parses.
    for message in whole:
        if message.content_type in (EVENT_PLAIN, EVENT_JSON):
            assert parse_event(message).name


def test_the_inbound_session_message_by_message() -> None:
    messages = rx("s1_inbound_plain_all.rx.bin")
    assert len(messages) == 82
    assert messages[0].content_type == AUTH_REQUEST
    assert (messages[1].content_type, messages[1].reply_text) == (COMMAND_REPLY, "+OK accepted")
    assert messages[2].reply_text == "+OK event listener enabled plain"
    status = messages[3]
    assert status.content_type == API_RESPONSE and len(status.body) == 338
    assert "0 session(s) - peak 0, last 5min 0 \n" in status.text  # trailing space kept
    replies = [m for m in messages if m.content_type in (COMMAND_REPLY, API_RESPONSE)]
    # In command order (tx): auth, event, status, getvar, dump, kill, bgapi, 2 sendmsg, answer, exit.
    texts = [m.reply_text if m.content_type == COMMAND_REPLY else m.text for m in replies]
    assert texts[3] == "John"  # uuid_getvar: the body alone, no newline
    assert texts[4].startswith("Event-Name: CHANNEL_DATA")  # uuid_dump
    assert texts[5] == "-ERR No such channel!\n"
    assert texts[6].startswith("+OK Job-UUID: ")
    assert texts[7:9] == ["+OK", "+OK"]
    assert texts[9] == "+OK\n" and texts[10] == "+OK bye"
    assert messages[-1].content_type == DISCONNECT_NOTICE
    assert messages[-1].text == (
        "Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"
    )
    assert [m.ok for m in replies[5:7]] == [False, True]


def test_a_background_job_carries_its_result_as_the_inner_body() -> None:
    messages = rx("s1_inbound_plain_all.rx.bin")
    reply = next(m for m in messages if m.reply_text.startswith("+OK Job-UUID: "))
    job_uuid = reply.reply_text.removeprefix("+OK Job-UUID: ")
    assert reply.get("Job-UUID") == job_uuid
    job = next(e for _, e in events("s1_inbound_plain_all.rx.bin") if e.name == "BACKGROUND_JOB")
    assert job.job_uuid == job_uuid and job.body == "42"


def test_dtmf_and_values_are_url_decoded_line_by_line() -> None:
    parsed = [e for _, e in events("s1_inbound_plain_all.rx.bin")]
    digits = [e.headers["DTMF-Digit"] for e in parsed if e.name == "DTMF"]
    assert digits == ["1", "2", "#"]
    park = next(e for e in parsed if e.name == "CHANNEL_PARK")
    assert park.headers["Caller-Channel-Name"].startswith("sofia/external/ann@127.0.0.1:")
    assert park.headers["Caller-Caller-ID-Name"] == "Ann Example"


def test_a_parked_call_is_the_same_invite_as_asterisk_reports() -> None:
    park = next(
        e
        for _, e in events("s1_inbound_plain_all.rx.bin")
        if e.name == "CHANNEL_PARK" and e.unique_id == CALL_1
    )
    facts = invite_facts_of(park)
    assert facts.pbx == "freeswitch" and facts.pbx_call_id == facts.channel == CALL_1
    assert (facts.request_user, facts.request_host) == ("alice", "127.0.0.1")
    assert (facts.from_number, facts.from_name) == ("ann", "Ann Example")
    assert facts.from_uri is not None and facts.from_uri.startswith("sip:ann@127.0.0.1")
    assert facts.headers == (("X-First_Name", "John"), ("X-Account-Id", "42"), ("X-Lang", "en-US"))
    assert facts.sip_call_id


def test_the_json_park_event_gives_the_same_facts_as_the_plain_one() -> None:
    ((_, json_park),) = [
        pair for pair in events("s1_inbound_json_park.rx.bin") if pair[1].name == "CHANNEL_PARK"
    ]
    plain_park = next(
        e
        for _, e in events("s1_inbound_plain_all.rx.bin")
        if e.name == "CHANNEL_PARK" and e.unique_id == json_park.unique_id
    )
    assert invite_facts_of(json_park) == invite_facts_of(plain_park)


def test_the_outbound_connect_reply_is_the_channel() -> None:
    messages = rx("s2_outbound_async_unicast.rx.bin")
    connect = messages[0]
    assert connect.content_type == COMMAND_REPLY and connect.body == b""
    assert connect.reply_text == "+OK\n" and connect.get("Socket-Mode") == "async"
    channel = channel_data(connect)
    facts = invite_facts_of(channel)
    assert facts.request_user == "bot" and facts.from_name == "Ann Example"
    assert dict(facts.headers)["X-First_Name"] == "John"
    lingering = [m for m in messages if m.content_type == DISCONNECT_NOTICE]
    assert lingering[0].get("Content-Disposition") == "linger"
    assert lingering[0].get("Linger-Time") == "-1"
    static = rx("s2_outbound_static_unicast_park.rx.bin")
    assert static[0].get("Socket-Mode") == "static"


def test_a_custom_event_with_its_doubled_content_length() -> None:
    custom = next(e for _, e in events("s1_inbound_custom_event.rx.bin") if e.name == "CUSTOM")
    assert custom.subclass == "fixture::demo"
    assert custom.body == "hello from ESL\nsecond line\n"


def test_a_refused_password_and_a_deflect_reply_with_a_cr() -> None:
    refused = rx("s1_inbound_bad_password.rx.bin")
    assert [m.content_type for m in refused] == [AUTH_REQUEST, COMMAND_REPLY, DISCONNECT_NOTICE]
    assert refused[1].reply_text == "-ERR invalid" and not refused[1].ok
    assert len(refused[2].body) == 67
    deflect = [
        m for m in rx("s3_inbound_transfer_deflect.rx.bin") if m.content_type == API_RESPONSE
    ]
    assert deflect[0].text == "+OK\n"  # uuid_transfer
    assert deflect[1].text == "+OK:SIP/2.0 200 OK\r\n\n"  # uuid_deflect, CR included


def test_an_encoded_line_break_in_a_callers_header_injects_nothing() -> None:
    # The captured park event, with the caller's X-First_Name made hostile.
    park = next(
        m
        for m in rx("s1_inbound_plain_all.rx.bin")
        if m.content_type == EVENT_PLAIN and b"Event-Name: CHANNEL_PARK" in m.body
    )
    body = park.body.replace(
        b"variable_sip_h_X-First_Name: John",
        b"variable_sip_h_X-First_Name: Jo%0AX-Injected%3A%20yes",
    )
    hostile = parse_event(EslMessage(park.headers, body))
    assert "X-Injected" not in hostile.headers
    assert hostile.headers["variable_sip_h_X-First_Name"] == "Jo\nX-Injected: yes"
    facts = invite_facts_of(hostile)
    assert dict(facts.headers)["X-First_Name"] == "JoX-Injected: yes"  # control characters gone
    assert len(facts.headers) == 3


def test_what_we_send_is_byte_for_byte_what_the_captures_sent() -> None:
    sent = (
        command("auth ClueCon")
        + command("event plain ALL")
        + command("api status")
        + command(f"api uuid_getvar {CALL_1} sip_h_X-First_Name")
        + command(f"api uuid_dump {CALL_1}")
        + command("api uuid_kill 00000000-0000-0000-0000-000000000000")
        + command(f"bgapi uuid_getvar {CALL_1} sip_h_X-Account-Id")
        + execute(CALL_1, "playback", "tone_stream://%(200,0,440)")
        + hangup(CALL_1)
        + command("api uuid_answer e7a8cd40-30a1-49c6-9b9d-a178235bb063")
        + command("exit")
    )
    assert sent == (CAPTURES / "s1_inbound_plain_all.tx.bin").read_bytes()
    outbound = (
        command("connect")
        + command("myevents")
        + command("linger")
        + execute(None, "answer")
        + unicast(None, ("127.0.0.1", 8025), ("127.0.0.1", 9026))
        + command("exit")
    )
    assert outbound == (CAPTURES / "s2_outbound_async_unicast.tx.bin").read_bytes()


@pytest.mark.parametrize("text", ["api status\nexit", "api x\r", "api \x00"])
def test_a_command_that_would_span_lines_is_refused(text: str) -> None:
    with pytest.raises(LocalProtocolError):
        command(text)


def test_sendmsg_headers_are_checked() -> None:
    with pytest.raises(LocalProtocolError):
        sendmsg(CALL_1, {"execute-app-arg": "x\ncall-command: hangup"})
    with pytest.raises(LocalProtocolError):
        sendmsg(CALL_1, {"bad:name": "x"})
    with pytest.raises(LocalProtocolError):
        sendmsg(f"{CALL_1}\nexit", {})


def test_limits_and_broken_streams() -> None:
    decoder = EslDecoder(max_body_bytes=100)
    decoder.receive_data(b"Content-Type: api/response\nContent-Length: 101\n\n")
    with pytest.raises(RemoteProtocolError, match="over the 100-byte limit"):
        decoder.next_message()
    decoder = EslDecoder(max_header_bytes=64)
    decoder.receive_data(b"X-Long: " + b"a" * 100)
    with pytest.raises(RemoteProtocolError, match="longer than 64"):
        decoder.next_message()
    decoder = EslDecoder()
    decoder.receive_data(b"Content-Type: api/response\nContent-Length: ten\n\n")
    with pytest.raises(RemoteProtocolError, match="not a number"):
        decoder.next_message()
    decoder = EslDecoder()
    decoder.receive_data(b"no colon here\n\n")
    with pytest.raises(RemoteProtocolError, match="without ': '"):
        decoder.next_message()
    decoder = EslDecoder()
    decoder.receive_data(b"Content-Type: api/response\nContent-Length: 4\n\nJo")
    assert decoder.next_message() is None
    with pytest.raises(RemoteProtocolError, match="middle of a message"):
        decoder.receive_eof()
    with pytest.raises(RemoteProtocolError, match="after the end"):
        decoder.receive_data(b"hn")
    with pytest.raises(RemoteProtocolError, match="not an ESL event"):
        parse_event(EslMessage((("Content-Type", API_RESPONSE),), b"x"))
    with pytest.raises(RemoteProtocolError, match="not JSON"):
        parse_event(EslMessage((("Content-Type", EVENT_JSON),), b"[" * 50000))
    with pytest.raises(RemoteProtocolError, match="without a Unique-ID"):
        invite_facts_of(
            parse_event(EslMessage((("Content-Type", EVENT_PLAIN),), b"Event-Name: X\n\n"))
        )


@pytest.mark.parametrize("length", ["²", "١٢", "+5", " 5", "5 ", "1_0", "-1", "9" * 5000, ""])
def test_a_content_length_of_anything_but_ascii_digits_is_a_protocol_error(length: str) -> None:
    decoder = EslDecoder()
    decoder.receive_data(f"Content-Type: api/response\nContent-Length: {length}\n\n".encode())
    with pytest.raises(RemoteProtocolError, match="not a number"):
        decoder.next_message()
    plain = f"Event-Name: BACKGROUND_JOB\nContent-Length: {length}\n\nbody".encode()
    with pytest.raises(RemoteProtocolError, match="not a number"):
        parse_event(EslMessage((("Content-Type", EVENT_PLAIN),), plain))


@pytest.mark.parametrize("number", ["²", "١٦", "+16", " 16", "9" * 5000])
def test_numeric_channel_variables_are_ascii_digits_or_unknown(number: str) -> None:
    event = EslEvent({"variable_hangup_cause_q850": number, "Event-Date-Timestamp": number})
    assert hangup_cause_code(event) == 0 and event_time(event) is None


class CountingBuffer(bytearray):
    """A decoder's buffer that counts the bytes its searches look at."""

    searched = 0

    def find(self, sub: Any, start: Any = 0, *args: Any) -> int:
        CountingBuffer.searched += len(self) - (start or 0)
        return super().find(sub, start, *args)


def test_a_header_block_arriving_byte_by_byte_is_searched_once() -> None:
    block = b"Content-Type: text/event-plain\n" + b"X-Pad: " + b"a" * 20_000 + b"\n\n"
    decoder = EslDecoder()
    decoder._buffer = CountingBuffer()
    CountingBuffer.searched = 0
    for index in range(len(block)):
        decoder.receive_data(block[index : index + 1])
        if index < len(block) - 1:
            assert decoder.next_message() is None
    assert decoder.next_message() is not None
    # Linear: each byte is searched about once (the old decoder searched ~len²/2 = 200 million).
    assert CountingBuffer.searched <= 2 * len(block)


@pytest.mark.parametrize("name", LIVE_FILES)
def test_every_later_capture_decodes_whole(name: str) -> None:
    """live/ and faults/: what FreeSWITCH sent sipbridge's own adapter, JSON events included."""
    data = (CAPTURES / name).read_bytes()
    messages = decode_all(data, [random.Random(name).randint(1, 700) for _ in range(len(data))])
    assert decode_all(data) == messages
    for message in messages:
        if message.content_type in (EVENT_PLAIN, EVENT_JSON):
            assert parse_event(message).name


def live_events(scenario: str, connection: int = 1) -> list[EslEvent]:
    found = decode_all((CAPTURES / f"live/{scenario}/conn-{connection}.s2c.bin").read_bytes())
    return [parse_event(m) for m in found if m.content_type == EVENT_JSON]


def test_json_events_carry_the_callers_values_as_sent() -> None:
    """X-Pct: 100%41off reached the pipeline as 100Aoff through plain events."""
    park = next(e for e in live_events("call") if e.name == "CHANNEL_PARK")
    headers = dict(invite_facts_of(park).headers)
    assert headers["X-Pct"] == "100%41off" and headers["X-Crlf"] == "a%0D%0Ab"
    digits = [e.headers["DTMF-Digit"] for e in live_events("call") if e.name == "DTMF"]
    assert digits == ["1", "2", "#"]


@pytest.mark.parametrize(
    ("scenario", "by_caller", "cause"),
    [
        ("call", True, 16),  # the caller's BYE: recv_bye
        ("system-shutdown", False, 0),  # fsctl shutdown: SYSTEM_SHUTDOWN, send_bye
        ("outage-refusal", False, 0),  # sipbridge's refusal: send_refuse
    ],
)
def test_who_ended_a_channel(scenario: str, by_caller: bool, cause: int) -> None:
    connection = 2 if scenario == "outage-refusal" else 1
    [gone] = [e for e in live_events(scenario, connection) if e.name == "CHANNEL_HANGUP_COMPLETE"]
    assert ended_by_caller(gone) is by_caller
    assert hangup_cause_code(gone) == int(gone.headers.get("variable_hangup_cause_q850", 0))
    if cause:
        assert hangup_cause_code(gone) == cause
    moment = event_time(gone)
    assert moment is not None and moment.year == 2026 and moment.tzinfo is not None
    assert event_time(EslEvent({"Event-Date-Timestamp": "soon"})) is None


def test_a_dump_and_the_channel_listing() -> None:
    unseen = decode_all((CAPTURES / "live/unseen-offer/conn-2.s2c.bin").read_bytes())
    listing = next(m for m in unseen if m.content_type == API_RESPONSE and b"row_count" in m.body)
    [parked] = parked_channels(listing.text)
    dump = next(m for m in unseen if b'"CHANNEL_DATA"' in m.body)
    facts = invite_facts_of(parse_dump(dump.text))
    assert facts.pbx_call_id == parked and facts.request_user == "demo"
    assert parked_channels('{"row_count": 0}\n') == []
    assert parked_channels("-ERR no reply") == [] and parked_channels("[1]") == []
    with pytest.raises(RemoteProtocolError):
        parse_dump("-ERR No such channel!\n")


def test_a_json_event_with_bytes_that_are_not_utf8_is_kept() -> None:
    event = parse_event(
        EslMessage(((("Content-Type", EVENT_JSON)),), b'{"Event-Name":"X","v":"Jo\xe9n"}')
    )
    assert event.headers["v"] == "Jo\ufffdn"
