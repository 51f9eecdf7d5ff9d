from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest

from bridge.events import invite_facts
from bridge.service import Service
from bridge.settings import Settings
from tests.fake_pbx import FakePbx
from tests.pipeline_server import PipelineServer


async def test_health_reports_the_store_and_pbx_links(service: Service) -> None:
    report = await service.health()
    assert report["status"] == "ok" and report["store"] == "ok" and report["activeCalls"] == 0
    service.pbx_links["asterisk"] = False
    assert (await service.health())["status"] == "degraded"
    service.pbx_links["asterisk"] = True
    await service.store.aclose()
    report = await service.health()
    assert report["status"] == "degraded" and report["store"] == "unavailable"


async def test_metrics_text(service: Service) -> None:
    text = service.metrics_text().decode()
    for name in (
        "sipbridge_calls_active",
        "sipbridge_webhook_seconds",
        "sipbridge_pbx_link_up",
        "sipbridge_store_errors",
    ):
        assert f"# HELP {name}" in text


async def test_a_busy_port_fails_start_and_leaves_nothing_running(
    make_settings: Callable[..., Settings],
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = Service(make_settings(api={"port": port}))
        with pytest.raises(OSError):
            await service.start()
    assert service._runner is None and service._callflow is None
    with pytest.raises(Exception, match="not open"):
        await service.store.ping()


async def test_drain_waits_for_live_calls(service: Service, pipeline: PipelineServer) -> None:
    assistant = await service.resources.create(
        "assistant", {"name": "A", "sipbridge": {"pipeline": {"url": pipeline.url}}}
    )
    await service.resources.create(
        "phone_number", {"sipUri": "sip:alice@x", "assistantId": assistant["id"]}
    )
    pbx = FakePbx()
    facts = invite_facts(
        pbx="test", pbx_call_id="p1", channel="c", request_user="alice", request_host="x"
    )
    call = service.callflow.offer(facts, pbx)
    assert call is not None
    await pbx.wait_for("connect_media")
    assert not await service.drain(0.05)  # the call is still live
    draining = asyncio.ensure_future(service.drain(10))
    await asyncio.sleep(0)
    service.callflow.hung_up("test", "p1")
    assert await draining
    assert call.ended_reason is not None and call.ended_reason.value == "customer-ended-call"


async def test_org_id_from_settings(make_settings: Callable[..., Settings]) -> None:
    service = Service(make_settings(api={"org_id": "org-42"}))
    await service.start()
    try:
        assert (await service.resources.create("assistant", {}))["orgId"] == "org-42"
    finally:
        await service.aclose()
