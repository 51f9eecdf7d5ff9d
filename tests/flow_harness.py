"""A call flow with a real store and a real webhook server, for the flow's own tests."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge.callflow import CallFlow
from bridge.conversation import Conversations
from bridge.events import InviteFacts, invite_facts
from bridge.metrics import Metrics
from bridge.records import CallRecorder
from bridge.resources import Resources
from bridge.routing import RoutingDefaults
from bridge.settings import WebhookSettings
from bridge.store import Store
from bridge.webhooks import WebhookClient, WebhookDispatcher
from tests.fake_pbx import FakePbx
from tests.webhook_sink import WebhookSink


@dataclass
class Harness:
    flow: CallFlow
    resources: Resources
    store: Store
    recorder: CallRecorder
    dispatcher: WebhookDispatcher
    metrics: Metrics
    sink: WebhookSink
    pbx: FakePbx

    async def ended(self, call_id: str, timeout: float = 5.0) -> dict[str, Any]:
        """Waits for the call's end-of-call-report and returns its message."""

        def reports(recorded: list[Any]) -> list[dict[str, Any]]:
            return [
                r.message
                for r in recorded
                if r.message.get("type") == "end-of-call-report"
                and r.message["call"]["id"] == call_id
            ]

        return reports(await self.sink.wait_for(lambda found: bool(reports(found)), timeout))[0]

    async def status(self, call_id: str, status: str, timeout: float = 5.0) -> dict[str, Any]:
        """Waits for the call's status-update saying ``status`` and returns its message."""

        def updates(recorded: list[Any]) -> list[dict[str, Any]]:
            return [
                r.message
                for r in recorded
                if r.message.get("type") == "status-update"
                and r.message.get("status") == status
                and r.message["call"]["id"] == call_id
            ]

        return updates(await self.sink.wait_for(lambda found: bool(updates(found)), timeout))[0]

    async def assistant(self, **fields: Any) -> dict[str, Any]:
        body = {
            "name": "Support",
            "firstMessage": "Hello {{first_name}}, you've reached me over SIP.",
        }
        return await self.resources.create("assistant", {**body, **fields})

    async def number(self, **fields: Any) -> dict[str, Any]:
        return await self.resources.create(
            "phone_number", {"provider": "vapi", "sipUri": "sip:alice@sip.example.com", **fields}
        )


_ids = itertools.count(1)


def facts(user: str = "alice", **extra: Any) -> InviteFacts:
    values: dict[str, Any] = {
        "pbx": "test",
        "pbx_call_id": f"p{next(_ids)}",
        "channel": "chan",
        "request_user": user,
        "request_host": "sip.example.com",
        "from_number": "+15551230000",
        "from_name": "John Doe",
        "headers": [("X-First_Name", "John"), ("X-Account-Id", "42")],
    }
    values.update(extra)
    return invite_facts(**values)


@pytest.fixture
async def make_harness(tmp_path: Path, sink: WebhookSink) -> AsyncIterator[Callable[..., Any]]:
    opened: list[Harness] = []
    session = aiohttp.ClientSession()

    async def build(
        *,
        default_server: bool = True,
        media_timeout_s: float | None = None,
        budget_s: float = 2.0,
        conversations: Conversations | None = None,
        pipeline_fallback: bool = True,
        max_calls: int = 0,
        max_event_loop_lag_s: float = 0.0,
        event_loop_lag: Callable[[], float] = lambda: 0.0,
        outbound_max_concurrent: int = 0,
        outbound_max_calls_per_second: float = 0.0,
    ) -> Harness:
        store = Store(tmp_path / f"s{len(opened)}.sqlite3")
        await store.open()
        metrics = Metrics()
        config = WebhookSettings(retry_base_delay_s=0.01, max_retries=1, default_timeout_s=2)
        client = WebhookClient(session, config, metrics)
        dispatcher = WebhookDispatcher(client, config, metrics)
        dispatcher.start()
        recorder = CallRecorder(store, metrics)
        recorder.start()
        resources = Resources(store, lambda: datetime.now(UTC))
        flow = CallFlow(
            resources=resources,
            recorder=recorder,
            webhook_client=client,
            dispatcher=dispatcher,
            defaults=RoutingDefaults(
                pipeline_url="ws://127.0.0.1:9/pipe",
                default_server={"url": sink.url} if default_server else None,
                pipeline_fallback=pipeline_fallback,
                max_calls=max_calls,
                max_event_loop_lag_s=max_event_loop_lag_s,
                outbound_max_concurrent=outbound_max_concurrent,
                outbound_max_calls_per_second=outbound_max_calls_per_second,
            ),
            metrics=metrics,
            clock=lambda: datetime.now(UTC),
            org_id=await resources.org_id(),
            media_timeout_s=media_timeout_s,
            new_call_id=lambda: f"call-{next(_ids)}",
            conversations=conversations,
            assistant_request_budget_s=budget_s,
            event_loop_lag=event_loop_lag,
        )
        pbx = FakePbx()
        flow.register(pbx)
        harness = Harness(flow, resources, store, recorder, dispatcher, metrics, sink, pbx)
        opened.append(harness)
        return harness

    yield build
    for harness in opened:
        await harness.flow.aclose()
        # Some tests leave webhooks hanging or the store closed on purpose: do not wait for them.
        await harness.dispatcher.aclose(drain_timeout_s=0.5)
        await harness.recorder.aclose(timeout_s=0.5)
        await harness.store.aclose()
    await session.close()
