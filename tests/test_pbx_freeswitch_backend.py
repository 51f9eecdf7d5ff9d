"""The FreeSWITCH backend (greenswitch in its own thread, unicast sockets) against the
capture-built Event Socket peer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from bridge.errors import PbxActionError, PbxAuthError, PbxConnectionError
from bridge.events import LegClosed, LegDtmf
from bridge.pbx.freeswitch.backend import HEARTBEAT_VARIABLE, SUBSCRIPTION, FreeswitchBackend
from bridge.protocol import esl
from bridge.settings import FreeswitchSettings, MediaSettings
from tests.esl_peer import CALL_ANSWERED, CALL_RINGING, PASSWORD, EslPeer
from tests.pbx_sink import RecordingSink

INTERVAL_S = 0.3


def settings(port: int, **values: Any) -> FreeswitchSettings:
    base: dict[str, Any] = {
        "enabled": True,
        "port": port,
        "password": PASSWORD,
        "ping_interval_s": INTERVAL_S,
        "action_timeout_s": 1.0,
        "reconnect_max_delay_s": 0.5,
        "unicast_port_min": 32000,
        "unicast_port_max": 32001,
    }
    base.update(values)
    return FreeswitchSettings(**base)


MEDIA = MediaSettings(unicast_host="127.0.0.1")


@dataclass
class Rig:
    peer: EslPeer
    sink: RecordingSink
    adapter: FreeswitchBackend


@pytest.fixture
async def peer() -> AsyncIterator[EslPeer]:
    running = EslPeer()
    await running.start()
    yield running
    await running.stop()


@pytest.fixture
async def rig(peer: EslPeer, request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    """An adapter connected to the peer; ``indirect`` parameters are settings."""
    sink = RecordingSink()
    adapter = FreeswitchBackend(settings(peer.port, **getattr(request, "param", {})), MEDIA)
    await adapter.start(sink)
    await sink.wait_for(lambda s: s.links == [True])
    yield Rig(peer, sink, adapter)
    await adapter.aclose()
    await adapter.aclose()  # a second close is harmless (Service.start's cleanup may repeat it)
    assert not [t for t in threading.enumerate() if t.name == "freeswitch-esl"]


async def test_it_logs_in_subscribes_and_offers_a_parked_call_once(rig: Rig) -> None:
    peer, sink = rig.peer, rig.sink
    assert peer.commands[:2] == [f"auth {PASSWORD}", SUBSCRIPTION]
    # A call parked by another part of the dialplan (no sipbridge variable) is not ours.
    peer.send(peer.captured.event("CHANNEL_PARK", CALL_RINGING))
    peer.park(CALL_RINGING)
    peer.park(CALL_RINGING)  # parked again (a re-park after a transfer): still one call
    await sink.wait_for(lambda s: len(s.offers) >= 1)
    await rig.adapter.link.command(esl.command("api status"))  # every event before it is in
    assert len(sink.offers) == 1
    facts = sink.offers[0]
    assert (facts.pbx, facts.pbx_call_id, facts.channel) == (
        "freeswitch",
        CALL_RINGING,
        CALL_RINGING,
    )
    assert (facts.request_user, facts.from_name) == ("ringing", "Ann Example")
    assert facts.headers == (("X-First_Name", "John"), ("X-Account-Id", "42"), ("X-Lang", "en-US"))


async def test_accepting_answers_in_the_channel_thread_then_streams_to_our_leg(rig: Rig) -> None:
    peer, adapter = rig.peer, rig.adapter
    peer.park(CALL_RINGING)  # parked ringing, as freeswitch_conf's dialplan parks an offer
    await rig.sink.wait_for(lambda s: s.offers)
    await adapter.connect_media(rig.sink.offers[0], "call-1")
    leg = adapter.unicast._legs[CALL_RINGING]
    ours = leg._transport.get_extra_info("sockname")[1] if leg._transport else None
    # sendmsg execute answer, never api uuid_answer: unicast right after that aborted
    # FreeSWITCH live (faults/01); this order is the one faults/02 shows working.
    assert peer.requests[-2:] == [
        f"sendmsg {CALL_RINGING}\ncall-command: execute\nexecute-app-name: answer",
        f"sendmsg {CALL_RINGING}\ncall-command: unicast\nlocal-ip: 127.0.0.1\nlocal-port: 32000\n"
        f"remote-ip: 127.0.0.1\nremote-port: {ours}\ntransport: udp",
    ]
    assert not peer.crashed
    # The caller hangs up: the captured hangup events end the call, with its Q.850 cause.
    peer.hang_up(CALL_RINGING)
    await rig.sink.wait_for(lambda s: s.hangups)
    assert rig.sink.hangups == [(CALL_RINGING, 16)]
    assert (await leg.receive())[-1] == LegClosed(by_caller=True)  # and its leg ends with it
    assert len(adapter.unicast) == 0


async def test_reject_transfer_hangup_and_dtmf(rig: Rig) -> None:
    peer, adapter, sink = rig.peer, rig.adapter, rig.sink
    peer.park(CALL_RINGING)
    peer.park(CALL_ANSWERED)
    await sink.wait_for(lambda s: len(s.offers) == 2)
    ringing, answered = sink.offers
    await adapter.reject(ringing, 404)
    assert peer.requests[-2:] == [
        f"sendmsg {CALL_RINGING}\ncall-command: execute\nexecute-app-name: respond\nexecute-app-arg: 404",
        f"sendmsg {CALL_RINGING}\ncall-command: hangup\nhangup-cause: UNALLOCATED_NUMBER",
    ]
    # The caller's keys, as FreeSWITCH reports them (DTMF events), join the call's leg.
    await adapter.connect_media(answered, "call-2")
    leg = adapter.unicast._legs[CALL_ANSWERED]
    peer.send(*peer.captured.dtmf_events(CALL_ANSWERED))
    digits: list[object] = []
    while len(digits) < 3:
        digits += await asyncio.wait_for(leg.receive(), 5)
    assert digits == [LegDtmf("1"), LegDtmf("2"), LegDtmf("#")]
    await adapter.transfer(
        answered,
        {"type": "sip", "sipUri": "sip:agent@pbx.example.com", "sipHeaders": {"X-Reason": "vip"}},
    )
    assert peer.requests[-7:] == [
        # The caller's own X- headers would go out too: unset first.
        f"api uuid_setvar {CALL_ANSWERED} sip_h_X-First_Name",
        f"api uuid_setvar {CALL_ANSWERED} sip_h_X-Account-Id",
        f"api uuid_setvar {CALL_ANSWERED} sip_h_X-Lang",
        f"api uuid_setvar {CALL_ANSWERED} sip_h_X-Reason vip",
        f"api uuid_setvar {CALL_ANSWERED} sipbridge_transfer_target sip:agent@pbx.example.com",
        f"api uuid_setvar {CALL_ANSWERED} sipbridge_offer",
        f"api uuid_transfer {CALL_ANSWERED} sipbridge_transfer XML sipbridge",
    ]
    assert not peer.crashed
    # Quotes and backslashes survive FreeSWITCH's argument splitting.
    await adapter.transfer(answered, {"number": "+1555", "sipHeaders": {"X-Q": "it's a\\b"}})
    assert f"api uuid_setvar {CALL_ANSWERED} sip_h_X-Q it\\'s a\\\\b" in peer.requests
    sent = len(peer.requests)
    for hostile in (
        {"number": "1,2"},
        {"sipUri": "sip:a@b x"},
        {"sipUri": "sip:a@b:_:sofia/gateway/carrier/1900"},  # a second, enterprise-originate leg
        {"sipUri": "sip:x@loopback/9999/default"},  # another endpoint
        {"number": "+1555", "sipHeaders": {"Via": "x"}},
        {"number": "+1555", "sipHeaders": {"X-A": "1\nexit"}},
    ):
        with pytest.raises(PbxActionError):
            await adapter.transfer(answered, hostile)
    assert len(peer.requests) == sent  # refused before anything was sent
    await adapter.send_dtmf(answered, "7#")
    assert peer.requests[-1] == f"api uuid_send_dtmf {CALL_ANSWERED} 7#"
    with pytest.raises(PbxActionError):
        await adapter.send_dtmf(answered, "7 exit")
    await adapter.hangup(answered)
    assert peer.requests[-1] == f"api uuid_kill {CALL_ANSWERED}"
    await sink.wait_for(lambda s: s.hangups)
    assert sink.hangups == [(CALL_ANSWERED, 16)]
    await adapter.hangup(answered)  # already gone ("-ERR No such channel!"): done


async def test_a_refused_password_is_an_error_not_a_retry_loop(peer: EslPeer) -> None:
    adapter = FreeswitchBackend(settings(peer.port, password="wrong"), MEDIA)
    with pytest.raises(PbxAuthError, match="refused the event socket password"):
        await adapter.start(RecordingSink())
    assert peer.connections == 1 and peer.commands == ["auth wrong"]
    assert not [t for t in threading.enumerate() if t.name == "freeswitch-esl"]


async def test_freeswitch_down_at_start_is_retried_until_it_is_up(peer: EslPeer) -> None:
    peer.refuse = True
    sink = RecordingSink()
    adapter = FreeswitchBackend(settings(peer.port), MEDIA)
    await adapter.start(sink)  # not an error: FreeSWITCH may start after sipbridge
    assert sink.links == []
    peer.refuse = False
    await sink.wait_for(lambda s: s.links == [True])
    await adapter.aclose()


async def test_the_watchdog_ping_is_the_dialplans_heartbeat(rig: Rig) -> None:
    # FreeSWITCH stamps it with its own clock (expand ... ${strepoch()}): no skew to matter.
    command = await rig.peer.wait_command("api expand global_setvar")
    assert command == "api expand global_setvar sipbridge_heartbeat=${strepoch()}"
    assert rig.peer.globals["sipbridge_heartbeat"] == "${strepoch()}"


@pytest.mark.parametrize("rig", [{"ping_interval_s": 0.5}], indirect=True)
async def test_a_silent_link_is_dropped_within_two_intervals_and_comes_back(rig: Rig) -> None:
    peer, sink = rig.peer, rig.sink
    interval = rig.adapter.settings.ping_interval_s
    peer.silent = True
    silent_since = time.monotonic()
    await sink.wait_for(lambda s: s.links == [True, False], timeout=5 * interval)
    noticed_s = time.monotonic() - silent_since
    assert noticed_s <= 2 * interval + 0.4, noticed_s  # three intervals would be a regression
    with pytest.raises(PbxConnectionError):
        await rig.adapter.link.command(esl.command("api status"))
    peer.silent = False
    await sink.wait_for(lambda s: s.links == [True, False, True])
    assert peer.connections == 2
    second_login = len(peer.commands) - peer.commands[::-1].index(f"auth {PASSWORD}") - 1
    assert peer.commands[second_login + 1] == SUBSCRIPTION


# A long ping interval: here the drop itself must be noticed, not the watchdog's silence.
async def test_calls_that_ended_while_the_link_was_down_are_ended_after_it(rig: Rig) -> None:
    peer, sink = rig.peer, rig.sink
    sink.known = {CALL_RINGING, "00000000-0000-0000-0000-000000000000"}
    peer.cut()
    await sink.wait_for(lambda s: s.links == [True, False, True])
    await peer.wait_command(f"api uuid_dump {CALL_RINGING}")
    await rig.adapter.link.command(esl.command("api status"))  # the dump's answer is in
    await sink.wait_for(lambda s: s.hangups)
    assert sink.hangups == [("00000000-0000-0000-0000-000000000000", 0)]


async def test_a_hangup_lost_with_the_link_is_sent_after_it(rig: Rig) -> None:
    peer, adapter, sink = rig.peer, rig.adapter, rig.sink
    peer.park(CALL_ANSWERED)
    await sink.wait_for(lambda s: s.offers)
    peer.refuse = True
    peer.cut()
    await sink.wait_for(lambda s: s.links == [True, False])
    with pytest.raises(PbxConnectionError):
        await adapter.hangup(sink.offers[0])
    peer.refuse = False
    await sink.wait_for(lambda s: s.links == [True, False, True])
    await peer.wait_command(f"api uuid_kill {CALL_ANSWERED}")  # the resync carried it out
    await sink.wait_for(lambda s: s.hangups)
    assert sink.hangups == [(CALL_ANSWERED, 16)]


def test_the_shipped_dialplan_speaks_the_adapters_names() -> None:
    """freeswitch_conf/ and the adapter must agree on every name they share."""
    from pathlib import Path
    from xml.etree import ElementTree

    conf = Path(__file__).parent.parent / "freeswitch_conf"
    defaults = FreeswitchSettings()
    offer = ElementTree.parse(conf / "sipbridge.xml").getroot()
    condition = offer.find("extension/condition")
    assert condition is not None
    assert f"${{{HEARTBEAT_VARIABLE}}}" in condition.get("field", "")
    actions = [(a.get("application"), a.get("data")) for a in condition.findall("action")]
    assert actions == [
        ("set", "absolute_codec_string=PCMU,PCMA"),  # unicast is at the codec's rate: 8 kHz
        ("set", f"{defaults.offer_variable}=true"),
        ("ring_ready", None),
        ("park", None),
    ]
    context = ElementTree.parse(conf / "sipbridge_context.xml").getroot().find("context")
    assert context is not None and context.get("name") == defaults.transfer_context
    for extension in context.findall("extension"):
        first = extension.find("condition")
        assert first is not None and first.get("expression") == "^sipbridge_transfer$"
    assert "${sipbridge_transfer_target}" in (conf / "sipbridge_context.xml").read_text()
