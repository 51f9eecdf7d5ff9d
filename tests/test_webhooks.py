from __future__ import annotations

import asyncio
import hashlib
import hmac
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge.messages import WebhookTarget
from bridge.metrics import Metrics
from bridge.routing import ASSISTANT_REQUEST_BUDGET_S
from bridge.settings import TlsSettings, WebhookSettings
from bridge.tls import client_context
from bridge.webhooks import (
    MAX_ANSWER_BYTES,
    WebhookClient,
    WebhookDispatcher,
    encode_payload,
    open_session,
    request_headers,
    signature,
)
from tests.webhook_sink import WebhookSink


def settings(**values: Any) -> WebhookSettings:
    base: dict[str, Any] = {"retry_base_delay_s": 0.01}
    base.update(values)
    return WebhookSettings(**base)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as opened:
        yield opened


def verify(headers: dict[str, str], body: bytes, secret: str) -> bool:
    """What a receiving server does to check a message."""
    timestamp = headers["x-timestamp"]
    expected = hmac.new(
        secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(expected, headers["x-signature"])


def test_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    body = b'{"message":{"type":"status-update"}}'
    assert (
        signature("s3cret", 1700000000, body)
        == hmac.new(b"s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    )


def test_headers_with_and_without_secrets() -> None:
    body = encode_payload({"message": {"type": "x"}})
    target = WebhookTarget(
        "https://h", secret="s1", headers={"X-Custom": "1", "x-signature": "forged"}
    )
    headers = request_headers(target, body, "m1", settings(), 1700000000.5)
    assert headers["x-vapi-secret"] == "s1"
    assert headers["x-message-id"] == "m1"
    assert headers["X-Custom"] == "1"
    assert headers["x-timestamp"] == "1700000000"
    assert headers["x-signature"] == signature("s1", 1700000000, body)
    plain = request_headers(WebhookTarget("https://h"), body, "m2", settings(), 1.0)
    assert "x-signature" not in plain and "x-vapi-secret" not in plain
    service_wide = request_headers(
        WebhookTarget("https://h"), body, "m3", settings(signing_secret="svc"), 5.0
    )
    assert service_wide["x-signature"] == signature("svc", 5, body)
    assert "x-vapi-secret" not in service_wide
    renamed = request_headers(
        WebhookTarget("https://h", secret="s"),
        body,
        "m4",
        settings(
            signature_header="X-Sig", timestamp_header="X-Ts", message_id_header="Idempotency-Key"
        ),
        7.0,
    )
    assert {"X-Sig", "X-Ts", "Idempotency-Key"} <= set(renamed)


def test_server_headers_never_duplicate_ours_in_another_case() -> None:
    body = encode_payload({"message": {"type": "x"}})
    target = WebhookTarget(
        "https://h",
        secret="real",
        headers={"X-Vapi-Secret": "forged", "content-type": "text/plain", "X-Signature": "f"},
    )
    headers = request_headers(target, body, "m1", settings(), 9.0)
    lowered = [name.lower() for name in headers]
    assert len(lowered) == len(set(lowered)), headers
    assert headers["x-vapi-secret"] == "real"
    assert headers["Content-Type"] == "application/json"
    assert headers["x-signature"] == signature("real", 9, body)


async def test_a_receiver_can_verify_what_arrives(
    sink: WebhookSink, session: aiohttp.ClientSession
) -> None:
    client = WebhookClient(session, settings(), Metrics())
    result = await client.post(
        WebhookTarget(sink.url, secret="shared"),
        encode_payload({"message": {"type": "status-update", "status": "ringing"}}),
        message_type="status-update",
        message_id="m1",
        timeout_s=5,
    )
    assert result.status == 200
    received = sink.requests[0]
    headers = {k.lower(): v for k, v in received.headers.items()}
    assert verify(headers, received.body, "shared")
    assert headers["x-vapi-secret"] == "shared"
    assert headers["content-type"] == "application/json"


async def test_client_failures_are_described_not_raised(
    sink: WebhookSink, session: aiohttp.ClientSession
) -> None:
    metrics = Metrics()
    client = WebhookClient(session, settings(), metrics)
    sink.answer(hang=True)
    timed_out = await client.post(
        WebhookTarget(sink.url), b"{}", message_type="t", message_id="m", timeout_s=0.2
    )
    assert timed_out.status is None and timed_out.failure == "no answer within 0.2 s"
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    refused = await client.post(
        WebhookTarget(f"http://127.0.0.1:{port}/x"),
        b"{}",
        message_type="t",
        message_id="m",
        timeout_s=2,
    )
    assert refused.status is None and refused.failure is not None
    sink.answer(raw=b"x" * (MAX_ANSWER_BYTES + 10))
    large = await client.post(
        WebhookTarget(sink.url), b"{}", message_type="t", message_id="m", timeout_s=5
    )
    assert large.status is None and "larger than" in (large.failure or "")
    text = metrics.render().decode()
    assert 'sipbridge_webhook_seconds_count{result="timeout",type="t"} 1.0' in text
    assert 'sipbridge_webhook_seconds_count{result="connection_error",type="t"} 1.0' in text


async def test_assistant_request_budget(sink: WebhookSink, session: aiohttp.ClientSession) -> None:
    client = WebhookClient(session, settings(), Metrics())
    sink.answer(hang=True)
    result = await client.assistant_request(
        WebhookTarget(sink.url, timeout_s=300), {"message": {}}, budget_s=0.3
    )
    assert result.failure == "no answer within 0.3 s"


async def test_dispatcher_retries_5xx_with_the_same_message_id(
    sink: WebhookSink, session: aiohttp.ClientSession
) -> None:
    metrics = Metrics()
    dispatcher = WebhookDispatcher(WebhookClient(session, settings(), metrics), settings(), metrics)
    dispatcher.start()
    sink.answer(status=503)
    sink.answer(status=500)
    assert dispatcher.submit(
        "c1", WebhookTarget(sink.url), {"message": {"type": "status-update"}}, "status-update"
    )
    received = await sink.wait_for(lambda rs: len(rs) == 3)
    ids = {r.headers["x-message-id"] for r in received}
    assert len(ids) == 1
    assert await dispatcher.drain(5)
    await dispatcher.aclose()


async def test_dispatcher_does_not_retry_4xx_and_gives_up_after_max_retries(
    sink: WebhookSink, session: aiohttp.ClientSession
) -> None:
    metrics = Metrics()
    config = settings(max_retries=2)
    dispatcher = WebhookDispatcher(WebhookClient(session, config, metrics), config, metrics)
    dispatcher.start()
    sink.answer(status=401)
    dispatcher.submit("c1", WebhookTarget(sink.url), {"n": 1}, "status-update")
    assert await dispatcher.drain(5)
    assert len(sink.requests) == 1
    assert metrics.webhook_dropped_total.labels("rejected")._value.get() == 1
    sink.default.status = 500
    dispatcher.submit("c2", WebhookTarget(sink.url), {"n": 2}, "status-update")
    assert await dispatcher.drain(5)
    assert len(sink.requests) == 1 + 3
    assert metrics.webhook_dropped_total.labels("retries_exhausted")._value.get() == 1
    await dispatcher.aclose()


async def test_messages_of_one_call_stay_in_order_and_calls_do_not_wait_for_each_other(
    sink: WebhookSink, session: aiohttp.ClientSession
) -> None:
    config = settings(max_retries=3, concurrency=4)
    metrics = Metrics()
    dispatcher = WebhookDispatcher(WebhookClient(session, config, metrics), config, metrics)
    dispatcher.start()
    slow = WebhookTarget(sink.url, timeout_s=0.5)
    sink.answer(hang=True)  # c1's first message times out once, then is retried
    for step in range(3):
        dispatcher.submit("c1", slow, {"call": "c1", "step": step}, "status-update")
    dispatcher.submit("c2", slow, {"call": "c2", "step": 0}, "status-update")
    await sink.wait_for(lambda rs: any(r.json == {"call": "c2", "step": 0} for r in rs))
    c1_steps_so_far = [r.json["step"] for r in sink.requests if r.json["call"] == "c1"]
    assert c1_steps_so_far == [0]  # c2 went through while c1's first message hung
    assert await dispatcher.drain(10)
    c1_steps = [r.json["step"] for r in sink.requests if r.json["call"] == "c1"]
    assert c1_steps == [0, 0, 1, 2]
    await dispatcher.aclose()


async def test_full_queue_drops_and_counts(
    sink: WebhookSink, session: aiohttp.ClientSession
) -> None:
    config = settings(max_pending=1)
    metrics = Metrics()
    dispatcher = WebhookDispatcher(WebhookClient(session, config, metrics), config, metrics)
    assert dispatcher.submit("c1", WebhookTarget(sink.url), {}, "status-update")
    assert not dispatcher.submit("c1", WebhookTarget(sink.url), {}, "end-of-call-report")
    assert metrics.webhook_dropped_total.labels("queue_full")._value.get() == 1
    dispatcher.start()
    await dispatcher.aclose()
    assert len(sink.requests) == 1


async def test_https_server_urls_are_verified_against_the_system_and_the_private_ca(
    tls_sink: WebhookSink, ca_file: Path
) -> None:
    payload = encode_payload({"message": {"type": "status-update"}})
    for ca, expected in ((ca_file, 200), (None, None)):
        async with open_session(
            WebhookSettings(), client_context(TlsSettings(ca_file=ca))
        ) as verifying:
            client = WebhookClient(verifying, settings(), Metrics())
            result = await client.post(
                WebhookTarget(tls_sink.url), payload, message_type="t", message_id="m", timeout_s=5
            )
        assert result.status == expected
        if expected is None:
            assert result.failure == (
                "certificate verify failed: unable to get local issuer certificate "
                "(a private CA goes in tls.ca_file)"
            )
    assert len(tls_sink.requests) == 1  # the unverified server was never sent the message


async def test_the_assistant_request_budget_is_exact(
    sink: WebhookSink, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Vapi's 7.5 s, not aiohttp's whole-second rounding above 5 s (8-8.5 s before).

    The loop's clock is watched (every reading, every timer set), then moved past the deadline
    so that the test does not wait 7.5 s for the request to be abandoned.
    """
    loop = asyncio.get_running_loop()
    real_time = loop.time
    shift = 0.0
    readings: list[float] = []
    deadlines: list[float] = []
    real_call_at = loop.call_at

    def watched_time() -> float:
        readings.append(real_time() + shift)
        return readings[-1]

    def watched_call_at(when: float, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        deadlines.append(when)
        return real_call_at(when, *args, **kwargs)

    monkeypatch.setattr(loop, "time", watched_time)
    monkeypatch.setattr(loop, "call_at", watched_call_at)
    client = WebhookClient(session, settings(), Metrics())
    sink.answer(hang=True)
    answer = asyncio.ensure_future(
        client.assistant_request(WebhookTarget(sink.url, timeout_s=300), {"message": {}})
    )
    await sink.wait_for(lambda requests: len(requests) == 1)
    budget = ASSISTANT_REQUEST_BUDGET_S
    exact = [when for when in deadlines if any(when == now + budget for now in readings)]
    assert exact, "no timer at exactly 7.5 s after a reading of the clock"
    shift = max(exact) - real_time() + 0.001  # now just past the deadline
    result = await answer
    assert result.status is None and result.failure == "no answer within 7.5 s"
