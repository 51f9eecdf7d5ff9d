"""The PBX-neutral call flow with a real store, a real webhook server and a recording PBX."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from bridge import callflow
from bridge.calls import Call, CallStatus, EndedReason
from bridge.errors import CallRefused, PbxActionError, ValidationFailed
from bridge.events import CallGone, LegConnected
from tests.flow_harness import Harness, facts
from tests.memory_leg import MemoryLeg


async def test_fixed_assistant_call_from_offer_to_report(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness()
    assistant = await h.assistant()
    number = await h.number(assistantId=assistant["id"])
    call = h.flow.offer(facts(), h.pbx)
    assert call is not None
    assert await h.pbx.wait_for("connect_media") == call.id
    in_progress = await h.sink.wait_for_message("status-update", status="in-progress")
    assert in_progress.message["call"]["id"] == call.id
    assert call.status is CallStatus.IN_PROGRESS
    assert call.assistant is not None
    assert call.assistant["firstMessage"] == "Hello John, you've reached me over SIP."
    assert call.variable_values["first_name"] == "John"
    # The PBX connects the call's audio: the call takes its leg once; a second one is closed.
    leg, extra = MemoryLeg(), MemoryLeg()
    h.flow.post(LegConnected(call.id, leg))
    h.flow.post(LegConnected(call.id, extra))
    await extra.wait_closed()
    assert not leg.closed and h.flow.describe_media()["waitingForMedia"] == 0

    h.flow.post(CallGone("test", call.facts.pbx_call_id, by_caller=True))
    report = await h.ended(call.id)
    assert report["endedReason"] == "customer-ended-call"
    await leg.wait_closed()  # the call's end frees its leg
    assert "hangup" not in h.pbx.names()  # the PBX said the call is gone: nothing to end
    assert report["durationSeconds"] >= 0
    assert report["phoneNumber"]["id"] == number["id"]
    assert report["artifact"]["variableValues"]["first_name"] == "John"
    statuses = [m["status"] for m in h.sink.messages("status-update")]
    assert statuses == ["ringing", "in-progress", "ended"]
    assert await h.recorder.flush()
    stored = await h.store.get_call(call.id)
    assert stored is not None and stored["endedReason"] == "customer-ended-call"
    assert stored["assistantId"] == assistant["id"] and stored["phoneNumberId"] == number["id"]
    assert h.flow.active() == []


async def test_unknown_number_is_rejected_with_404(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness()
    call = h.flow.offer(facts("nobody"), h.pbx)
    assert call is not None
    assert await h.pbx.wait_for("reject") == 404
    report = await h.ended(call.id)
    assert report["endedReason"] == "call.start.error-get-phone-number"
    assert "connect_media" not in h.pbx.names()
    assert h.metrics.calls_total.labels("rejected")._value.get() == 1


async def test_assistant_that_was_deleted(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness()
    assistant = await h.assistant()
    await h.number(assistantId=assistant["id"])
    await h.resources.delete("assistant", assistant["id"])
    call = h.flow.offer(facts(), h.pbx)
    assert call is not None
    assert await h.pbx.wait_for("reject") == 480
    assert (await h.ended(call.id))["endedReason"] == "assistant-not-found"


async def test_neither_assistant_nor_server(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness(default_server=False)
    await h.number()
    call = h.flow.offer(facts(), h.pbx)
    assert call is not None
    assert await h.pbx.wait_for("reject") == 480
    assert call.ended_reason is EndedReason.NEITHER_ASSISTANT_NOR_SERVER


async def test_assistant_request_carries_the_invite_and_picks_the_assistant(
    make_harness: Callable[..., Any],
) -> None:
    h: Harness = await make_harness()
    assistant = await h.assistant(firstMessage="Hi {{first_name}} ({{plan}})")
    await h.number(server={"url": h.sink.url, "secret": "number-secret"})
    h.sink.answer(
        {"assistantId": assistant["id"], "assistantOverrides": {"variableValues": {"plan": "gold"}}}
    )
    call = h.flow.offer(facts(), h.pbx)
    assert call is not None
    assert await h.pbx.wait_for("connect_media") == call.id
    request = await h.sink.wait_for_message("assistant-request")
    message = request.message
    assert request.headers["x-vapi-secret"] == "number-secret"
    assert message["customer"] == {"number": "+15551230000", "name": "John Doe"}
    assert message["call"]["phoneCallProviderDetails"]["sip"]["headers"]["X-First_Name"] == "John"
    assert message["call"]["assistantOverrides"]["variableValues"]["account-id"] == "42"
    assert "account_id" not in message["call"]["assistantOverrides"]["variableValues"]
    assert message["phoneNumber"]["sipUri"] == "sip:alice@sip.example.com"
    assert "secret" not in message["phoneNumber"]["server"]
    assert call.assistant is not None and call.assistant["firstMessage"] == "Hi John (gold)"
    assert call.assistant_id == assistant["id"]


async def test_inline_assistant_answer(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness()
    await h.number()
    h.sink.answer(
        {
            "assistant": {
                "firstMessage": "Hey {{customerName}}",
                "sipbridge": {"pipeline": {"url": "ws://127.0.0.1:9/inline"}},
            },
            "assistantOverrides": {"variableValues": {"customerName": "Ryan"}},
        }
    )
    call = h.flow.offer(facts(), h.pbx)
    assert call is not None
    await h.pbx.wait_for("connect_media")
    assert call.assistant is not None and call.assistant["firstMessage"] == "Hey Ryan"
    assert call.assistant["sipbridge"]["pipeline"]["url"] == "ws://127.0.0.1:9/inline"


async def test_destination_answer_transfers(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness()
    await h.number()
    h.sink.answer(
        {
            "destination": {
                "type": "sip",
                "sipUri": "sip:support@pbx.example.com",
                "sipHeaders": {"X-Account": "gold"},
            }
        }
    )
    call = h.flow.offer(facts(), h.pbx)
    assert call is not None
    destination = await h.pbx.wait_for("transfer")
    assert destination["sipUri"] == "sip:support@pbx.example.com"
    assert destination["sipHeaders"] == {"X-Account": "gold"}
    report = await h.ended(call.id)
    assert report["endedReason"] == "assistant-request-returned-forwarding-phone-number"
    assert report["destination"]["sipUri"] == "sip:support@pbx.example.com"
    assert [m["status"] for m in h.sink.messages("status-update")] == [
        "ringing",
        "forwarding",
        "ended",
    ]


async def test_error_answer_rejects_with_603(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness()
    await h.number(fallbackDestination={"type": "number", "number": "+14155550000"})
    h.sink.answer({"error": "Sorry, not enough credits."})
    call = h.flow.offer(facts(), h.pbx)
    assert call is not None
    assert await h.pbx.wait_for("reject") == 603
    assert call.ended_message == "Sorry, not enough credits."
    assert "transfer" not in h.pbx.names()


async def test_silent_server_goes_to_the_fallback_within_the_budget(
    make_harness: Callable[..., Any],
) -> None:
    h: Harness = await make_harness(budget_s=0.5)
    await h.number(fallbackDestination={"type": "sip", "sipUri": "sip:operator@pbx.example.com"})
    h.sink.answer(hang=True)
    loop = asyncio.get_running_loop()
    started = loop.time()
    call = h.flow.offer(facts(), h.pbx)
    assert call is not None
    destination = await h.pbx.wait_for("transfer")
    assert destination["sipUri"] == "sip:operator@pbx.example.com"
    report = await h.ended(call.id)  # the transfer is done once the PBX has taken it
    assert report["endedReason"] == EndedReason.ASSISTANT_REQUEST_FAILED.value
    assert loop.time() - started >= 0.5


async def test_broken_answer_without_fallback_rejects(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness()
    await h.number()
    h.sink.answer(raw=b"<html>oops</html>")
    call = h.flow.offer(facts(), h.pbx)
    assert call is not None
    assert await h.pbx.wait_for("reject") == 480
    assert call.ended_reason is EndedReason.ASSISTANT_REQUEST_FAILED


async def test_caller_hangs_up_while_the_server_thinks(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness(budget_s=5)
    await h.number()
    h.sink.answer(hang=True)
    call = h.flow.offer(facts(), h.pbx)
    assert call is not None
    await h.sink.wait_for_message("assistant-request")
    h.flow.hung_up("test", call.facts.pbx_call_id)
    report = await h.ended(call.id)
    assert report["endedReason"] == "call.ringing.sip-inbound-caller-hungup-before-call-connect"
    assert h.pbx.actions == []  # nothing is done to a call that is gone
    assert h.metrics.calls_total.labels("abandoned")._value.get() == 1


async def test_pbx_failures_end_the_call_with_a_reason(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness()
    assistant = await h.assistant()
    await h.number(assistantId=assistant["id"])
    h.pbx.fail = {"connect_media"}
    call = h.flow.offer(facts(), h.pbx)
    assert call is not None
    await h.pbx.wait_for("hangup")
    assert call.ended_reason is EndedReason.SIP_INBOUND_FAILED_TO_CONNECT

    h2: Harness = await make_harness()
    await h2.number()
    h2.pbx.fail = {"transfer"}
    h2.sink.answer({"destination": {"type": "number", "number": "+14155550000"}})
    call2 = h2.flow.offer(facts(), h2.pbx)
    assert call2 is not None
    await h2.pbx.wait_for("hangup")
    assert call2.ended_reason is EndedReason.TRANSFER_FAILED


async def test_media_that_never_connects(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness(media_timeout_s=0.2)
    assistant = await h.assistant()
    await h.number(assistantId=assistant["id"])
    call = h.flow.offer(facts(), h.pbx)
    assert call is not None
    await h.pbx.wait_for("hangup")
    assert call.ended_reason is EndedReason.MEDIA_NEVER_CONNECTED


async def test_max_duration_timer_follows_the_assistant(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness()
    assistant = await h.assistant(maxDurationSeconds=45)
    await h.number(assistantId=assistant["id"])
    call = h.flow.offer(facts(), h.pbx)
    assert call is not None
    await h.sink.wait_for_message("status-update", status="in-progress")
    live = h.flow._by_id[call.id]
    remaining = [timer.when() - asyncio.get_running_loop().time() for timer in live.timers]
    assert len(remaining) == 1 and 44 < remaining[0] <= 45
    h.flow._expire(live, EndedReason.EXCEEDED_MAX_DURATION)
    await h.pbx.wait_for("hangup")
    assert (await h.ended(call.id))["endedReason"] == "exceeded-max-duration"


async def test_operator_hangup(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness()
    assistant = await h.assistant()
    await h.number(assistantId=assistant["id"])
    call = h.flow.offer(facts(), h.pbx)
    assert call is not None
    await h.pbx.wait_for("connect_media")
    assert await h.flow.hangup(call.id)
    assert await h.pbx.wait_for("hangup") == call.facts.pbx_call_id
    assert call.ended_reason is EndedReason.MANUALLY_CANCELED
    assert not await h.flow.hangup(call.id)
    h.flow.hung_up("test", call.facts.pbx_call_id)  # the PBX's own report changes nothing
    assert call.ended_reason is EndedReason.MANUALLY_CANCELED


async def test_store_failure_rejects_new_calls_with_503(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness()
    await h.store.aclose()
    call = h.flow.offer(facts(), h.pbx)
    assert call is not None
    assert await h.pbx.wait_for("reject") == 503
    assert call.ended_reason is EndedReason.START_ERROR_DATABASE


async def test_slow_webhooks_never_hold_up_a_call(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness()
    assistant = await h.assistant()
    await h.number(assistantId=assistant["id"])
    h.sink.default.hang = True  # every status update hangs until its timeout
    call = h.flow.offer(facts(), h.pbx)
    assert call is not None
    assert await h.pbx.wait_for("connect_media", timeout=1.0) == call.id


async def test_duplicate_offers_and_draining(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness()
    assistant = await h.assistant()
    await h.number(assistantId=assistant["id"])
    offered = facts()
    assert h.flow.offer(offered, h.pbx) is not None
    assert h.flow.offer(offered, h.pbx) is None
    await h.pbx.wait_for("connect_media")
    h.flow.draining = True
    late = h.flow.offer(facts(), h.pbx)
    assert late is not None
    assert await h.pbx.wait_for("reject") == 503
    assert late.ended_reason is EndedReason.WORKER_SHUTDOWN


async def test_admission_refuses_calls_beyond_the_limits_with_503(
    make_harness: Callable[..., Any],
) -> None:
    """[performance] overload: a call beyond max_calls, or offered while the event loop runs
    late, is refused before any webhook or pipeline; the calls already up are untouched."""
    lag = [0.0]
    h: Harness = await make_harness(
        max_calls=1, max_event_loop_lag_s=0.15, event_loop_lag=lambda: lag[0]
    )
    assistant = await h.assistant()
    await h.number(assistantId=assistant["id"])
    first = h.flow.offer(facts(), h.pbx)
    assert first is not None
    await h.pbx.wait_for("connect_media")
    second = h.flow.offer(facts(), h.pbx)
    assert second is not None
    assert await h.pbx.wait_for("reject") == 503
    await h.ended(second.id)
    assert second.ended_reason is EndedReason.CONCURRENCY_LIMIT_REACHED
    assert "service.max_calls = 1" in (second.ended_message or "")
    assert h.metrics.calls_refused_total.labels("max_calls")._value.get() == 1
    h.flow.post(CallGone("test", first.facts.pbx_call_id, by_caller=True))
    await h.ended(first.id)
    lag[0] = 0.4  # the machine is saturated
    third = h.flow.offer(facts(), h.pbx)
    assert third is not None
    await h.ended(third.id)
    assert third.ended_reason is EndedReason.CONCURRENCY_LIMIT_REACHED
    assert "event loop runs 400 ms late" in (third.ended_message or "")
    assert h.metrics.calls_refused_total.labels("event_loop_lag")._value.get() == 1
    lag[0] = 0.01  # and calm again: calls are taken
    fourth = h.flow.offer(facts(), h.pbx)
    assert fourth is not None
    assert await h.pbx.wait_for("connect_media", nth=2) == fourth.id
    # connect_media is recorded when it is called; the call is up once the PBX answered.
    await h.status(fourth.id, "in-progress")
    assert first.status is CallStatus.ENDED and fourth.status is CallStatus.IN_PROGRESS
    # The refused calls never got as far as the media: two connects, for the first and fourth.
    assert h.pbx.names().count("connect_media") == 2


async def test_shutdown_hangs_up_live_calls(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness()
    assistant = await h.assistant()
    await h.number(assistantId=assistant["id"])
    call = h.flow.offer(facts(), h.pbx)
    assert call is not None
    await h.pbx.wait_for("connect_media")
    await h.flow.aclose()
    assert h.pbx.names()[-1] == "hangup"
    assert call.ended_reason is EndedReason.WORKER_SHUTDOWN
    assert h.flow.active() == []


async def test_calls_a_previous_run_left_live_are_settled_once(
    make_harness: Callable[..., Any],
) -> None:
    """A crashed sipbridge's in-progress record: ended worker-died, reported, hung up."""
    h: Harness = await make_harness()
    assistant = await h.assistant()
    number = await h.number(assistantId=assistant["id"])
    call = h.flow.offer(facts(), h.pbx)
    assert call is not None
    await h.sink.wait_for_message("status-update", status="in-progress")
    left = call.to_json()  # what the store held when the process died
    ended = dict(left, id="already-ended", status="ended")
    settled = await h.flow.settle_left_over([left, ended, {"id": "garbage"}])
    assert settled == 1
    report = (await h.sink.wait_for_message("end-of-call-report")).message
    assert report["call"]["id"] == call.id
    assert report["endedReason"] == "call.in-progress.error-vapifault-worker-died"
    assert report["phoneNumber"]["id"] == number["id"]  # reloaded: its server is known again
    assert await h.pbx.wait_for("hangup") == call.facts.pbx_call_id
    assert len(h.sink.messages("end-of-call-report")) == 1


async def test_hanging_up_while_a_transfer_is_tried_is_not_a_forwarded_call(
    make_harness: Callable[..., Any],
) -> None:
    """A transfer is done only once the PBX knows it worked: FreeSWITCH may ring the
    destination for a minute, and the caller may give up meanwhile (the backend then fails the
    transfer as the channel ends)."""
    h: Harness = await make_harness()
    await h.number()
    h.sink.answer({"destination": {"type": "number", "number": "+15557654321"}})
    ringing = asyncio.Event()
    channel_ended = asyncio.Event()

    async def the_destination_rings() -> None:
        ringing.set()
        await channel_ended.wait()
        raise PbxActionError("the channel ended during the transfer")

    h.pbx.during_transfer = the_destination_rings
    call = h.flow.offer(facts(), h.pbx)
    assert call is not None
    await ringing.wait()
    assert call.status is CallStatus.FORWARDING
    channel_ended.set()
    h.flow.hung_up("test", call.facts.pbx_call_id, by_caller=True)
    report = await h.ended(call.id)
    assert report["endedReason"] == "customer-ended-call-during-transfer"


async def test_a_transfer_answered_before_the_channel_ended_is_a_forwarded_call(
    make_harness: Callable[..., Any],
) -> None:
    """AMI answers the Redirect, then reports the channel's Hangup (a destination that answers
    and hangs up at once, or fails at once): both may reach the flow before the transfer's
    awaited answer does. The PBX's order decides, not the event loop's."""
    h: Harness = await make_harness()
    await h.number()
    h.sink.answer({"destination": {"type": "sip", "sipUri": "sip:support@pbx.example.com"}})
    call_box: list[Call] = []

    async def answered_then_gone() -> None:
        h.flow.hung_up("test", call_box[0].facts.pbx_call_id, by_caller=True)

    h.pbx.during_transfer = answered_then_gone
    call = h.flow.offer(facts(), h.pbx)
    assert call is not None
    call_box.append(call)
    report = await h.ended(call.id)
    assert report["endedReason"] == "assistant-request-returned-forwarding-phone-number"
    assert "hangup" not in h.pbx.names()


async def test_a_transfer_the_pbx_never_settles_after_the_channel_ended_ends_the_call(
    make_harness: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend should settle a transfer as its channel ends; one that does not is given up on
    within a bound, and the call ends the way the PBX said."""
    monkeypatch.setattr(callflow, "TRANSFER_SETTLE_S", 0.05)
    h: Harness = await make_harness()
    await h.number()
    h.sink.answer({"destination": {"type": "number", "number": "+15557654321"}})
    ringing = asyncio.Event()

    async def the_destination_rings_forever() -> None:
        ringing.set()
        await asyncio.Event().wait()

    h.pbx.during_transfer = the_destination_rings_forever
    call = h.flow.offer(facts(), h.pbx)
    assert call is not None
    await ringing.wait()
    h.flow.hung_up("test", call.facts.pbx_call_id, by_caller=True)
    report = await h.ended(call.id)
    assert report["endedReason"] == "customer-ended-call-during-transfer"


# ---- outbound calls (POST /call) ----------------------------------------------------------------


async def outbound_resources(h: Harness) -> tuple[dict[str, Any], dict[str, Any]]:
    assistant = await h.resources.create(
        "assistant", {"name": "Out", "firstMessage": "Hi {{customer.name}}, {{offer}}"}
    )
    number = await h.resources.create(
        "phone_number",
        {"sipUri": "sip:+15550100@pbx.example.com", "name": "Acme", "assistantId": assistant["id"]},
    )
    return assistant, number


def outbound_body(
    assistant: dict[str, Any], number: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    return {
        "assistantId": assistant["id"],
        "phoneNumberId": number["id"],
        "customer": {"number": "+15557654321", "name": "Ada"},
        **extra,
    }


async def test_an_outbound_call_is_dialled_answered_then_ended_by_the_customer(
    make_harness: Callable[..., Any],
) -> None:
    h: Harness = await make_harness()
    assistant, number = await outbound_resources(h)
    call = await h.flow.create_outbound(
        outbound_body(
            assistant,
            number,
            assistantOverrides={"variableValues": {"offer": "a spring deal"}},
            sipbridge={"sipHeaders": {"X-Campaign": "spring"}},
        ),
        h.pbx,
    )
    assert call.status is CallStatus.QUEUED and call.facts.outbound
    call_id, dial = await h.pbx.wait_for("originate")
    assert call_id == call.id == call.facts.pbx_call_id
    assert dial.customer == {"type": "number", "number": "+15557654321"}
    assert (dial.caller_id, dial.caller_name) == ("+15550100", "Acme")
    assert dial.headers == (("X-Campaign", "spring"),)
    await h.status(call.id, "ringing")
    leg = MemoryLeg()
    h.flow.post(LegConnected(call.id, leg))
    await h.status(call.id, "in-progress")
    h.flow.post(CallGone("test", call.id))
    report = await h.ended(call.id)
    assert report["endedReason"] == "customer-ended-call"
    record = report["call"]
    assert (record["type"], record["phoneNumberId"]) == ("outboundPhoneCall", number["id"])
    assert record["customer"] == {"number": "+15557654321", "name": "Ada"}
    assert record["assistant"]["firstMessage"] == "Hi Ada, a spring deal"
    assert record["assistantOverrides"]["variableValues"]["offer"] == "a spring deal"
    assert record["phoneCallProviderDetails"]["sip"]["uri"] == "sip:+15557654321@pbx.example.com"
    statuses = [m["status"] for m in h.sink.messages("status-update") if m["call"]["id"] == call.id]
    assert statuses == ["queued", "ringing", "in-progress", "ended"]
    await leg.wait_closed()


@pytest.mark.parametrize(
    ("gone", "reason"),
    [
        (
            CallGone(
                "test",
                "x",
                cause=17,
                dial_status="BUSY",
                sip_status=486,
                detail="SIP 486 Busy Here",
            ),
            EndedReason.CUSTOMER_BUSY,
        ),
        (
            CallGone("test", "x", cause=19, dial_status="NOANSWER"),
            EndedReason.CUSTOMER_DID_NOT_ANSWER,
        ),
        (
            CallGone(
                "test",
                "x",
                cause=21,
                dial_status="CONGESTION",
                sip_status=403,
                detail="SIP 403 Forbidden",
            ),
            EndedReason.OUTBOUND_SIP_403,
        ),
        (
            CallGone("test", "x", cause=34, dial_status="CHANUNAVAIL"),
            EndedReason.SIP_OUTBOUND_FAILED_TO_CONNECT,
        ),
    ],
)
async def test_an_unanswered_outbound_call_ends_with_the_pbxs_reason(
    make_harness: Callable[..., Any], gone: CallGone, reason: EndedReason
) -> None:
    h: Harness = await make_harness()
    assistant, number = await outbound_resources(h)
    call = await h.flow.create_outbound(outbound_body(assistant, number), h.pbx)
    await h.status(call.id, "ringing")
    h.flow.post(
        CallGone(
            "test",
            call.id,
            cause=gone.cause,
            dial_status=gone.dial_status,
            sip_status=gone.sip_status,
            detail=gone.detail,
        )
    )
    report = await h.ended(call.id)
    assert report["endedReason"] == reason.value
    assert report["call"]["sipbridge"]["sipStatus"] == gone.sip_status
    assert report["call"].get("endedMessage") == (gone.detail or f"dial status {gone.dial_status}")
    assert "hangup" not in h.pbx.names()  # the PBX ended it: nothing left to hang up


async def test_an_operator_cancels_a_ringing_outbound_call(
    make_harness: Callable[..., Any],
) -> None:
    h: Harness = await make_harness()
    assistant, number = await outbound_resources(h)
    call = await h.flow.create_outbound(outbound_body(assistant, number), h.pbx)
    await h.status(call.id, "ringing")
    assert await h.flow.hangup(call.id)
    assert await h.pbx.wait_for("hangup") == call.id
    assert (await h.ended(call.id))["endedReason"] == "manually-canceled"


async def test_a_dial_the_pbx_refuses_ends_the_call(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness()
    h.pbx.fail.add("originate")
    assistant, number = await outbound_resources(h)
    call = await h.flow.create_outbound(outbound_body(assistant, number), h.pbx)
    report = await h.ended(call.id)
    assert report["endedReason"] == EndedReason.SIP_OUTBOUND_FAILED_TO_CONNECT.value
    assert "originate failed" in report["call"]["endedMessage"]


async def test_outbound_caps_refuse_with_429_and_bad_requests_with_400(
    make_harness: Callable[..., Any],
) -> None:
    h: Harness = await make_harness(outbound_max_concurrent=2, outbound_max_calls_per_second=1)
    assistant, number = await outbound_resources(h)
    await h.flow.create_outbound(outbound_body(assistant, number), h.pbx)
    with pytest.raises(CallRefused) as too_fast:
        await h.flow.create_outbound(outbound_body(assistant, number), h.pbx)
    assert too_fast.value.status == 429 and "max_calls_per_second" in str(too_fast.value)
    with pytest.raises(ValidationFailed) as unknown:
        await h.flow.create_outbound(
            {**outbound_body(assistant, number), "phoneNumberId": "nope"}, h.pbx
        )
    assert unknown.value.problems == ["phoneNumberId: no phone number 'nope'"]
    h.pbx.fail.add("check_dial")
    with pytest.raises(ValidationFailed) as undiallable:
        await h.flow.create_outbound(outbound_body(assistant, number), h.pbx)
    assert undiallable.value.problems == ["customer: cannot be dialled: scripted: cannot dial"]
    h.pbx.fail.discard("check_dial")
    named = await h.resources.create(
        "phone_number", {"sipUri": "sip:sales.team@pbx.example.com", "assistantId": assistant["id"]}
    )
    with pytest.raises(ValidationFailed) as no_caller_id:
        await h.flow.create_outbound(outbound_body(assistant, named), h.pbx)
    assert "no caller id" in no_caller_id.value.problems[0]


async def test_a_customer_who_answers_and_hangs_up_at_once_ended_the_call(
    make_harness: Callable[..., Any],
) -> None:
    """The answer (the leg) and the hangup can reach the flow before its task takes the
    answer in: still the customer's hangup, and the leg is closed."""
    h: Harness = await make_harness()
    assistant, number = await outbound_resources(h)
    call = await h.flow.create_outbound(outbound_body(assistant, number), h.pbx)
    await h.status(call.id, "ringing")
    leg = MemoryLeg()
    h.flow.post(LegConnected(call.id, leg))
    h.flow.post(CallGone("test", call.id))  # in the same loop iteration
    assert (await h.ended(call.id))["endedReason"] == "customer-ended-call"
    await leg.wait_closed()
