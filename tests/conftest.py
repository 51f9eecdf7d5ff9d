"""Shared fixtures: settings in a temporary directory, a started service, a webhook sink."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from bridge.audio import sine
from bridge.calls import Call
from bridge.events import LegAudio, LegClosed, LegConnected, invite_facts
from bridge.service import Service
from bridge.settings import Settings, load_settings
from tests.fake_pbx import FakePbx
from tests.flow_harness import make_harness
from tests.memory_leg import MemoryLeg
from tests.pipeline_server import PipelineServer, PipelineSession
from tests.webhook_sink import WebhookSink

API_KEY = "test-key-0123456789abcdef"
__all__ = ["API_KEY", "make_harness"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No SIPBRIDGE_* variable from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("SIPBRIDGE_"):
            monkeypatch.delenv(name)
    yield


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings for an isolated service: its own database, a free port, an API key."""

    def build(**sections: dict[str, Any]) -> Settings:
        overrides: dict[str, dict[str, Any]] = {
            "api": {"host": "127.0.0.1", "port": 0, "key": API_KEY},
            "store": {"path": str(tmp_path / "sipbridge.sqlite3")},
            # The service shares its event loop with the test's peers, sinks and pipelines, so
            # a busy CI machine made it refuse calls as saturated (CI, 3.13, a 296 ms start-up
            # sample). Only the tests of that rule turn it on.
            "service": {"max_event_loop_lag_ms": 0},
        }
        for name, values in sections.items():
            overrides[name] = {**overrides.get(name, {}), **values}
        return load_settings(None, overrides)

    return build


@pytest.fixture
async def sink() -> AsyncIterator[WebhookSink]:
    server = WebhookSink()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="session")
def authority() -> trustme.CA:
    """A certificate authority made for the tests, trusted by nothing else."""
    return trustme.CA()


@pytest.fixture(scope="session")
def server_tls(authority: trustme.CA) -> ssl.SSLContext:
    """A server context with a certificate for 127.0.0.1 issued by ``authority``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    return context


@pytest.fixture
def ca_file(authority: trustme.CA, tmp_path: Path) -> Path:
    """``authority``'s certificate as a PEM file, what tls.ca_file names."""
    path = tmp_path / "private-ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
async def tls_sink(server_tls: ssl.SSLContext) -> AsyncIterator[WebhookSink]:
    """A webhook sink on https:// with a certificate from ``authority``."""
    server = WebhookSink(tls=server_tls)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def tls_pipeline(server_tls: ssl.SSLContext) -> AsyncIterator[PipelineServer]:
    """A pipeline on wss:// with a certificate from ``authority``."""
    server = PipelineServer(tls=server_tls)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def pipeline() -> AsyncIterator[PipelineServer]:
    """A real websocket server standing in for the conversational pipeline."""
    server = PipelineServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def service(make_settings: Callable[..., Settings]) -> AsyncIterator[Service]:
    running = Service(make_settings())
    await running.start()
    yield running
    await running.aclose()


async def offer_accepted(
    service: Service, user: str, assistant: dict[str, Any]
) -> tuple[Call, FakePbx]:
    """A call to a new number ``user`` with ``assistant``, offered by a fake PBX and accepted
    (its media about to connect)."""
    created = await service.resources.create("assistant", assistant)
    await service.resources.create(
        "phone_number", {"sipUri": f"sip:{user}@x", "assistantId": created["id"]}
    )
    pbx = FakePbx()
    facts = invite_facts(
        pbx="test", pbx_call_id="p1", channel="c", request_user=user, request_host="x"
    )
    call = service.callflow.offer(facts, pbx)
    assert call is not None
    await pbx.wait_for("connect_media")
    return call, pbx


async def raw_request(port: int | None, request: bytes) -> tuple[int, bytes]:
    """Sends ``request`` as bytes (no client library to refuse them); the status and body."""
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def recorded_call(
    service: Service, pipeline: PipelineServer, assistant: dict[str, Any]
) -> str:
    """A call through the service whose caller says 440 Hz while the pipeline plays 1000 Hz."""

    async def script(session: PipelineSession) -> None:
        await session.send(sine(1000, 0.4, 16000))

    pipeline.script = script
    call, _ = await offer_accepted(service, "rec", assistant)
    leg = MemoryLeg()
    service.callflow.post(LegConnected(call.id, leg))
    caller = sine(440, 0.5)
    for index, offset in enumerate(range(0, len(caller), 320)):
        leg.inbox.put(LegAudio(caller[offset : offset + 320]))
        await leg.wait_sent(index + 1)  # the caller speaks in step with what is played
    await leg.wait_sent(30)
    leg.inbox.put(LegClosed(by_caller=True))
    await leg.wait_closed()  # the call has ended
    return call.id
