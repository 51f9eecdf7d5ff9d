"""Outbound calls end to end ([outbound] issue): ``POST /call`` → AMI ``Originate`` through the
project's dialplan (``sipbridge-outbound``) → a SIPp customer on loopback, real RTP both ways.

The customer plays 700 Hz once it answers; the pipeline answers with 1200 Hz. Audio is checked
by content on both sides: what the pipeline received, and the RTP the customer was sent.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import pytest

from bridge.audio import tone_share
from bridge.lab.sipp import CustomerPlan, SipCustomer, free_port
from tests.asterisk.test_asterisk_calls import reply_tone
from tests.asterisk_harness import API_KEY, AsteriskLab, share_of_windows
from tests.pipeline_server import PipelineSession

pytestmark = [pytest.mark.asterisk, pytest.mark.integration]


async def api(lab: AsteriskLab, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    assert lab.service is not None
    async with (
        aiohttp.ClientSession(
            base_url=f"http://127.0.0.1:{lab.service.api_port}",
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as http,
        http.request(method, path, json=body) as response,
    ):
        return response.status, await response.json(content_type=None)


async def outbound_lab(lab: AsteriskLab, **sections: dict[str, Any]) -> tuple[str, str]:
    """sipbridge on the lab's Asterisk with an assistant and the SIP number calls come from."""
    await lab.start_service(**sections)
    assistant = await lab.assistant(firstMessage="Hello {{first_name}}, this is {{company}}")
    number = await lab.number(assistantId=assistant["id"], name="Acme Support")
    return assistant["id"], number["id"]


async def place(
    lab: AsteriskLab, assistant_id: str, number_id: str, customer: SipCustomer, **extra: Any
) -> dict[str, Any]:
    status, call = await api(
        lab,
        "POST",
        "/call",
        {
            "assistantId": assistant_id,
            "phoneNumberId": number_id,
            "customer": {"sipUri": customer.uri, "name": "Ada Lovelace"},
            **extra,
        },
    )
    assert status == 201, call
    assert (call["type"], call["status"]) == ("outboundPhoneCall", "queued")
    return call


async def test_an_answered_call_talks_both_ways_with_its_headers_and_variables(
    asterisk_lab: AsteriskLab,
) -> None:
    lab = asterisk_lab
    lab.pipeline.script = reply_tone(1200, 6.0)  # type: ignore[assignment]
    assistant_id, number_id = await outbound_lab(lab)
    customer = SipCustomer(lab.tmp / "customer", free_port())
    await customer.start(CustomerPlan(tone_file=lab.tone_file(700, 4.0), hangs_up_after_ms=4000))
    rtp = lab.capture(customer.media_port)
    try:
        call = await place(
            lab,
            assistant_id,
            number_id,
            customer,
            assistantOverrides={"variableValues": {"first_name": "Ada", "company": "Acme"}},
            sipbridge={"sipHeaders": {"X-Campaign": "spring-2027"}},
        )
        session: PipelineSession = await lab.pipeline.session(timeout=20)
        code, trace = await asyncio.wait_for(customer.wait(), 30)
    finally:
        rtp.stop()
        await customer.stop()
    assert code == 0, trace[-2000:]
    # The INVITE the customer got: the X- header, the SIP number as caller id and name.
    invite = trace[trace.index("INVITE sip:customer@") :]
    assert re.search(r"(?im)^X-Campaign: spring-2027\r?$", invite), invite[:1500]
    assert re.search(r'(?im)^From: "Acme Support" <sip:demo@', invite), invite[:1500]
    start = session.start
    assert start is not None and start["callId"] == call["id"]
    assert start["callType"] == "outboundPhoneCall"
    assert start["assistant"]["firstMessage"] == "Hello Ada, this is Acme"
    assert start["customer"] == {"sipUri": customer.uri, "name": "Ada Lovelace"}
    report = (await lab.sink.wait_for_message("end-of-call-report")).message
    assert report["call"]["id"] == call["id"]
    assert report["endedReason"] == "customer-ended-call"
    statuses = [
        m["status"] for m in lab.sink.messages("status-update") if m["call"]["id"] == call["id"]
    ]
    assert statuses == ["queued", "ringing", "in-progress", "ended"]
    # The customer's 700 Hz reached the pipeline; the pipeline's 1200 Hz reached the customer.
    heard_by_pipeline = bytes(session.audio)
    assert tone_share(heard_by_pipeline[: 2 * 32000], 16000, 700) > 0.5
    fraction, count = share_of_windows(rtp.pcm(), 8000, 1200)
    assert count >= 3 and fraction >= 0.75, (fraction, count)
    status, record = await api(lab, "GET", f"/call/{call['id']}")
    assert status == 200 and record["customer"]["sipUri"] == customer.uri
    assert record["phoneCallProviderDetails"]["sip"]["uri"] == customer.uri
    assert await lab.no_channels_left() == []


@pytest.mark.parametrize(
    ("answer", "reason", "sip_status"),
    [("busy", "customer-busy", 486), ("decline", "customer-busy", 603)],
)
async def test_a_refused_call_ends_with_the_customers_answer(
    asterisk_lab: AsteriskLab, answer: Any, reason: str, sip_status: int
) -> None:
    lab = asterisk_lab
    assistant_id, number_id = await outbound_lab(lab)
    customer = SipCustomer(lab.tmp / "customer", free_port())
    await customer.start(CustomerPlan(answer=answer))
    try:
        call = await place(lab, assistant_id, number_id, customer)
        report = (await lab.sink.wait_for_message("end-of-call-report")).message
        code, trace = await asyncio.wait_for(customer.wait(), 30)
    finally:
        await customer.stop()
    assert code == 0, trace[-2000:]
    assert report["call"]["id"] == call["id"]
    assert report["endedReason"] == reason
    assert report["call"]["sipbridge"]["sipStatus"] == sip_status
    assert str(sip_status) in report["call"].get("endedMessage", "")
    assert lab.pipeline.sessions == []  # never answered: no pipeline was opened
    assert await lab.no_channels_left() == []


async def test_a_call_nobody_answers_ends_after_the_ring_timeout(
    asterisk_lab: AsteriskLab,
) -> None:
    lab = asterisk_lab
    assistant_id, number_id = await outbound_lab(lab, outbound={"ring_timeout_s": 2})
    customer = SipCustomer(lab.tmp / "customer", free_port())
    await customer.start(CustomerPlan(answer="no-answer"))
    try:
        call = await place(lab, assistant_id, number_id, customer)
        report = (await lab.sink.wait_for_message("end-of-call-report", timeout=30)).message
        code, trace = await asyncio.wait_for(customer.wait(), 30)
    finally:
        await customer.stop()
    assert code == 0, trace[-2000:]  # it was CANCELled
    assert report["call"]["id"] == call["id"]
    assert report["endedReason"] == "customer-did-not-answer"
    assert await lab.no_channels_left() == []


async def test_hanging_up_a_ringing_call_cancels_it_and_the_cap_refuses_a_second(
    asterisk_lab: AsteriskLab,
) -> None:
    lab = asterisk_lab
    assistant_id, number_id = await outbound_lab(lab, outbound={"max_concurrent": 1})
    customer = SipCustomer(lab.tmp / "customer", free_port())
    await customer.start(CustomerPlan(answer="no-answer"))
    try:
        call = await place(lab, assistant_id, number_id, customer)
        await lab.sink.wait_for_message("status-update", status="ringing")
        status, refused = await api(
            lab,
            "POST",
            "/call",
            {
                "assistantId": assistant_id,
                "phoneNumberId": number_id,
                "customer": {"sipUri": "sip:other@127.0.0.1:5999"},
            },
        )
        assert status == 429 and "outbound.max_concurrent = 1" in refused["message"]
        status, hung_up = await api(lab, "POST", f"/call/{call['id']}/hangup")
        assert status == 200 and hung_up["endedReason"] == "manually-canceled"
        code, trace = await asyncio.wait_for(customer.wait(), 30)
    finally:
        await customer.stop()
    assert code == 0, trace[-2000:]  # the customer's phone stopped ringing: a CANCEL
    assert "CANCEL sip:customer@" in trace
    assert await lab.no_channels_left() == []


async def test_the_assistant_ends_an_answered_call(asterisk_lab: AsteriskLab) -> None:
    lab = asterisk_lab

    async def script(session: PipelineSession) -> None:
        await session.wait_audio(16000)  # half a second of the customer
        await session.send_json({"type": "end-call", "reason": "assistant-ended-call"})

    lab.pipeline.script = script
    assistant_id, number_id = await outbound_lab(lab)
    customer = SipCustomer(lab.tmp / "customer", free_port())
    await customer.start(CustomerPlan(tone_file=lab.tone_file(700, 4.0)))
    try:
        call = await place(lab, assistant_id, number_id, customer)
        code, trace = await asyncio.wait_for(customer.wait(), 30)
    finally:
        await customer.stop()
    assert code == 0, trace[-2000:]
    assert re.search(r"message received[^\n]*\n+BYE ", trace)  # the customer got our BYE
    report = (await lab.sink.wait_for_message("end-of-call-report")).message
    assert (report["call"]["id"], report["endedReason"]) == (call["id"], "assistant-ended-call")
    assert await lab.no_channels_left() == []
