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
from bridge.events import InviteFacts, LegAudio, LegClosed, LegDtmf
from bridge.pbx.freeswitch.backend import HEARTBEAT_VARIABLE, SUBSCRIPTION, FreeswitchBackend
from bridge.protocol import esl
from bridge.settings import FreeswitchSettings, MediaSettings
from tests.esl_peer import (
    CALL,
    ORPHAN,
    PASSWORD,
    REFUSED,
    SHUTDOWN,
    TRANSFER_FAILS,
    TRANSFER_OK,
    UNSEEN,
    EslPeer,
)
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
    # The resync after connecting is done (its last command sent) before the test speaks.
    await peer.wait_command("api show channels as json")
    yield Rig(peer, sink, adapter)
    await adapter.aclose()
    await adapter.aclose()  # a second close is harmless (Service.start's cleanup may repeat it)
    assert not [t for t in threading.enumerate() if t.name == "freeswitch-esl"]


async def offered(rig: Rig, uniqueid: str) -> InviteFacts:
    """The peer parks a captured call; the backend's offer of it."""
    rig.peer.park(uniqueid)
    await rig.sink.wait_for(lambda s: any(f.pbx_call_id == uniqueid for f in s.offers))
    return next(f for f in rig.sink.offers if f.pbx_call_id == uniqueid)


async def link_down(rig: Rig) -> None:
    """The Event Socket is lost, and stays down until the test lets the peer accept again."""
    rig.peer.refuse = True
    rig.peer.cut()
    await rig.sink.wait_for(lambda s: s.links == [True, False])


def unicast_pair(command: str) -> tuple[tuple[str, int], tuple[str, int]]:
    fields = dict(line.split(": ", 1) for line in command.splitlines()[1:])
    return (
        (fields["local-ip"], int(fields["local-port"])),
        (fields["remote-ip"], int(fields["remote-port"])),
    )


async def test_it_logs_in_stamps_the_heartbeat_at_once_and_offers_a_parked_call_once(
    rig: Rig,
) -> None:
    peer, sink = rig.peer, rig.sink
    # The heartbeat comes first, not a ping interval later: calls in between would get 480.
    await peer.wait_command("api expand global_setvar")
    assert peer.commands[:3] == [
        f"auth {PASSWORD}",
        SUBSCRIPTION,
        "api expand global_setvar sipbridge_heartbeat=${strepoch()}",
    ]
    facts = await offered(rig, CALL)
    peer.park(CALL)  # parked again (a re-park): still one call
    await rig.adapter.link.command(esl.command("api status"))  # every event before it is in
    assert [f.pbx_call_id for f in sink.offers] == [CALL]
    assert (facts.pbx, facts.channel, facts.request_user) == ("freeswitch", CALL, "demo")
    assert (facts.from_number, facts.from_name) == ("+15551230000", "John Doe")
    # JSON events carry the values as the caller sent them: plain events decoded %XX once
    # too often (100%41off became 100Aoff, %0D%0A a line break).
    assert dict(facts.headers) == {
        "X-First_Name": "John",
        "X-Pct": "100%41off",
        "X-Crlf": "a%0D%0Ab",
        "X-Account-Id": "42",
    }


async def test_accepting_answers_in_the_channel_thread_then_streams_to_our_leg(rig: Rig) -> None:
    peer, adapter = rig.peer, rig.adapter
    facts = await offered(rig, CALL)  # parked ringing, as freeswitch_conf's dialplan parks
    await adapter.connect_media(facts, "call-1")
    leg = adapter.unicast._legs[CALL]
    ours = leg._transport.get_extra_info("sockname")[1] if leg._transport else None
    # sendmsg execute answer, never api uuid_answer: unicast right after that aborted
    # FreeSWITCH live (faults/01); this order is the one faults/02 and live/ show working.
    assert peer.requests[-2:] == [
        f"sendmsg {CALL}\ncall-command: execute\nexecute-app-name: answer",
        f"sendmsg {CALL}\ncall-command: unicast\nlocal-ip: 127.0.0.1\nlocal-port: 32000\n"
        f"remote-ip: 127.0.0.1\nremote-port: {ours}\ntransport: udp",
    ]
    assert not peer.crashed
    # The caller's keys, as FreeSWITCH reports them (DTMF events), join the call's leg.
    peer.press(CALL)
    digits: list[object] = []
    while len(digits) < 3:
        digits += await asyncio.wait_for(leg.receive(), 5)
    assert digits == [LegDtmf("1"), LegDtmf("2"), LegDtmf("#")]
    # The caller hangs up: the call is gone, by the caller, at FreeSWITCH's time for it.
    peer.hang_up(CALL)
    await rig.sink.wait_for(lambda s: s.gone)
    [gone] = rig.sink.gone
    assert (gone.pbx_call_id, gone.by_caller, gone.cause) == (CALL, True, 16)
    assert gone.ended_at is not None and gone.ended_at.year == 2026
    assert (await leg.receive())[-1] == LegClosed(by_caller=True)  # and its leg ends with it
    assert len(adapter.unicast) == 0


async def test_a_refusal_is_respond_then_hangup_and_freeswitch_ends_the_channel(rig: Rig) -> None:
    peer, adapter, sink = rig.peer, rig.adapter, rig.sink
    facts = await offered(rig, REFUSED)
    await adapter.reject(facts, 404)
    assert peer.requests[-2:] == [
        f"sendmsg {REFUSED}\ncall-command: execute\nexecute-app-name: respond\n"
        "execute-app-arg: 404",
        f"sendmsg {REFUSED}\ncall-command: hangup\nhangup-cause: UNALLOCATED_NUMBER",
    ]
    await sink.wait_for(lambda s: s.gone)
    assert not sink.gone[0].by_caller  # send_refuse: FreeSWITCH ended it, on our word


async def test_a_transfer_is_done_once_freeswitch_bridged_it(rig: Rig) -> None:
    peer, adapter = rig.peer, rig.adapter
    facts = await offered(rig, TRANSFER_OK)
    await adapter.connect_media(facts, "call-1")
    await adapter.transfer(
        facts,
        {"type": "sip", "sipUri": "sip:agent@pbx.example.com", "sipHeaders": {"X-Reason": "vip"}},
    )
    assert peer.requests[-5:] == [
        f"api uuid_setvar {TRANSFER_OK} sip_h_X-Reason vip",
        f"api uuid_setvar {TRANSFER_OK} sipbridge_transfer_target sip:agent@pbx.example.com",
        f"api uuid_setvar {TRANSFER_OK} sipbridge_offer",
        f"api uuid_setvar {TRANSFER_OK} sipbridge_transfer_failed",
        f"api uuid_transfer {TRANSFER_OK} sipbridge_transfer XML sipbridge",
    ]
    # Its unicast port is free again (reused last): both ports are there for the next calls.
    assert {adapter._ports.take("next"), adapter._ports.take("other")} == {32000, 32001}


async def test_a_failed_transfer_raises_and_gives_the_call_its_audio_back(rig: Rig) -> None:
    peer, adapter = rig.peer, rig.adapter
    facts = await offered(rig, TRANSFER_FAILS)
    await adapter.connect_media(facts, "call-1")
    first = peer.requests[-1]
    with pytest.raises(PbxActionError, match="NORMAL_TEMPORARY_FAILURE"):
        await adapter.transfer(facts, {"type": "sip", "sipUri": "sip:nobody@127.0.0.1:5099"})
    # Parked again by sipbridge_context.xml, without unicast (the park ended it): the same
    # pair again, so the conversation's leg hears the caller.
    assert peer.requests[-1] == first and unicast_pair(first)[0] == ("127.0.0.1", 32000)
    assert len(adapter.unicast) == 1


async def test_number_transfers_and_hostile_destinations(rig: Rig) -> None:
    peer, adapter = rig.peer, rig.adapter
    facts = await offered(rig, TRANSFER_OK)
    # The caller's own X- headers would go out too: unset first. Quotes and backslashes
    # survive FreeSWITCH's argument splitting. A number goes to the default context: done
    # once FreeSWITCH took it (no outcome to wait for).
    await adapter.transfer(facts, {"number": "+1555", "sipHeaders": {"X-Q": "it's a\\b"}})
    assert f"api uuid_setvar {TRANSFER_OK} sip_h_X-Q it\\'s a\\\\b" in peer.requests
    unset = [c for c in peer.requests if c.startswith(f"api uuid_setvar {TRANSFER_OK} sip_h_")]
    assert f"api uuid_setvar {TRANSFER_OK} sip_h_X-First_Name" not in unset  # not in this call
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
            await adapter.transfer(facts, hostile)
    assert len(peer.requests) == sent  # refused before anything was sent


async def test_dtmf_to_the_caller_and_hangups(rig: Rig) -> None:
    peer, adapter, sink = rig.peer, rig.adapter, rig.sink
    facts = await offered(rig, TRANSFER_FAILS)
    await adapter.send_dtmf(facts, "7#")
    assert peer.requests[-1] == f"api uuid_send_dtmf {TRANSFER_FAILS} 7#"
    with pytest.raises(PbxActionError):
        await adapter.send_dtmf(facts, "7 exit")
    await adapter.hangup(facts)
    assert peer.requests[-1] == f"api uuid_kill {TRANSFER_FAILS}"
    await sink.wait_for(lambda s: s.gone)
    assert not sink.gone[0].by_caller  # send_bye: ended by FreeSWITCH, not the caller
    await adapter.hangup(facts)  # already gone ("-ERR No such channel!"): done


async def test_a_shutdown_is_freeswitch_ending_the_call_not_the_caller(rig: Rig) -> None:
    """fsctl shutdown: Hangup-Cause SYSTEM_SHUTDOWN, sip_hangup_disposition send_bye (faults/05
    recorded it as customer-ended-call)."""
    await offered(rig, SHUTDOWN)
    rig.peer.shut_down(SHUTDOWN)
    await rig.sink.wait_for(lambda s: s.gone)
    assert not rig.sink.gone[0].by_caller


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


async def test_a_call_that_ended_while_the_link_was_down_ends_when_its_audio_stopped(
    rig: Rig,
) -> None:
    """faults/: a 6 s call was recorded as 18.8 s, ended at the reconnect; and sipbridge kept
    sending audio toward the dead channel meanwhile."""
    peer, adapter, sink = rig.peer, rig.adapter, rig.sink
    facts = await offered(rig, CALL)
    await adapter.connect_media(facts, "call-1")
    freeswitch, ours = unicast_pair(peer.requests[-1])
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=freeswitch
    )
    leg = adapter.unicast._legs[CALL]
    transport.sendto(bytes(320), ours)  # FreeSWITCH's last frame, then the call ends unseen
    assert await asyncio.wait_for(leg.receive(), 5) == [LegAudio(bytes(320))]
    last_audio = adapter.unicast.last_audio_at(CALL)
    await link_down(rig)
    peer.channels.discard(CALL)  # the caller hung up while nobody listened
    sink.known = {CALL}
    leg.last_audio_monotonic -= 2.0  # FreeSWITCH has been silent for two seconds since
    assert not leg.send_audio(bytes(320))  # nothing goes toward a channel that stopped
    peer.refuse = False
    try:
        await sink.wait_for(lambda s: s.gone)
        await peer.wait_command("api show channels", count=2)  # the second connection's
        assert peer.requests[-2:] == [f"api uuid_exists {CALL}", "api show channels as json"]
        [gone] = sink.gone
        assert gone.pbx_call_id == CALL and gone.ended_at == last_audio is not None
    finally:
        transport.close()


async def test_a_refusal_lost_with_the_link_is_carried_out_after_it(rig: Rig) -> None:
    """faults/03: the 480 decided while the link was down was never sent; the caller rang on."""
    peer, adapter = rig.peer, rig.adapter
    facts = await offered(rig, REFUSED)
    await link_down(rig)
    with pytest.raises(PbxConnectionError):
        await adapter.reject(facts, 480)
    peer.refuse = False
    await peer.wait_command(f"sendmsg {REFUSED}\ncall-command: hangup")
    respond, hangup = peer.requests[-2:]
    assert respond.endswith("execute-app-name: respond\nexecute-app-arg: 480")
    assert hangup.endswith("hangup-cause: NO_ANSWER")
    assert f"api uuid_exists {REFUSED}" in peer.requests  # only if the caller is still there


async def test_a_hangup_lost_with_the_link_is_sent_after_it(rig: Rig) -> None:
    peer, adapter, sink = rig.peer, rig.adapter, rig.sink
    facts = await offered(rig, ORPHAN)
    await link_down(rig)
    with pytest.raises(PbxConnectionError):
        await adapter.hangup(facts)
    peer.refuse = False
    await sink.wait_for(lambda s: s.links == [True, False, True])
    await peer.wait_command(f"api uuid_kill {ORPHAN}")  # the resync carried it out
    await sink.wait_for(lambda s: s.gone)
    assert [g.pbx_call_id for g in sink.gone] == [ORPHAN]


async def test_a_call_parked_while_the_link_was_down_is_offered_after_it(rig: Rig) -> None:
    """Its CHANNEL_PARK was never seen: it would ring until the caller gave up."""
    peer, sink = rig.peer, rig.sink
    await link_down(rig)
    peer.hold(UNSEEN)
    peer.parked_unseen = True
    peer.refuse = False
    await sink.wait_for(lambda s: s.offers)
    [facts] = sink.offers
    assert (facts.pbx_call_id, facts.request_user, facts.from_name) == (UNSEEN, "demo", "John Doe")
    assert peer.requests[-2:] == ["api show channels as json", f"api uuid_dump {UNSEEN} json"]


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
    text = (conf / "sipbridge_context.xml").read_text()
    assert "${sipbridge_transfer_target}" in text
    # A failed bridge parks the call again, marked: the backend reads these variables.
    assert "sipbridge_transfer_failed=true" in text and "continue_on_fail=true" in text
    assert "sipbridge_transfer_cause=${originate_disposition}" in text
