"""Real Asterisk 22 for tests: one isolated instance per test, with sipbridge and its peers.

The root filesystem is built once by mmdebstrap and cached (bridge.lab.asterisk); each test
gets its own Asterisk (own config, ports, RTP range), its own sipbridge Service in this process
(so the test can look inside it), a pipeline server, a webhook sink and SIPp callers.
Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bridge.audio import pcm_to_ulaw, sine, tone_share
from bridge.lab.asterisk import (
    AmiUser,
    AsteriskInstance,
    ensure_root,
    reserve_rtp_block,
    sipbridge_ami_user,
)
from bridge.lab.rtp import RtpCapture
from bridge.lab.sipp import CallPlan, SippCaller, SippResult, free_port
from bridge.service import Service
from bridge.settings import load_settings
from tests.pipeline_server import PipelineServer
from tests.tcp_proxy import TcpProxy
from tests.webhook_sink import WebhookSink

API_KEY = "asterisk-test-key-0123456789"
AMI_SECRET = "ami-test-secret"
# Manager users as existing PBXes often have them, next to the least-privileged sample's.
READ_ALL_USERS = [
    AmiUser("everything", AMI_SECRET, "all", "all"),
    AmiUser("readall", AMI_SECRET, "all", "call,reporting,originate"),
]
_instances = itertools.count(1)


def lab_unavailable() -> str | None:
    """Why real Asterisk cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (chroot)"
    for tool in ("sipp", "mmdebstrap", "chroot"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (./dev test installs it)"
    return None


def require_lab() -> None:
    """Skips without root or tools, except in CI, where that is a failure."""
    reason = lab_unavailable()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"real Asterisk tests cannot run in CI: {reason}")
    pytest.skip(f"real Asterisk tests: {reason}")


def windows(pcm: bytes, rate: int, seconds: float = 1.0) -> list[bytes]:
    """Whole windows of ``seconds`` (a partial last one is dropped)."""
    size = int(rate * seconds) * 2
    return [pcm[i : i + size] for i in range(0, len(pcm) - size + 1, size)]


def share_of_windows(
    pcm: bytes, rate: int, frequency: float, threshold: float = 0.5
) -> tuple[float, int]:
    """(fraction of 1 s windows where ``frequency`` holds over ``threshold`` of the energy, count)."""
    parts = windows(pcm, rate)
    if not parts:
        return 0.0, 0
    hits = sum(1 for part in parts if tone_share(part, rate, frequency) > threshold)
    return hits / len(parts), len(parts)


@dataclass
class AsteriskLab:
    root: Path
    tmp: Path
    asterisk: AsteriskInstance
    pipeline: PipelineServer
    sink: WebhookSink
    ami_proxy: TcpProxy
    service: Service | None = None
    extra: list[Any] = field(default_factory=list)
    # The RTP capture of the call in progress (``call(capture=True)``), for pipeline scripts
    # that check what the caller has heard so far.
    listening: RtpCapture | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.asterisk.sip_port}"

    async def start_service(self, **sections: dict[str, Any]) -> Service:
        overrides: dict[str, dict[str, Any]] = {
            "api": {"host": "127.0.0.1", "port": 0, "key": API_KEY},
            "store": {"path": str(self.tmp / "sipbridge.sqlite3")},
            "asterisk": {
                "enabled": True,
                "port": self.ami_proxy.port,
                "secret": AMI_SECRET,
                "ping_interval_s": 1.0,
                "reconnect_max_delay_s": 0.5,
            },
            "media": {"audiosocket_port": 0},
            "pipeline": {"default_url": self.pipeline.url},
            "webhooks": {"default_server_url": self.sink.url, "retry_base_delay_s": 0.05},
            # The test's pipeline, sink and AMI proxy share the service's event loop: their
            # work is not the machine saturating (see tests/conftest.py's make_settings).
            "service": {"max_event_loop_lag_ms": 0},
        }
        for name, values in sections.items():
            overrides[name] = {**overrides.get(name, {}), **values}
        self.service = Service(load_settings(None, overrides))
        await self.service.start()
        return self.service

    async def assistant(self, **fields: Any) -> dict[str, Any]:
        assert self.service is not None
        body = {
            "name": "Support",
            "firstMessage": "Hello {{first_name}}, you've reached me over SIP.",
        }
        return await self.service.resources.create("assistant", {**body, **fields})

    async def number(self, user: str = "demo", **fields: Any) -> dict[str, Any]:
        assert self.service is not None
        return await self.service.resources.create(
            "phone_number", {"provider": "vapi", "sipUri": f"sip:{user}@sip.example.com", **fields}
        )

    async def serve_assistant(
        self, number: dict[str, Any] | None = None, **assistant: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Starts sipbridge with one assistant and the number sip:demo@… that reaches it."""
        await self.start_service()
        created = await self.assistant(**assistant)
        return created, await self.number(assistantId=created["id"], **(number or {}))

    def tone_file(self, frequency: float, seconds: float = 2.0) -> Path:
        path = self.tmp / f"tone-{frequency:g}.ulaw"
        if not path.exists():
            path.write_bytes(pcm_to_ulaw(sine(frequency, seconds)))
        return path

    async def call(
        self, plan: CallPlan, *, name: str = "call", capture: bool = False
    ) -> tuple[SippResult, RtpCapture | None]:
        caller = SippCaller(self.target, self.tmp / "sipp")
        media_port = free_port(pair=True)
        rtp = RtpCapture(media_port) if capture else None
        if rtp is not None:
            rtp.start()
        self.listening = rtp
        try:
            result = await caller.call(plan, name=name, media_port=media_port)
        finally:
            if rtp is not None:
                rtp.stop()
        return result, rtp

    def capture(self, port: int) -> RtpCapture:
        """RTP sent to ``port`` (a SIPp customer's media port), captured from now on."""
        rtp = RtpCapture(port)
        rtp.start()
        self.listening = rtp
        return rtp

    @property
    def asterisk_host(self) -> str:
        """The host of the request-URI Asterisk sees (SIPp calls 127.0.0.1:<sip port>)."""
        return "127.0.0.1"

    async def channels_present(self, timeout: float) -> list[str]:
        """Asterisk's channels, asked until there is one (AMI may be down: the CLI answers).

        Raises:
            TimeoutError: no channel within ``timeout``.
        """
        async with asyncio.timeout(timeout):
            while True:  # each ask is a subprocess round trip of about 10 ms
                channels = await asyncio.to_thread(self.asterisk.channels)
                if channels:
                    return channels

    async def no_channels_left(self) -> list[str]:
        """Asterisk's channels, asked until none are left or a few seconds pass."""
        channels: list[str] = []
        for _ in range(100):  # each ask is a subprocess round trip of about 10 ms
            channels = await asyncio.to_thread(self.asterisk.channels)
            if not channels:
                return []
        return channels


@pytest.fixture(scope="session")
def asterisk_root() -> Path:
    require_lab()
    return ensure_root()


@pytest.fixture
async def asterisk_lab(asterisk_root: Path, tmp_path: Path) -> AsyncIterator[AsteriskLab]:
    require_lab()
    # A port block of its own, outside the ephemeral range, across all test processes.
    with reserve_rtp_block() as (rtp_start, rtp_end):
        name = f"t{os.getpid()}-{next(_instances)}"
        asterisk = AsteriskInstance(
            asterisk_root,
            name,
            sip_port=free_port(socket.SOCK_DGRAM),
            ami_port=free_port(socket.SOCK_STREAM),
            rtp_start=rtp_start,
            rtp_end=rtp_end,
            ami_users=[sipbridge_ami_user(AMI_SECRET), *READ_ALL_USERS],
        )
        await asyncio.to_thread(asterisk.start)
        pipeline = PipelineServer()
        await pipeline.start()
        sink = WebhookSink()
        await sink.start()
        proxy = TcpProxy(asterisk.ami_port)
        await proxy.start()
        lab = AsteriskLab(asterisk_root, tmp_path, asterisk, pipeline, sink, proxy)
        try:
            yield lab
        finally:
            if lab.service is not None:
                await lab.service.aclose()
            for extra in lab.extra:
                await extra.stop()
            await proxy.stop()
            await sink.stop()
            await pipeline.stop()
            log = asterisk.log_text()
            await asyncio.to_thread(asterisk.stop)
            (tmp_path / "asterisk.log").write_text(log)
