"""End to end through real Asterisk 22 with SIPp callers sending real RTP ([asterisk] issue).

Audio is checked by content: the share of each 1 s window's energy at the expected tone.
"""

from __future__ import annotations

import array
import asyncio
import json
import logging
import os
import re
import socket
import sys
import time
import wave
from asyncio import FIRST_COMPLETED
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pytest

from bridge.audio import sine, ulaw_to_pcm
from bridge.client import ApiClient
from bridge.lab.rtp import RtpCapture
from bridge.lab.sipp import CallPlan, SippCallee, SippResult, free_port
from bridge.pbx.asterisk.backend import AsteriskBackend
from bridge.store import ListQuery
from tests.asterisk_harness import AMI_SECRET, AsteriskLab, share_of_windows
from tests.pipeline_server import PipelineSession
from tests.tcp_proxy import AmiTrap

pytestmark = [pytest.mark.asterisk, pytest.mark.integration]

HOSTILE = "a,b;c\"d'e)f}g${SHELL}%0Ah|i?j:k\\l&m=n(o{p$(1+1)q%25r~"
# What a SIP URI user part and a phone number's sipUri both allow, with the characters that
# split or evaluate dialplan arguments (, ( ) $ & ').
HOSTILE_USER = "+1(555)$(1+1),Hangup()&a=b'c!~*/-_."
# A quoted display name: everything but [ and ] (SIPp keywords); \" is an escaped quote.
HOSTILE_NAME_SIP = 'Ev\\"il, ${SHELL} $(1+1);Hangup() (o{p%0A|i\\\\'
HOSTILE_NAME = 'Ev"il, ${SHELL} $(1+1);Hangup() (o{p%0A|i\\'
# Asterisk complaining about a dialplan expression, function or application argument.
DIALPLAN_WARNING = re.compile(
    r"WARNING\[[^\]]*\](?:\[[^\]]*\])? (?:pbx\w*|func_\w+|ast_expr\w*)\.(?:c|fl|y):"
)


def reply_tone(frequency: float, seconds: float) -> object:
    """A pipeline script that answers with a tone at 16 kHz in 100 ms chunks, paced."""

    async def script(session: PipelineSession) -> None:
        await session.play(sine(frequency, seconds, 16000), chunk=3200, period_s=0.1)

    return script


async def test_fixed_assistant_call_audio_both_ways(asterisk_lab: AsteriskLab) -> None:
    lab = asterisk_lab
    lab.pipeline.script = reply_tone(1200, 8.0)  # type: ignore[assignment]
    service = await lab.start_service()
    assistant = await lab.assistant()
    number = await lab.number(assistantId=assistant["id"])
    started = time.monotonic()
    result, rtp = await lab.call(
        CallPlan(
            user="demo",
            headers=[("X-First_Name", "John")],
            tone_file=lab.tone_file(700),
            talk_ms=5000,
            listen_ms=1000,
        ),
        capture=True,
    )
    elapsed = time.monotonic() - started
    assert result.answered and result.bye_from_caller and result.returncode == 0

    session = await lab.pipeline.session()
    assert session.start is not None
    assert session.start["assistant"]["firstMessage"] == "Hello John, you've reached me over SIP."
    assert session.start["variables"]["first_name"] == "John"
    assert session.start["headers"] == {"X-First_Name": "John"}
    assert session.start["customer"]["number"] == "+15551230000"
    assert session.start["calledUri"] == f"sip:demo@{lab.asterisk_host}"
    assert re.fullmatch(r"\d+\.\d+", session.start["pbxCallId"])  # Asterisk's Uniqueid
    call_id = session.start["callId"]
    await session.closed.wait()
    # The caller's 700 Hz tone, as the pipeline received it (16 kHz PCM).
    fraction, count = share_of_windows(bytes(session.audio), 16000, 700)
    assert count >= 4 and fraction >= 0.95, (fraction, count)
    # The pipeline's 1200 Hz reply, as RTP to the caller's media port.
    assert rtp is not None
    fraction, count = share_of_windows(rtp.pcm(), 8000, 1200)
    assert count >= 4 and fraction >= 0.95, (fraction, count)

    report = await lab.sink.wait_for_message("end-of-call-report", timeout=10)
    message = report.message
    assert message["endedReason"] == "customer-ended-call"
    assert 4.0 <= message["durationSeconds"] <= elapsed + 1.0
    assert message["phoneNumber"]["id"] == number["id"]
    assert message["call"]["id"] == call_id
    assert message["call"]["sipbridge"]["media"]["framesFromCaller"] >= 200
    statuses = [m["status"] for m in lab.sink.messages("status-update")]
    assert statuses == ["ringing", "in-progress", "ended"]
    # The stored call record, as GET /call/{id} serves it.
    assert await service.recorder.flush()
    stored = await service.store.get_call(call_id)
    assert stored is not None
    assert (stored["status"], stored["endedReason"]) == ("ended", "customer-ended-call")
    assert stored["assistantId"] == assistant["id"] and stored["phoneNumberId"] == number["id"]
    assert stored["customer"]["number"] == "+15551230000"
    assert [c["id"] for c in await service.store.list_calls(ListQuery())] == [call_id]
    assert await lab.no_channels_left() == []


async def test_unknown_number_is_404_without_a_pipeline(asterisk_lab: AsteriskLab) -> None:
    lab = asterisk_lab
    await lab.start_service()
    result, _ = await lab.call(CallPlan(user="nobody"))
    assert result.final_status == 404
    assert lab.pipeline.sessions == []
    report = await lab.sink.wait_for_message("end-of-call-report")
    assert report.message["endedReason"] == "call.start.error-get-phone-number"
    assert await lab.no_channels_left() == []


async def test_pipeline_unreachable_refuses_the_call_cleanly(asterisk_lab: AsteriskLab) -> None:
    lab = asterisk_lab
    await lab.start_service()
    closed_port = free_port(__import__("socket").SOCK_STREAM)
    assistant = await lab.assistant(
        sipbridge={"pipeline": {"url": f"ws://127.0.0.1:{closed_port}/x"}}
    )
    await lab.number(assistantId=assistant["id"])
    result, _ = await lab.call(CallPlan(user="demo"))
    assert result.final_status == 480
    report = await lab.sink.wait_for_message("end-of-call-report")
    assert (
        report.message["endedReason"]
        == "call.in-progress.error-pipeline-ws-model-connection-failed"
    )
    assert await lab.no_channels_left() == []


async def test_the_shipped_pjsip_sample_loads_as_an_admin_installs_it(
    asterisk_lab: AsteriskLab,
) -> None:
    """The lab's endpoints are dialplan/pjsip.conf.sample (every call test here goes through
    its public endpoint); the authenticated variant loads with its auth and aor too."""
    lab = asterisk_lab
    endpoints = await asyncio.to_thread(lab.asterisk.rx, "pjsip show endpoints")
    assert endpoints is not None
    for name in ("anonymous", "ai-trunk", "sipbridge-transfer"):
        assert re.search(rf"Endpoint:\s+{re.escape(name)}\s", endpoints), (name, endpoints)
    trunk = await asyncio.to_thread(lab.asterisk.rx, "pjsip show endpoint ai-trunk")
    assert trunk is not None and "ai-trunk-auth" in trunk and "sipbridge-inbound" in trunk
    public = await asyncio.to_thread(lab.asterisk.rx, "pjsip show endpoint anonymous")
    assert public is not None
    assert re.search(r"dtmf_mode\s*:\s*auto", public) and re.search(
        r"context\s*:\s*sipbridge-inbound", public
    )
    problems = [
        line
        for line in lab.asterisk.log_text().splitlines()
        if re.search(r"(WARNING|ERROR)\[.*(res_pjsip|config)", line)
    ]
    assert problems == []


async def test_hostile_header_values_change_nothing(asterisk_lab: AsteriskLab) -> None:
    lab = asterisk_lab
    await lab.serve_assistant(firstMessage="Note: {{note}}", number={"user": HOSTILE_USER})
    headers = [("X-Evil", HOSTILE), ("X-Note", "hello, world"), ("X-Semi", 'x";Hangup()')]
    plan = CallPlan(
        user=HOSTILE_USER,
        display_name=HOSTILE_NAME_SIP,
        headers=headers,
        talk_ms=500,
        listen_ms=500,
    )
    result, _ = await lab.call(plan)
    assert result.answered and result.bye_from_caller
    session = await lab.pipeline.session()
    assert session.start is not None
    assert session.start["headers"] == dict(headers)
    assert session.start["assistant"]["firstMessage"] == "Note: hello, world"
    assert session.start["calledUri"] == f"sip:{HOSTILE_USER}@{lab.asterisk_host}"
    assert session.start["customer"]["name"] == HOSTILE_NAME
    report = await lab.sink.wait_for_message("end-of-call-report")
    assert report.message["endedReason"] == "customer-ended-call"
    assert await lab.no_channels_left() == []
    # Nothing the caller sent made the dialplan misparse an expression or an argument.
    warnings = [
        line for line in lab.asterisk.log_text().splitlines() if DIALPLAN_WARNING.search(line)
    ]
    assert warnings == []


async def test_dtmf_reaches_the_pipeline_and_the_pipeline_hangs_up(
    asterisk_lab: AsteriskLab,
) -> None:
    lab = asterisk_lab

    async def script(session: PipelineSession) -> None:
        await session.wait_control("dtmf", digit="5")
        await session.send_json({"type": "end-call", "reason": "assistant-ended-call"})

    lab.pipeline.script = script
    await lab.serve_assistant()
    result, _ = await lab.call(CallPlan(user="demo", talk_ms=200, listen_ms=8000, dtmf="5"))
    assert result.answered and result.bye_from_far_end and not result.bye_from_caller
    report = await lab.sink.wait_for_message("end-of-call-report")
    assert report.message["endedReason"] == "assistant-ended-call"
    assert await lab.no_channels_left() == []


async def test_pipeline_dropping_mid_call_ends_it_with_its_reason(
    asterisk_lab: AsteriskLab,
) -> None:
    lab = asterisk_lab

    async def script(session: PipelineSession) -> None:
        await session.wait_audio(16000)  # half a second of the caller
        session.ws.transport.abort()  # the pipeline dies without a close frame

    lab.pipeline.script = script
    await lab.serve_assistant()
    result, _ = await lab.call(
        CallPlan(user="demo", tone_file=lab.tone_file(500), talk_ms=8000, listen_ms=0)
    )
    assert result.answered and result.bye_from_far_end
    report = await lab.sink.wait_for_message("end-of-call-report")
    assert report.message["endedReason"] == "pipeline-error-custom-llm-llm-failed"
    assert await lab.no_channels_left() == []


# ---- assistant-request ------------------------------------------------------------------------


async def test_assistant_request_with_an_assistant_id(asterisk_lab: AsteriskLab) -> None:
    lab = asterisk_lab
    await lab.start_service()
    assistant = await lab.assistant(firstMessage="Hi {{first_name}}, plan {{plan}}")
    await lab.number(server={"url": lab.sink.url, "secret": "hook-secret"})
    lab.sink.answer(
        {"assistantId": assistant["id"], "assistantOverrides": {"variableValues": {"plan": "gold"}}}
    )
    result, _ = await lab.call(
        CallPlan(
            user="demo",
            headers=[("X-First_Name", "John"), ("X-Account-Id", "42")],
            talk_ms=300,
            listen_ms=300,
        )
    )
    assert result.answered
    request = await lab.sink.wait_for_message("assistant-request")
    message = request.message
    assert request.headers["x-vapi-secret"] == "hook-secret"
    assert message["customer"] == {
        "number": "+15551230000",
        "name": "John Doe",
        "sipUri": "sip:+15551230000@127.0.0.1",
    }
    assert message["call"]["phoneCallProviderDetails"]["sip"]["headers"]["X-Account-Id"] == "42"
    assert message["call"]["assistantOverrides"]["variableValues"]["first_name"] == "John"
    session = await lab.pipeline.session()
    assert session.start is not None
    assert session.start["assistant"]["firstMessage"] == "Hi John, plan gold"
    report = await lab.sink.wait_for_message("end-of-call-report")
    assert report.message["endedReason"] == "customer-ended-call"
    assert report.message["call"]["assistantId"] == assistant["id"]
    assert await lab.no_channels_left() == []


async def test_assistant_request_with_an_inline_assistant(asterisk_lab: AsteriskLab) -> None:
    lab = asterisk_lab
    await lab.start_service()
    await lab.number()  # no assistantId: the default server is asked
    lab.sink.answer(
        {
            "assistant": {"firstMessage": "Hey {{customerName}}"},
            "assistantOverrides": {"variableValues": {"customerName": "Ryan"}},
        }
    )
    result, _ = await lab.call(CallPlan(user="demo", talk_ms=300, listen_ms=300))
    assert result.answered
    session = await lab.pipeline.session()
    assert session.start is not None and session.start["assistant"]["firstMessage"] == "Hey Ryan"
    report = await lab.sink.wait_for_message("end-of-call-report")
    assert report.message["endedReason"] == "customer-ended-call"
    assert await lab.no_channels_left() == []


async def test_assistant_request_error_is_603(asterisk_lab: AsteriskLab) -> None:
    lab = asterisk_lab
    await lab.start_service()
    await lab.number()
    lab.sink.answer({"error": "Sorry, not enough credits."})
    result, _ = await lab.call(CallPlan(user="demo"))
    assert result.final_status == 603
    report = await lab.sink.wait_for_message("end-of-call-report")
    assert report.message["endedReason"] == "assistant-request-returned-error"
    assert report.message["call"]["endedMessage"] == "Sorry, not enough credits."
    assert lab.pipeline.sessions == []


async def test_assistant_request_destination_transfers_with_headers(
    asterisk_lab: AsteriskLab,
) -> None:
    lab = asterisk_lab
    await lab.start_service()
    target = SippCallee(lab.tmp / "callee", free_port())
    lab.extra.append(target)
    await target.start(expect_headers={"X-Account": "gold, vip"})
    await lab.number()
    lab.sink.answer(
        {
            "destination": {
                "type": "sip",
                "sipUri": target.uri,
                "sipHeaders": {"X-Account": "gold, vip"},
            }
        }
    )
    result, _ = await lab.call(CallPlan(user="demo", talk_ms=500, listen_ms=500))
    assert result.answered  # answered by the transfer target, through Asterisk
    code, trace = await target.wait()
    assert code == 0, trace[-2000:]
    assert "X-Account: gold, vip" in trace
    report = await lab.sink.wait_for_message("end-of-call-report")
    assert report.message["endedReason"] == "assistant-request-returned-forwarding-phone-number"
    assert lab.pipeline.sessions == []


async def test_silent_server_goes_to_the_fallback_within_the_budget(
    asterisk_lab: AsteriskLab,
) -> None:
    lab = asterisk_lab
    await lab.start_service()
    target = SippCallee(lab.tmp / "callee", free_port())
    lab.extra.append(target)
    await target.start()
    await lab.number(fallbackDestination={"type": "sip", "sipUri": target.uri})
    lab.sink.answer(hang=True)
    started = time.monotonic()
    result, _ = await lab.call(CallPlan(user="demo", talk_ms=200, listen_ms=200))
    assert result.answered
    code, _ = await target.wait()
    assert code == 0
    report = await lab.sink.wait_for_message("end-of-call-report")
    assert report.message["endedReason"] == "assistant-request-failed"
    # The 7.5 s budget (not cut short), plus Asterisk dialling the fallback and the short call.
    assert 7.0 <= time.monotonic() - started < 7.5 + 3.0
    assert await lab.no_channels_left() == []


async def test_silent_server_without_fallback_is_480(asterisk_lab: AsteriskLab) -> None:
    lab = asterisk_lab
    await lab.start_service()
    await lab.number()
    lab.sink.answer(hang=True)
    started = time.monotonic()
    result, _ = await lab.call(CallPlan(user="demo"))
    assert result.final_status == 480
    assert 7.0 <= time.monotonic() - started < 7.5 + 2.0
    report = await lab.sink.wait_for_message("end-of-call-report")
    assert report.message["endedReason"] == "assistant-request-failed"


# ---- the AMI link -----------------------------------------------------------------------------


async def caller_heard_whole(
    call: asyncio.Future[tuple[SippResult, RtpCapture | None]], session: PipelineSession
) -> None:
    """The call ran to its caller's BYE, and the pipeline heard its 600 Hz tone throughout."""
    result, _ = await call
    assert result.answered and result.bye_from_caller
    fraction, count = share_of_windows(bytes(session.audio), 16000, 600)
    assert count >= 4 and fraction >= 0.95


async def test_ami_killed_mid_call_keeps_audio_and_the_next_call_works(
    asterisk_lab: AsteriskLab,
) -> None:
    lab = asterisk_lab
    lab.pipeline.script = reply_tone(1200, 8.0)  # type: ignore[assignment]
    service = await lab.start_service()
    assistant = await lab.assistant()
    await lab.number(assistantId=assistant["id"])
    call = asyncio.ensure_future(
        lab.call(
            CallPlan(user="demo", tone_file=lab.tone_file(600), talk_ms=6000, listen_ms=0),
            capture=True,
        )
    )
    session = await lab.pipeline.session()
    await session.wait_audio(32000)  # a second of the caller
    lab.ami_proxy.blocked = True
    lab.ami_proxy.cut()
    await asyncio.wait_for(service.wait_link("asterisk", up=False), 5)
    down_since = time.monotonic()
    heard_before_cut = len(session.audio)
    await session.wait_audio(heard_before_cut + 48000)  # 1.5 s more after AMI is gone
    # ... and the pipeline's reply keeps reaching the caller: 2 s of RTP while AMI is down.
    rtp = lab.listening
    assert rtp is not None
    async with asyncio.timeout(5):
        await rtp.wait_until(lambda r: sum(p.arrival >= down_since for p in r.packets) >= 100)
    up_again = time.monotonic()
    lab.ami_proxy.blocked = False
    await asyncio.wait_for(service.wait_link("asterisk", up=True), 10)
    await caller_heard_whole(call, session)
    during = sorted(
        (p for p in rtp.packets if down_since <= p.arrival < up_again and p.payload_type == 0),
        key=lambda p: p.sequence,
    )
    reply_while_down = b"".join(ulaw_to_pcm(p.payload) for p in during)
    fraction, count = share_of_windows(reply_while_down, 8000, 1200)
    assert count >= 2 and fraction >= 0.95, (fraction, count)
    report = await lab.sink.wait_for_message("end-of-call-report", timeout=15)
    assert report.message["endedReason"] == "customer-ended-call"
    assert lab.ami_proxy.connections >= 2  # control came back on a new connection
    second, _ = await lab.call(CallPlan(user="demo", talk_ms=300, listen_ms=300), name="second")
    assert second.answered
    assert await lab.no_channels_left() == []


async def test_a_frozen_ami_link_is_dropped_by_the_watchdog_and_audio_goes_on(
    asterisk_lab: AsteriskLab,
) -> None:
    """Half-open AMI (nothing gets through, nothing is closed): noticed within two heartbeat
    intervals, while the call's AudioSocket keeps carrying the caller."""
    lab = asterisk_lab
    service = await lab.start_service()  # ping_interval_s 1.0
    interval = service.settings.asterisk.ping_interval_s
    assistant = await lab.assistant()
    await lab.number(assistantId=assistant["id"])
    call = asyncio.ensure_future(
        lab.call(CallPlan(user="demo", tone_file=lab.tone_file(600), talk_ms=6000, listen_ms=0))
    )
    session = await lab.pipeline.session()
    await session.wait_audio(32000)  # a second of the caller
    lab.ami_proxy.blocked = True  # the reconnect must wait until the link thaws
    frozen_since = time.monotonic()
    lab.ami_proxy.frozen = True
    await asyncio.wait_for(service.wait_link("asterisk", up=False), 4 * interval)
    assert time.monotonic() - frozen_since <= 2 * interval + 0.5
    heard_at_drop = len(session.audio)
    await session.wait_audio(heard_at_drop + 32000)  # a second more without AMI
    lab.ami_proxy.frozen = False
    lab.ami_proxy.blocked = False
    await asyncio.wait_for(service.wait_link("asterisk", up=True), 10)
    await caller_heard_whole(call, session)
    report = await lab.sink.wait_for_message("end-of-call-report", timeout=15)
    assert report.message["endedReason"] == "customer-ended-call"
    assert await lab.no_channels_left() == []


async def test_a_call_waiting_while_ami_is_down_is_taken_after_reconnecting(
    asterisk_lab: AsteriskLab,
) -> None:
    lab = asterisk_lab
    service = await lab.start_service()
    assistant = await lab.assistant()
    await lab.number(assistantId=assistant["id"])
    lab.ami_proxy.blocked = True
    lab.ami_proxy.cut()
    await asyncio.wait_for(service.wait_link("asterisk", up=False), 5)
    # The dialplan holds the call (the heartbeat is fresh) and announces it while nobody listens.
    call = asyncio.ensure_future(lab.call(CallPlan(user="demo", talk_ms=300, listen_ms=300)))
    assert len(await lab.channels_present(timeout=10)) == 1
    assert service.callflow.active() == []
    lab.ami_proxy.blocked = False
    result, _ = await call
    assert result.answered  # the resync after reconnecting announced it again
    session = await lab.pipeline.session()
    assert session.start is not None
    report = await lab.sink.wait_for_message("end-of-call-report")
    assert report.message["endedReason"] == "customer-ended-call"
    assert len(lab.sink.messages("end-of-call-report")) == 1
    assert await lab.no_channels_left() == []


async def test_a_reject_decided_while_ami_is_down_is_carried_out_after_reconnecting(
    asterisk_lab: AsteriskLab,
) -> None:
    """The flow ends the call, its PJSIPHangup cannot be sent, the channel keeps ringing in
    Wait(): after reconnecting it gets the decided 480, not a second call record."""
    lab = asterisk_lab
    service = await lab.start_service()
    await lab.number()  # the default server is asked ...
    lab.sink.answer(hang=True)  # ... and never answers: 480 after the 7.5 s budget
    started = time.monotonic()
    call = asyncio.ensure_future(lab.call(CallPlan(user="demo")))
    await lab.sink.wait_for_message("assistant-request")
    lab.ami_proxy.blocked = True
    lab.ami_proxy.cut()
    await asyncio.wait_for(service.wait_link("asterisk", up=False), 5)
    report = await lab.sink.wait_for_message("end-of-call-report", timeout=15)
    assert report.message["endedReason"] == "assistant-request-failed"
    assert service.callflow.active() == []
    assert len(await lab.channels_present(timeout=1)) == 1  # still ringing in Wait(20)
    lab.ami_proxy.blocked = False
    result, _ = await call
    assert result.final_status == 480
    # The budget and a reconnect, well before the dialplan's own 480 after Wait(20) and
    # before a second assistant-request could have run out.
    assert 7.0 <= time.monotonic() - started < 7.5 + 4.0
    assert len(lab.sink.messages("assistant-request")) == 1
    assert len(lab.sink.messages("end-of-call-report")) == 1
    assert await service.recorder.flush()
    stored = await service.store.list_calls(ListQuery())
    assert [c["id"] for c in stored] == [report.message["call"]["id"]]
    assert await lab.no_channels_left() == []


# ---- capacity and isolation -------------------------------------------------------------------


async def test_twenty_concurrent_calls_each_hear_only_their_caller(
    asterisk_lab: AsteriskLab,
) -> None:
    lab = asterisk_lab
    await lab.start_service()
    assistant = await lab.assistant()
    await lab.number(assistantId=assistant["id"])
    tones = [400 + 60 * index for index in range(20)]
    await calls_each_hear_only_their_caller(lab, tones)


def tone_calls(lab: AsteriskLab, tones: list[int]) -> list[CallPlan]:
    """One caller per tone, which it plays and names in an X-Tone header."""
    return [
        CallPlan(
            user="demo",
            headers=[("X-Tone", str(tone))],
            tone_file=lab.tone_file(tone),
            talk_ms=4000,
            listen_ms=500,
        )
        for tone in tones
    ]


async def calls_each_hear_only_their_caller(lab: AsteriskLab, tones: list[int]) -> None:
    """Calls all the tones at once: every call is answered, every pipeline hears its own
    caller's tone throughout and nobody else's, and every call ends as its caller hung up."""
    plans = tone_calls(lab, tones)
    results = await asyncio.gather(*(lab.call(plan, name=f"c{i}") for i, plan in enumerate(plans)))
    assert all(result.answered for result, _ in results), [r.final_status for r, _ in results]
    assert len(lab.pipeline.sessions) == len(tones)
    for session in lab.pipeline.sessions:
        await session.closed.wait()
        assert session.start is not None
        own = int(session.start["headers"]["X-Tone"])
        pcm = bytes(session.audio)
        fraction, count = share_of_windows(pcm, 16000, own)
        assert count >= 3 and fraction >= 0.95, (own, fraction, count)
        for other in tones:
            if other != own:
                assert share_of_windows(pcm, 16000, other, threshold=0.05)[0] == 0.0, (own, other)
    reports = await lab.sink.wait_for(
        lambda rs: sum(1 for r in rs if _type(r) == "end-of-call-report") == len(tones),
        timeout=20,
    )
    assert [
        json.loads(r.body)["message"]["endedReason"]
        for r in reports
        if _type(r) == "end-of-call-report"
    ] == ["customer-ended-call"] * len(tones)
    assert await lab.no_channels_left() == []


@pytest.mark.parametrize("lose", ["answer", "action"])
async def test_ami_dropping_while_calls_connect_leaves_none_without_its_audio(
    asterisk_lab: AsteriskLab, lose: Literal["answer", "action"]
) -> None:
    """The AMI link drops in the middle of one call's connect_media, six calls setting up at
    once (seen under load: a missed heartbeat dropped the link while 20 calls were set up,
    and one answered caller's pipeline got no audio). With ``answer`` Asterisk carries out
    the Redirect to the media context and its answer is lost with the link; with ``action``
    the Redirect never reaches Asterisk. Either way every call still works, once."""
    lab = asterisk_lab
    await lab.start_service()
    assistant = await lab.assistant()
    await lab.number(assistantId=assistant["id"])
    trap = lab.ami_proxy.arm(AmiTrap(b"Context: sipbridge-media", nth=3, lose=lose))
    await calls_each_hear_only_their_caller(lab, [500 + 100 * index for index in range(6)])
    assert trap.sprung.is_set()
    assert lab.ami_proxy.connections >= 2  # the link was cut and came back
    assert len(lab.sink.messages("end-of-call-report")) == 6


def _type(recorded: object) -> str | None:
    try:
        return json.loads(recorded.body)["message"]["type"]  # type: ignore[attr-defined]
    except (ValueError, KeyError, TypeError):
        return None


class ServeProcess:
    """``sipbridge serve`` as its own process (so that it can be killed), on the lab's Asterisk."""

    def __init__(self, lab: AsteriskLab, store: Path, api_port: int) -> None:
        self.api = f"http://127.0.0.1:{api_port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SIPBRIDGE_")},
            "SIPBRIDGE_API__LAB_MODE": "true",
            "SIPBRIDGE_API__PORT": str(api_port),
            "SIPBRIDGE_STORE__PATH": str(store),
            "SIPBRIDGE_ASTERISK__ENABLED": "true",
            "SIPBRIDGE_ASTERISK__PORT": str(lab.asterisk.ami_port),
            "SIPBRIDGE_ASTERISK__SECRET": AMI_SECRET,
            "SIPBRIDGE_MEDIA__AUDIOSOCKET_PORT": str(free_port(socket.SOCK_STREAM)),
            "SIPBRIDGE_PIPELINE__DEFAULT_URL": lab.pipeline.url,
            "SIPBRIDGE_WEBHOOKS__DEFAULT_SERVER_URL": lab.sink.url,
        }
        self.log = store.with_suffix(".log")
        self.process: asyncio.subprocess.Process | None = None
        self._copier: asyncio.Future[None] | None = None

    async def start(self) -> ApiClient:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "serve", env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        up = asyncio.Event()
        self._copier = asyncio.ensure_future(self._copy_log(self.process, up))
        # Its log says when the AMI link is up and the API listens: await those lines.
        came_up = asyncio.ensure_future(up.wait())
        await asyncio.wait([came_up, self._copier], timeout=30, return_when=FIRST_COMPLETED)
        came_up.cancel()
        client = ApiClient(self.api, None, timeout_s=5)
        if up.is_set():
            health = await asyncio.to_thread(client.request, "GET", "/health")
            if health["pbx"].get("asterisk") == "up":
                return client
        raise AssertionError(f"sipbridge did not come up:\n{self.log.read_text()[-3000:]}")

    async def _copy_log(self, process: asyncio.subprocess.Process, up: asyncio.Event) -> None:
        """Copies the process's output to its log file for its whole life (a pipe nobody
        reads would block it), and says when the AMI link is up and the API listens."""
        assert process.stdout is not None
        awaited = {b"AMI link up", b": API on http"}
        with self.log.open("ab") as output:
            async for line in process.stdout:
                output.write(line)
                output.flush()
                awaited = {text for text in awaited if text not in line}
                if not awaited:
                    up.set()

    async def kill(self) -> None:
        assert self.process is not None
        self.process.kill()  # SIGKILL: no stopping step at all
        await self.process.wait()
        if self._copier is not None:
            await self._copier

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()
        if self._copier is not None:
            await self._copier


async def test_a_killed_sipbridge_leaves_no_ghost_call(
    asterisk_lab: AsteriskLab, tmp_path: Path
) -> None:
    """[hardening] 4: after kill -9 mid-call the record stayed in-progress forever, with no
    ended status update and no end-of-call-report. The next start settles it, once."""
    lab = asterisk_lab
    api_port = free_port(socket.SOCK_STREAM)
    first, second, third = (
        ServeProcess(lab, tmp_path / "sipbridge.sqlite3", api_port) for _ in range(3)
    )
    try:
        client = await first.start()
        assistant = await asyncio.to_thread(client.request, "POST", "/assistant", {"name": "A"})
        await asyncio.to_thread(
            client.request,
            "POST",
            "/phone-number",
            {"sipUri": "sip:demo@127.0.0.1", "assistantId": assistant["id"]},
        )
        call = asyncio.ensure_future(
            lab.call(
                CallPlan(
                    user="demo",
                    to_host="127.0.0.1",
                    tone_file=lab.tone_file(700),
                    talk_ms=20000,
                    listen_ms=0,
                )
            )
        )
        session = await lab.pipeline.session()
        in_progress = await lab.sink.wait_for_message("status-update", status="in-progress")
        call_id = in_progress.message["call"]["id"]
        # Three seconds of the caller's audio went through: two whole seconds of recording
        # were handed to the writer's thread before the kill.
        await session.wait_audio(3 * 32000, timeout=15)
        await first.kill()
        # Asterisk ends the channel when its AudioSocket connection dies with the process.
        result, _ = await call
        assert result.bye_from_far_end
        client = await second.start()
        report = await lab.sink.wait_for_message("end-of-call-report")
        assert report.message["call"]["id"] == call_id
        assert report.message["endedReason"] == "call.in-progress.error-vapifault-worker-died"
        record = await asyncio.to_thread(client.request, "GET", f"/call/{call_id}")
        assert record["status"] == "ended"
        # [recording] the crash left a playable recording of what was recorded by then,
        # served by the next process; the caller's 700 Hz on the left.
        recorded = tmp_path / "recorded.wav"
        with recorded.open("wb") as file:
            await asyncio.to_thread(client.download, f"/call/{call_id}/recording", {}, file)
        on_disk = tmp_path / "recordings" / f"{call_id}.stereo.wav"
        assert recorded.read_bytes() == on_disk.read_bytes()
        with wave.open(str(recorded)) as recording:
            assert recording.getnframes() >= 8000  # at least a whole second
            samples = array.array("h", recording.readframes(recording.getnframes()))
        fraction, count = share_of_windows(samples[0::2].tobytes(), 8000, 700)
        assert count >= 1 and fraction >= 0.5, (fraction, count)
        ended = lab.sink.messages("status-update")[-1]
        assert (ended["status"], ended["call"]["id"]) == ("ended", call_id)
        # Settled once: a third start finds nothing left.
        await second.stop()
        await third.start()
        await third.stop()
        reports = [m for m in lab.sink.messages("end-of-call-report") if m["call"]["id"] == call_id]
        assert len(reports) == 1
        assert await lab.no_channels_left() == []
    finally:
        for process in (first, second, third):
            await process.stop()


@pytest.mark.parametrize(
    ("username", "allowed"),
    [
        # write = all includes system: the session filter passes the two events sipbridge uses.
        ("everything", {"UserEvent", "Hangup"}),
        # No system write: the login's event classes (call, user) still keep the dialplan's
        # per-priority events, RTCP and CEL away.
        ("readall", None),
    ],
)
async def test_a_manager_user_that_reads_everything_sends_only_what_sipbridge_uses(
    asterisk_lab: AsteriskLab,
    caplog: pytest.LogCaptureFixture,
    username: str,
    allowed: set[str] | None,
) -> None:
    """[performance] AMI floods: sipbridge asks for the events it acts on, whatever the user may
    read, and calls work the same."""
    lab = asterisk_lab
    caplog.set_level(logging.INFO, logger="bridge.pbx.asterisk.backend")
    service = await lab.start_service(asterisk={"username": username})
    backend = service.backends["asterisk"]
    assert isinstance(backend, AsteriskBackend)
    seen: list[str] = []
    dispatch = backend.link._on_event

    def counting(event: Mapping[str, Any]) -> None:
        seen.append(str(event.get("Event")))
        dispatch(event)

    backend.link._on_event = counting
    lab.pipeline.script = reply_tone(1200, 3.0)  # type: ignore[assignment]
    assistant = await lab.assistant()
    await lab.number(assistantId=assistant["id"])
    result, rtp = await lab.call(
        CallPlan(user="demo", tone_file=lab.tone_file(700), talk_ms=2500, listen_ms=500),
        capture=True,
    )
    assert result.answered and result.bye_from_caller
    report = await lab.sink.wait_for_message("end-of-call-report")
    assert report.message["endedReason"] == "customer-ended-call"
    assert rtp is not None  # the pipeline's tone reached the caller
    fraction, count = share_of_windows(rtp.pcm(), 8000, 1200)
    assert count >= 2 and fraction >= 0.95, (fraction, count)
    assert "UserEvent" in seen and "Hangup" in seen
    refused = "AMI event filters not set" in caplog.text
    if allowed is not None:
        assert set(seen) <= allowed, sorted(set(seen))
        assert not refused
    else:
        assert refused
        assert not {"Newexten", "VarSet", "RTCPSent", "RTCPReceived", "CEL"} & set(seen), sorted(
            set(seen)
        )
    assert await lab.no_channels_left() == []
