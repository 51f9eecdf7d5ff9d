"""The Asterisk backend against a loopback AMI peer replaying Asterisk 22's captured messages.

The end-to-end behaviour with real Asterisk is in tests/asterisk/test_asterisk_calls.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from bridge.callflow import CallFlow
from bridge.errors import PbxActionError, PbxAuthError, PbxConnectionError
from bridge.events import LinkChanged, OutboundDial, PbxEvent, PbxKind, invite_facts
from bridge.pbx.asterisk.backend import FIRST_RETRY_DELAY_S, AsteriskBackend
from bridge.settings import AsteriskSettings, MediaSettings
from bridge.store import ListQuery
from tests.ami_peer import HANGUP_EVENT, OFFER_EVENT, AmiPeer, render
from tests.flow_harness import Harness
from tests.pbx_sink import RecordingSink


def settings(peer: AmiPeer, **values: Any) -> AsteriskSettings:
    base: dict[str, Any] = {
        "enabled": True,
        "port": peer.port,
        "secret": peer.secret,
        "ping_interval_s": 0.3,
        "action_timeout_s": 0.5,
        "reconnect_max_delay_s": 0.2,
    }
    base.update(values)
    return AsteriskSettings(**base)


def media(advertise: str = "127.0.0.1:9092") -> MediaSettings:
    """A free AudioSocket port, advertised to Asterisk as ``advertise``."""
    return MediaSettings(audiosocket_port=0, audiosocket_advertise=advertise)


@pytest.fixture
async def peer() -> AsyncIterator[AmiPeer]:
    server = AmiPeer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def adapter(peer: AmiPeer) -> AsyncIterator[tuple[AsteriskBackend, RecordingSink]]:
    sink = RecordingSink()
    running = AsteriskBackend(settings(peer), media("127.0.0.1:9092"))
    await running.start(sink)
    yield running, sink
    await running.aclose()


FACTS = invite_facts(
    pbx="asterisk",
    pbx_call_id="1795455093.1",
    channel="PJSIP/anonymous-00000001",
    request_user="alice",
    request_host="x",
)


async def test_offer_events_become_invite_facts(
    peer: AmiPeer, adapter: tuple[AsteriskBackend, RecordingSink]
) -> None:
    _, sink = adapter
    await peer.send(render(OFFER_EVENT))
    await sink.wait_for(lambda s: s.offers)
    facts = sink.offers[0]
    assert facts.request_user == "al(i)ce" and facts.from_name == "José Müller, Jr."
    assert dict(facts.headers)["X-Note"] == "hello, world"
    await peer.send(render(HANGUP_EVENT))
    await sink.wait_for(lambda s: s.hangups)
    assert sink.hangups == [("1795455892.1", 1)]


@pytest.mark.parametrize("may_filter", [True, False])
async def test_the_session_asks_only_for_the_events_it_uses(
    peer: AmiPeer, caplog: pytest.LogCaptureFixture, may_filter: bool
) -> None:
    """[performance] AMI floods: the login's event classes, then a session filter per event
    used, on every connect; a user without "system" write is told once, and works the same."""
    caplog.set_level(logging.INFO, logger="bridge.pbx.asterisk.backend")
    peer.may_filter = may_filter
    sink = RecordingSink()
    adapter = AsteriskBackend(settings(peer), media())
    await adapter.start(sink)
    try:
        await peer.wait_for(lambda p: len(p.actions_named("setvar")) >= 1)
        peer.drop_all()
        await peer.wait_for(lambda p: p.logins == 2 and len(p.actions_named("setvar")) >= 3)
        logins = peer.actions_named("login")
        assert [login["Events"] for login in logins] == ["call,user", "call,user"]
        criteria = [f["MatchCriteria"] for f in peer.actions_named("filter")]
        wanted = ["action(include),name(UserEvent)", "action(include),name(Hangup)"]
        # Refused, the first says so for all: no second try on that session.
        assert criteria == 2 * (wanted if may_filter else wanted[:1])
        # The filters go before the heartbeat, the first action that matters, on each session.
        names = [a["Action"].lower() for a in peer.actions]
        assert names.index("filter") < names.index("setvar")
        said = caplog.text.count("AMI event filters not set")
        assert said == (0 if may_filter else 1)
        await peer.send(render(OFFER_EVENT))
        await sink.wait_for(lambda s: s.offers)
    finally:
        await adapter.aclose()


async def test_a_refused_login_is_an_error_not_a_retry_loop(peer: AmiPeer) -> None:
    """panoramisk resolves a refused login quietly and retries the same secret forever."""
    sink = RecordingSink()
    adapter = AsteriskBackend(settings(peer, secret="wrong"), media("x:1"))
    with pytest.raises(PbxAuthError, match="Authentication failed"):
        await adapter.start(sink)
    assert peer.logins == 1
    assert adapter._supervisor is None  # nothing left running that could try again
    await adapter.aclose()


async def test_unreachable_asterisk_is_retried_in_the_background() -> None:
    server = AmiPeer()
    await server.start()
    port = server.port
    await server.stop()  # nothing listens on the port for now
    sink = RecordingSink()
    adapter = AsteriskBackend(settings(server, port=port), media("x:1"))
    await adapter.start(sink)
    assert not adapter.link.up
    revived = AmiPeer(port=port)
    await revived.start()
    try:
        await sink.wait_for(lambda s: True in s.links)
        assert revived.logins == 1
    finally:
        await adapter.aclose()
        await revived.stop()


async def test_watchdog_notices_a_silent_link_and_reconnects(
    peer: AmiPeer, adapter: tuple[AsteriskBackend, RecordingSink]
) -> None:
    """panoramisk's pings are fire-and-forget: a half-open connection was never noticed."""
    _, sink = adapter
    interval = 0.3  # settings() above
    await peer.wait_for(lambda p: len(p.actions_named("setvar")) >= 2)  # heartbeats flow
    silent_since = time.monotonic()
    peer.silent = True
    await sink.wait_for(lambda s: False in s.links, timeout=5 * interval)
    noticed_s = sink.link_times[sink.links.index(False)] - silent_since
    # At most one interval until the next heartbeat, one more for its answer; never sooner
    # than one interval (a heartbeat is given its whole interval to be answered).
    assert interval - 0.05 <= noticed_s <= 2 * interval + 0.2, noticed_s
    peer.silent = False
    await sink.wait_for(lambda s: s.links.count(True) >= 1 and s.links[-1] is True)
    assert peer.logins == 2


async def test_reconnect_backoff_grows_until_a_link_stays_up(peer: AmiPeer) -> None:
    """An Asterisk that accepts the login and drops the link must not get a login every 0.5 s."""
    peer.drop_after_login = True
    now = 0.0
    delays: list[float] = []
    slept = asyncio.Event()

    async def sleep(seconds: float) -> None:
        nonlocal now
        delays.append(seconds)
        now += seconds
        if len(delays) == 6:
            peer.drop_after_login = False  # the next link stays up
        slept.set()
        await asyncio.sleep(0)

    async def sleeps(count: int) -> None:
        async with asyncio.timeout(5):
            while len(delays) < count:
                slept.clear()
                await slept.wait()

    sink = RecordingSink()
    adapter = AsteriskBackend(
        settings(peer, reconnect_max_delay_s=4.0),
        media("x:1"),
        clock=lambda: now,
        sleep=sleep,
    )
    await adapter.start(sink)
    try:
        await sleeps(6)
        base = [FIRST_RETRY_DELAY_S, 1.0, 2.0, 4.0, 4.0, 4.0]
        assert all(0.8 * b <= d <= 1.2 * b for b, d in zip(base, delays, strict=True)), delays
        await sink.wait_for(lambda s: s.links[-1] is True and adapter.link.up)
        now += adapter.stable_after_s + 0.1  # this link stayed up long enough
        peer.drop_all()
        await sleeps(7)
        assert 0.8 * FIRST_RETRY_DELAY_S <= delays[6] <= 1.2 * FIRST_RETRY_DELAY_S, delays
    finally:
        await adapter.aclose()


async def test_pending_actions_fail_when_the_link_drops_and_are_never_resent(
    peer: AmiPeer, adapter: tuple[AsteriskBackend, RecordingSink]
) -> None:
    """panoramisk re-sends unanswered actions after reconnecting: a Redirect could run twice."""
    running, sink = adapter
    peer.unanswered = {"redirect"}
    pending = asyncio.ensure_future(
        running.link.action(
            {
                "Action": "Redirect",
                "Channel": "PJSIP/a-1",
                "Context": "c",
                "Exten": "s",
                "Priority": "1",
            },
            limit_s=5,
        )
    )
    await peer.wait_for(lambda p: bool(p.actions_named("redirect")))
    peer.drop_all()
    with pytest.raises(PbxConnectionError):
        await pending
    peer.unanswered = set()
    await sink.wait_for(lambda s: bool(s.links) and s.links[-1] is True and peer.logins == 2)
    await peer.wait_for(lambda p: len(p.actions_named("coreshowchannels")) == 2)
    assert len(peer.actions_named("redirect")) == 1


async def test_every_action_has_a_timeout(
    peer: AmiPeer, adapter: tuple[AsteriskBackend, RecordingSink]
) -> None:
    running, _ = adapter
    peer.unanswered = {"pjsiphangup"}
    with pytest.raises(PbxActionError, match="no answer within 0.5 s"):
        await running.reject(FACTS, 404)


async def test_actions_fail_fast_while_the_link_is_down(
    peer: AmiPeer, adapter: tuple[AsteriskBackend, RecordingSink]
) -> None:
    running, sink = adapter
    await peer.stop()
    await sink.wait_for(lambda s: False in s.links)
    with pytest.raises(PbxConnectionError):
        await running.hangup(FACTS)


async def test_resync_after_connecting(peer: AmiPeer) -> None:
    peer.channels = [
        {
            "Channel": "PJSIP/waiting-1",
            "Uniqueid": "10.1",
            "Context": "sipbridge-offer",
            "Application": "Wait",
        },
        {
            "Channel": "PJSIP/orphan-2",
            "Uniqueid": "10.2",
            "Context": "sipbridge-media",
            "Application": "AudioSocket",
        },
        {
            "Channel": "PJSIP/known-3",
            "Uniqueid": "10.3",
            "Context": "sipbridge-media",
            "Application": "AudioSocket",
        },
        {
            "Channel": "PJSIP/other-4",
            "Uniqueid": "10.4",
            "Context": "from-internal",
            "Application": "Dial",
        },
        {  # between its UserEvent and Wait() when AMI came back
            "Channel": "PJSIP/ringing-5",
            "Uniqueid": "10.5",
            "Context": "sipbridge-offer",
            "Application": "Ringing",
        },
    ]
    sink = RecordingSink(known={"10.3", "10.9"})
    adapter = AsteriskBackend(settings(peer), media("x:1"))
    await adapter.start(sink)
    try:
        assert sink.hangups == [("10.9", 0)]  # ended while AMI was away
        redirects = peer.actions_named("redirect")
        assert [(a["Channel"], a["Context"]) for a in redirects] == [
            ("PJSIP/waiting-1", "sipbridge-offer"),
            ("PJSIP/ringing-5", "sipbridge-offer"),
        ]
        hangups = peer.actions_named("hangup")
        assert [a["Channel"] for a in hangups] == ["PJSIP/orphan-2"]
    finally:
        await adapter.aclose()


async def test_call_control_actions(
    peer: AmiPeer, adapter: tuple[AsteriskBackend, RecordingSink]
) -> None:
    running, _ = adapter
    peer.channels = [
        {
            "Channel": FACTS.channel,
            "Uniqueid": FACTS.pbx_call_id,
            "Context": "sipbridge-offer",
            "Application": "Wait",
        }
    ]
    await running.reject(FACTS, 603)
    assert peer.actions_named("pjsiphangup")[-1]["Cause"] == "603"
    await running.connect_media(FACTS, "c0ffee00-0000-4000-8000-000000000000")
    variables = {a["Variable"]: a["Value"] for a in peer.actions_named("setvar") if "Channel" in a}
    assert variables["SIPBRIDGE_CALL_ID"] == "c0ffee00-0000-4000-8000-000000000000"
    assert variables["SIPBRIDGE_AUDIOSOCKET"] == "127.0.0.1:9092"
    assert peer.actions_named("redirect")[-1]["Context"] == "sipbridge-media"
    await running.transfer(
        FACTS,
        {"type": "sip", "sipUri": "sip:agent@pbx.example.com", "sipHeaders": {"X-Account": "gold"}},
    )
    assert peer.actions_named("redirect")[-1]["Context"] == "sipbridge-transfer"
    # Asterisk answers "DTMF successfully queued", which panoramisk once took for the start of
    # an event list (and dropped the link over).
    await running.send_dtmf(FACTS, "12")
    assert [a["Digit"] for a in peer.actions_named("playdtmf")] == ["1", "2"]
    assert running.link.up
    peer.channels = []
    with pytest.raises(PbxActionError, match="Channel not found"):
        await running.send_dtmf(FACTS, "3")
    await running.hangup(FACTS)  # the channel is already gone: that is what hangup wanted
    with pytest.raises(PbxActionError, match="No such channel"):
        await running.connect_media(FACTS, "c0ffee00-0000-4000-8000-000000000000")


CALL_ID = "c0ffee00-0000-4000-8000-000000000000"


@pytest.mark.parametrize(("context", "redirects"), [("sipbridge-media", 1), ("sipbridge-offer", 2)])
async def test_a_media_connect_cut_off_by_the_link_is_finished_once_it_is_back(
    peer: AmiPeer, adapter: tuple[AsteriskBackend, RecordingSink], context: str, redirects: int
) -> None:
    """The link dies as the Redirect goes out: its answer is lost, the outcome unknown. Once
    AMI is back the channel's place decides: in the media context Asterisk answered the
    caller and the leg is coming (ending the call would hang up a caller Asterisk answered);
    still in the offer context Asterisk never got it, and it is sent again."""
    running, sink = adapter
    sink.known = {FACTS.pbx_call_id}  # the flow's call, waiting for its media
    peer.channels = [_channel(FACTS.channel, FACTS.pbx_call_id, context, "Wait")]
    peer.drop_on = {"redirect"}
    await running.connect_media(FACTS, CALL_ID)
    assert peer.logins == 2 and sink.links == [True, False, True]
    sent = [(a["Channel"], a["Context"]) for a in peer.actions_named("redirect")]
    assert sent == [(FACTS.channel, "sipbridge-media")] * redirects
    calls = [
        a["Value"] for a in peer.actions_named("setvar") if a["Variable"] == "SIPBRIDGE_CALL_ID"
    ]
    assert calls == [CALL_ID] * redirects


async def test_a_media_connect_cut_off_fails_if_the_channel_is_gone_after(
    peer: AmiPeer, adapter: tuple[AsteriskBackend, RecordingSink]
) -> None:
    running, sink = adapter
    sink.known = {FACTS.pbx_call_id}
    peer.drop_on = {"setvar"}  # the first Setvar; then the caller is gone
    with pytest.raises(PbxActionError, match="is gone"):
        await running.connect_media(FACTS, CALL_ID)
    assert peer.actions_named("redirect") == []


async def test_a_media_connect_cut_off_is_dropped_if_the_call_was_ended_meanwhile(
    peer: AmiPeer, adapter: tuple[AsteriskBackend, RecordingSink]
) -> None:
    """The flow gave up on the call (its media timer) while AMI was down: its hangup is what
    the resync carries out, not a late connect."""
    running, sink = adapter
    sink.known = {FACTS.pbx_call_id}
    peer.channels = [_channel(FACTS.channel, FACTS.pbx_call_id, "sipbridge-offer", "Wait")]
    peer.drop_on = {"redirect"}
    connecting = asyncio.ensure_future(running.connect_media(FACTS, CALL_ID))
    await sink.wait_for(lambda s: False in s.links)
    with pytest.raises(PbxConnectionError):
        await running.hangup(FACTS)
    sink.known = set()
    with pytest.raises(PbxActionError, match="ended while AMI was down"):
        await connecting
    assert len(peer.actions_named("redirect")) == 1


async def test_a_busy_asterisk_is_not_dropped_for_a_late_heartbeat(
    peer: AmiPeer, adapter: tuple[AsteriskBackend, RecordingSink], caplog: pytest.LogCaptureFixture
) -> None:
    """Asterisk answers a session's actions in order: with many calls being set up, the
    heartbeat waits behind their actions while events and answers keep coming. That link is
    alive; only one that says nothing at all for a heartbeat's limit is dropped."""
    _, sink = adapter
    peer.unanswered = {"setvar"}  # the heartbeats get no answer from now on ...

    def heartbeats(count: int) -> Callable[[AmiPeer], bool]:
        return lambda p: len(p.actions_named("setvar")) >= count

    beats = len(peer.actions_named("setvar"))
    for beat in range(1, 4):
        await peer.wait_for(heartbeats(beats + beat))
        await peer.send(render(HANGUP_EVENT))  # ... but Asterisk is plainly talking
    await peer.wait_for(heartbeats(beats + 4))
    assert sink.links == [True]
    assert "but Asterisk is sending; keeping it" in caplog.text
    # Silence from here: the next unanswered heartbeat drops the link.
    await sink.wait_for(lambda s: False in s.links, timeout=3)
    assert sink.links[:2] == [True, False]


def _channel(channel: str, uniqueid: str, context: str, application: str) -> dict[str, str]:
    return {
        "Channel": channel,
        "Uniqueid": uniqueid,
        "Context": context,
        "Application": application,
    }


def _offer(channel: str, uniqueid: str) -> bytes:
    return render(OFFER_EVENT, Channel=channel, Uniqueid=uniqueid, Linkedid=uniqueid)


async def test_a_decided_channel_is_finished_not_announced_again_after_reconnecting(
    peer: AmiPeer,
) -> None:
    """A reject or hangup lost with the link is carried out by the resync; never a re-offer."""
    sink = RecordingSink()
    adapter = AsteriskBackend(settings(peer), media("x:1"))
    await adapter.start(sink)  # its first resync has run: these channels came afterwards
    peer.channels = [
        _channel("PJSIP/rejected-1", "20.1", "sipbridge-offer", "Wait"),
        _channel("PJSIP/failed-2", "20.2", "sipbridge-media", "AudioSocket"),
        _channel("PJSIP/forgotten-3", "20.3", "sipbridge-offer", "Wait"),
        _channel("PJSIP/unseen-4", "20.4", "sipbridge-offer", "Wait"),
    ]
    try:
        for row in peer.channels[:3]:
            await peer.send(_offer(row["Channel"], row["Uniqueid"]))
        await sink.wait_for(lambda s: len(s.offers) == 3)
        rejected, failed, _ = sink.offers
        # The flow ended all three (sink.known stays empty); AMI dies as the reject goes out,
        # so the hangup after a failed media connect cannot be sent either.
        peer.drop_on = {"pjsiphangup"}
        with pytest.raises(PbxConnectionError):
            await adapter.reject(rejected, 603)
        with pytest.raises(PbxConnectionError):
            await adapter.hangup(failed)
        await sink.wait_for(lambda s: s.links[-1] is True and peer.logins == 2)
        await peer.wait_for(lambda p: bool(p.actions_named("redirect")))  # the resync's last

        assert [(a["Channel"], a["Cause"]) for a in peer.actions_named("pjsiphangup")] == [
            ("PJSIP/rejected-1", "603"),  # the one the link died on
            ("PJSIP/rejected-1", "603"),  # the decided status, sent again
            ("PJSIP/forgotten-3", "480"),  # ended without a decision: as the dialplan would
        ]
        assert [a["Channel"] for a in peer.actions_named("hangup")] == ["PJSIP/failed-2"]
        # Only the channel sipbridge never saw is announced again.
        assert [a["Channel"] for a in peer.actions_named("redirect")] == ["PJSIP/unseen-4"]

        # An announcement racing the resync is not a second offer; the unseen one is offered.
        await peer.send(_offer("PJSIP/rejected-1", "20.1"))
        await peer.send(_offer("PJSIP/unseen-4", "20.4"))
        await peer.send(render(HANGUP_EVENT, Uniqueid="20.1", Channel="PJSIP/rejected-1"))
        await sink.wait_for(lambda s: s.hangups)
        assert [f.pbx_call_id for f in sink.offers] == ["20.1", "20.2", "20.3", "20.4"]
    finally:
        await adapter.aclose()


@dataclass
class FlowEvents:
    """The backend's events into a real call flow, as the service wires them."""

    flow: CallFlow
    links: list[bool] = field(default_factory=list)

    def post(self, event: PbxEvent) -> None:
        if isinstance(event, LinkChanged):
            self.links.append(event.up)
        else:
            self.flow.post(event)

    def live_calls(self, pbx: PbxKind) -> set[str]:
        return self.flow.live_calls(pbx)


async def test_a_reject_lost_with_the_link_leaves_one_call_record(
    peer: AmiPeer, make_harness: Callable[..., Any]
) -> None:
    h: Harness = await make_harness()
    events = FlowEvents(h.flow)
    adapter = AsteriskBackend(settings(peer), media("x:1"))
    h.flow.register(adapter)
    await adapter.start(events)
    peer.channels = [_channel("PJSIP/anonymous-00000001", "30.1", "sipbridge-offer", "Wait")]
    peer.drop_on = {"pjsiphangup"}  # AMI dies as the 404 goes out
    try:
        await peer.send(_offer("PJSIP/anonymous-00000001", "30.1"))  # nobody's number
        report = (await h.sink.wait_for_message("end-of-call-report")).message
        assert report["endedReason"] == "call.start.error-get-phone-number"
        await peer.wait_for(lambda p: len(p.actions_named("pjsiphangup")) == 2)
        assert peer.logins == 2 and events.links == [True, False, True]
        assert [a["Cause"] for a in peer.actions_named("pjsiphangup")] == ["404", "404"]
        assert peer.actions_named("redirect") == []
        assert h.flow.active() == []
        assert await h.recorder.flush()
        calls = await h.store.list_calls(ListQuery())
        assert [c["id"] for c in calls] == [report["call"]["id"]]
        assert len(h.sink.messages("end-of-call-report")) == 1
    finally:
        await adapter.aclose()


def test_a_dial_asterisk_could_not_carry_out_is_known_before_the_call_is_placed() -> None:
    """A customer URI Dial() cannot take, or X- headers longer than one AMI line (1024 bytes,
    or Asterisk refuses the Originate), are refused up front (POST /call says 400)."""
    backend = AsteriskBackend(AsteriskSettings(), media())
    dial = OutboundDial(
        customer={"type": "sip", "sipUri": "sip:bob@example.org"},
        caller_id="+15550100",
        caller_name="Acme",
        headers=(("X-Campaign", "spring"),),
        ring_timeout_s=60,
    )
    assert backend.check_dial(dial) is None
    odd = OutboundDial({"type": "sip", "sipUri": "sip:bob@h,PJSIP/x"}, "100", "", (), 60)
    assert "Dial() cannot take" in (backend.check_dial(odd) or "")
    long = OutboundDial(dial.customer, "100", "", (("X-Notes", "ü" * 300),), 60)
    assert "at most 1024 per line" in (backend.check_dial(long) or "")
