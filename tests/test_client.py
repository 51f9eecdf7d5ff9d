from __future__ import annotations

import asyncio

import pytest

from bridge.client import ApiClient
from bridge.errors import ApiClientError
from tests.webhook_sink import WebhookSink


async def test_requests_carry_the_key_and_decode_json(sink: WebhookSink) -> None:
    base = sink.url.removesuffix("/hook")
    sink.answer({"ok": True})
    result = await asyncio.to_thread(
        ApiClient(base, "k" * 16).request, "POST", "/x", {"a": 1}, {"limit": "5"}
    )
    assert result == {"ok": True}
    request = sink.requests[0]
    assert request.headers["Authorization"] == "Bearer " + "k" * 16
    assert request.json == {"a": 1}


async def test_error_answers_become_one_line(sink: WebhookSink) -> None:
    base = sink.url.removesuffix("/hook")
    client = ApiClient(base, None)
    sink.answer(
        {"message": ["name: too long", "maxDurationSeconds: too small"], "statusCode": 400},
        status=400,
    )
    with pytest.raises(ApiClientError) as caught:
        await asyncio.to_thread(client.request, "POST", "/assistant", {})
    assert str(caught.value) == "HTTP 400: name: too long; maxDurationSeconds: too small"
    assert caught.value.status_code == 400
    sink.answer(raw=b"<html>", status=502)
    with pytest.raises(ApiClientError, match="HTTP 502: Bad Gateway"):
        await asyncio.to_thread(client.request, "GET", "/assistant")
    sink.answer(raw=b"not json")
    with pytest.raises(ApiClientError, match="not JSON"):
        await asyncio.to_thread(client.request, "GET", "/assistant")
