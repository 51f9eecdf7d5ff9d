"""Conversations, owned by the call flow: a call's pipeline opened while it rings, joined to its
leg when the PBX connects it, and the call ended the way the conversation's result says."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bridge.audio import sine, tone_share
from bridge.calls import Call, EndedReason
from bridge.conversation import Conversations, TapFactory
from bridge.events import LegAudio, LegClosed, LegConnected
from bridge.routing import Accept
from bridge.settings import MediaSettings, PipelineSettings, TlsSettings
from bridge.tls import client_context
from tests.flow_harness import Harness, facts
from tests.memory_leg import MemoryLeg
from tests.pipeline_server import PipelineServer, PipelineSession
from tests.test_media_session import BrokenTap, RecordingTap


async def build(
    make_harness: Callable[..., Any],
    pipeline_settings: PipelineSettings | None = None,
    taps: tuple[TapFactory, ...] = (),
    **options: Any,
) -> tuple[Harness, Conversations]:
    conversations = Conversations(pipeline_settings or PipelineSettings(), MediaSettings(), taps)
    harness: Harness = await make_harness(conversations=conversations, **options)
    return harness, conversations


FALLBACK = {"type": "number", "number": "+15557654321", "message": "Sorry {{first_name}}"}


async def offered(h: Harness, pipeline_url: str, **number: Any) -> Call:
    """A call offered to a number whose assistant streams to ``pipeline_url``."""
    assistant = await h.assistant(sipbridge={"pipeline": {"url": pipeline_url}})
    await h.number(assistantId=assistant["id"], **number)
    call = h.flow.offer(facts(), h.pbx)
    assert call is not None
    return call


async def test_a_call_from_pipeline_start_to_report(
    make_harness: Callable[..., Any], pipeline: PipelineServer
) -> None:
    h, _ = await build(make_harness)
    assistant = await h.assistant(
        sipbridge={"pipeline": {"url": pipeline.url, "headers": {"X-Tenant": "acme"}}}
    )
    await h.number(assistantId=assistant["id"])
    call = h.flow.offer(facts(), h.pbx)
    assert call is not None
    await h.pbx.wait_for("connect_media")
    session = await pipeline.session()
    assert session.headers["x-tenant"] == "acme"
    start = session.start
    assert start is not None and start["callId"] == call.id
    assert start["assistant"]["firstMessage"] == "Hello John, you've reached me over SIP."
    # The handshake carried the header; the start message does not repeat it.
    assert "acme" not in repr(start)
    assert start["headers"] == {"X-First_Name": "John", "X-Account-Id": "42"}
    assert start["variables"]["account_id"] == "42"
    assert start["phoneNumber"]["sipUri"] == "sip:alice@sip.example.com"

    leg = MemoryLeg()
    h.flow.post(LegConnected(call.id, leg))
    tone = sine(700, 0.5)
    for offset in range(0, len(tone), 320):
        leg.inbox.put(LegAudio(tone[offset : offset + 320]))
    heard = await session.wait_audio(15000)
    assert tone_share(heard[:8000], 16000, 700) > 0.95
    # /health counts the conversations live now, not a running total.
    assert h.flow.describe_media() == {"waitingForMedia": 0, "sessions": 1}
    leg.inbox.put(LegClosed(by_caller=True))
    report = await h.sink.wait_for_message("end-of-call-report")
    media = report.message["call"]["sipbridge"]["media"]
    assert report.message["endedReason"] == "customer-ended-call"
    assert media["framesFromCaller"] == 25 and media["framesToPipeline"] == 25
    assert "hangup" not in h.pbx.names()  # the caller hung up: nothing to tell the PBX
    assert leg.closed and h.flow.describe_media() == {"waitingForMedia": 0, "sessions": 0}
    stop = await session.wait_control("stop")
    assert stop["reason"] == "customer-ended-call"


async def test_transcripts_and_messages_reach_the_end_of_call_report(
    make_harness: Callable[..., Any], pipeline: PipelineServer
) -> None:
    async def script(session: PipelineSession) -> None:
        for message in (
            {"type": "transcript", "role": "user", "transcriptType": "partial", "transcript": "Hi"},
            {
                "type": "transcript",
                "role": "user",
                "transcriptType": "final",
                "transcript": "Hi there",
            },
            {"type": "transcript", "role": "assistant", "transcript": "Hello John"},
            {"type": "conversation-update", "messages": [{"role": "tool", "message": "lookup"}]},
            {"type": "end-call", "reason": "assistant-ended-call"},
        ):
            await session.send_json(message)

    pipeline.script = script
    h, _ = await build(make_harness)
    call = await offered(h, pipeline.url)
    await h.pbx.wait_for("connect_media")
    h.flow.post(LegConnected(call.id, MemoryLeg()))
    report = (await h.sink.wait_for_message("end-of-call-report")).message
    assert report["endedReason"] == "assistant-ended-call"
    artifact = report["artifact"]
    assert [(m["role"], m["message"]) for m in artifact["messages"]] == [
        ("user", "Hi there"),
        ("bot", "Hello John"),
        ("tool", "lookup"),
    ]
    assert artifact["transcript"] == "User: Hi there\nAI: Hello John"
    assert all(m["secondsFromStart"] >= 0 for m in artifact["messages"][:2])


async def test_media_for_no_waiting_call_is_closed(make_harness: Callable[..., Any]) -> None:
    h, _ = await build(make_harness)
    leg = MemoryLeg()
    h.flow.post(LegConnected("not-a-call", leg))
    await leg.wait_closed()


async def test_a_call_ending_before_its_media_closes_the_pipeline(
    make_harness: Callable[..., Any], pipeline: PipelineServer
) -> None:
    h, _ = await build(make_harness)
    call = await offered(h, pipeline.url)
    await h.pbx.wait_for("connect_media")
    session: PipelineSession = await pipeline.session()
    h.flow.hung_up("test", call.facts.pbx_call_id)
    await session.closed.wait()
    assert h.flow.describe_media() == {"waitingForMedia": 0, "sessions": 0}


async def test_the_pipeline_transfers_and_hangs_up_through_the_flow(
    make_harness: Callable[..., Any], pipeline: PipelineServer
) -> None:
    async def script(session: PipelineSession) -> None:
        await session.send_json(
            {
                "type": "transfer",
                "destination": {
                    "type": "sip",
                    "sipUri": "sip:agent@pbx.example.com",
                    "message": "Bye {{first_name}}",
                },
            }
        )

    pipeline.script = script
    h, _ = await build(make_harness)
    call = await offered(h, pipeline.url)
    await h.pbx.wait_for("connect_media")
    leg = MemoryLeg()
    h.flow.post(LegConnected(call.id, leg))
    destination = await h.pbx.wait_for("transfer")
    assert (
        destination["sipUri"] == "sip:agent@pbx.example.com"
        and destination["message"] == "Bye John"
    )
    await h.sink.wait_for_message("status-update", status="ended")
    assert call.ended_reason is EndedReason.ASSISTANT_FORWARDED_CALL
    statuses = [m["status"] for m in h.sink.messages("status-update")]
    assert statuses == ["ringing", "in-progress", "forwarding", "ended"]
    await leg.wait_closed()
    assert "hangup" not in h.pbx.names()  # the channel went on to the transfer


async def test_a_pipeline_that_never_connects_sends_the_call_to_its_fallback(
    make_harness: Callable[..., Any], pipeline: PipelineServer
) -> None:
    h, _ = await build(make_harness)
    call = await offered(h, "ws://127.0.0.1:9/refused", fallbackDestination=FALLBACK)
    destination = await h.pbx.wait_for("transfer")
    assert destination["number"] == "+15557654321" and destination["message"] == "Sorry John"
    report = await h.ended(call.id)
    assert report["endedReason"] == EndedReason.PIPELINE_CONNECTION_FAILED.value
    assert report["call"]["destination"]["number"] == "+15557654321"
    assert "connect_media" not in h.pbx.names() and "reject" not in h.pbx.names()


async def test_without_a_fallback_a_pipeline_that_never_connects_refuses_the_call(
    make_harness: Callable[..., Any],
) -> None:
    h, _ = await build(make_harness, pipeline_fallback=False)
    call = await offered(
        h, "ws://127.0.0.1:9/refused", fallbackDestination=FALLBACK
    )  # the fallback is not used
    assert await h.pbx.wait_for("reject") == 480
    report = await h.ended(call.id)
    assert report["endedReason"] == EndedReason.PIPELINE_CONNECTION_FAILED.value
    assert "cannot open the pipeline websocket" in report["call"]["endedMessage"]
    assert "transfer" not in h.pbx.names()


async def test_a_pipeline_failing_mid_call_sends_the_call_to_its_fallback(
    make_harness: Callable[..., Any], pipeline: PipelineServer
) -> None:
    async def script(session: PipelineSession) -> None:
        session.ws.transport.abort()  # the pipeline process dies: no close frame

    pipeline.script = script
    h, _ = await build(make_harness)
    call = await offered(h, pipeline.url, fallbackDestination=FALLBACK)
    await h.pbx.wait_for("connect_media")
    done_when_closed: list[str] = []
    leg = MemoryLeg(on_close=lambda: done_when_closed.extend(h.pbx.names()))
    h.flow.post(LegConnected(call.id, leg))
    assert (await h.pbx.wait_for("transfer"))["number"] == "+15557654321"
    await leg.wait_closed()
    # The leg stayed up until the PBX had taken the transfer; nothing hung the call up.
    assert done_when_closed == ["connect_media", "transfer"]
    report = await h.ended(call.id)
    assert report["endedReason"] == EndedReason.PIPELINE_FAILED.value
    assert "close code 1006" in report["call"]["endedMessage"]
    statuses = [m["status"] for m in h.sink.messages("status-update")]
    assert statuses == ["ringing", "in-progress", "forwarding", "ended"]


async def test_a_stalled_pipeline_ends_the_call_when_fallback_is_off(
    make_harness: Callable[..., Any], pipeline: PipelineServer
) -> None:
    async def script(session: PipelineSession) -> None:
        session.ws.transport.pause_reading()  # alive but stuck: pings go unanswered

    pipeline.script = script
    h, _ = await build(
        make_harness,
        PipelineSettings(ping_interval_s=0.2, ping_timeout_s=0.2),
        pipeline_fallback=False,
    )
    call = await offered(h, pipeline.url, fallbackDestination=FALLBACK)
    await h.pbx.wait_for("connect_media")
    leg = MemoryLeg()
    h.flow.post(LegConnected(call.id, leg))
    report = await h.ended(call.id)
    assert report["endedReason"] == EndedReason.PIPELINE_FAILED.value
    assert "keepalive ping timeout" in report["call"]["endedMessage"]
    assert await h.pbx.wait_for("hangup") == call.facts.pbx_call_id
    assert "transfer" not in h.pbx.names()
    (await pipeline.session()).ws.transport.abort()  # the stuck server-side connection


async def test_a_leg_closed_by_the_transfer_itself_is_not_the_callers_hangup(
    make_harness: Callable[..., Any], pipeline: PipelineServer
) -> None:
    """Asterisk closes the AudioSocket as its Redirect moves the call: that ends the session
    before the Redirect's answer arrives, and must neither cut the transfer off nor make the
    call customer-ended."""

    async def script(session: PipelineSession) -> None:
        await session.send_json(
            {"type": "transfer", "destination": {"type": "number", "number": "+15550001111"}}
        )

    pipeline.script = script
    h, _ = await build(make_harness)
    call = await offered(h, pipeline.url)
    await h.pbx.wait_for("connect_media")
    leg = MemoryLeg()
    moved = asyncio.Event()

    async def the_pbx_moves_the_call() -> None:
        conversation = h.flow._by_id[call.id].conversation
        assert conversation is not None
        leg.inbox.put(LegClosed(by_caller=True))
        await conversation.session_over.wait()  # the session ends before the PBX answers
        moved.set()

    h.pbx.during_transfer = the_pbx_moves_the_call
    h.flow.post(LegConnected(call.id, leg))
    report = await h.ended(call.id)
    assert moved.is_set()
    assert report["endedReason"] == "assistant-forwarded-call"
    assert "hangup" not in h.pbx.names()


async def test_a_tap_factory_gives_each_accepted_call_its_tap(
    make_harness: Callable[..., Any], pipeline: PipelineServer
) -> None:
    made: list[tuple[str, RecordingTap]] = []

    def recorder(call: Call, decision: Accept) -> RecordingTap:
        made.append((call.id, RecordingTap()))
        return made[-1][1]

    broken = BrokenTap()
    h, _ = await build(
        make_harness, taps=(lambda call, decision: broken, recorder, lambda call, decision: None)
    )
    call = await offered(h, pipeline.url)
    await h.pbx.wait_for("connect_media")
    leg = MemoryLeg()
    h.flow.post(LegConnected(call.id, leg))
    leg.inbox.put(LegAudio(sine(700, 0.02)))
    leg.inbox.put(LegClosed(by_caller=True))
    report = await h.ended(call.id)
    [(call_id, tap)] = made
    assert call_id == call.id and tap.said == [sine(700, 0.02)] and tap.closed
    # What the tap counted joins the call's media counters.
    assert report["call"]["sipbridge"]["media"]["tappedFrames"] == len(tap.heard)
    # A tap dropped for failing is still closed once the call is over (its files, say).
    assert broken.closed and broken.heard == []


async def test_a_wss_pipeline_with_a_private_ca(
    make_harness: Callable[..., Any], tls_pipeline: PipelineServer, ca_file: Path
) -> None:
    """tls.ca_file lets a call reach a wss:// pipeline whose certificate a private CA issued."""
    conversations = Conversations(
        PipelineSettings(), MediaSettings(), tls=client_context(TlsSettings(ca_file=ca_file))
    )
    h: Harness = await make_harness(conversations=conversations)
    call = await offered(h, tls_pipeline.url)
    await h.pbx.wait_for("connect_media")
    assert (await tls_pipeline.session()).call_id == call.id
    h.flow.hung_up("test", call.facts.pbx_call_id)
    await h.ended(call.id)


async def test_a_wss_pipeline_whose_certificate_does_not_verify_fails_the_call(
    make_harness: Callable[..., Any], tls_pipeline: PipelineServer
) -> None:
    conversations = Conversations(
        PipelineSettings(), MediaSettings(), tls=client_context(TlsSettings())
    )
    h: Harness = await make_harness(conversations=conversations, pipeline_fallback=False)
    call = await offered(h, tls_pipeline.url)
    assert await h.pbx.wait_for("reject") == 480
    report = await h.ended(call.id)
    assert report["endedReason"] == EndedReason.PIPELINE_CONNECTION_FAILED.value
    assert (
        "certificate verify failed: unable to get local issuer certificate"
        in (report["call"]["endedMessage"])
    )
    assert tls_pipeline.sessions == []
