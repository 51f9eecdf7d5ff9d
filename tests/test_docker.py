"""docker/: the compose lab's file validates, and sipbridge's image carries a real call.

The image is built with podman (tests/container_harness.py) and run on the host's network
against the lab's real Asterisk 22: SIPp → Asterisk → sipbridge in the container (AMI and
AudioSocket) → the demo pipeline in a second container of the same image. FreeSWITCH has no
image that can be pulled here, so the compose file itself is validated offline
(``docker-compose config``), and the same call against FreeSWITCH runs in the compose lab.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from bridge.client import ApiClient
from bridge.lab.run import FIRST_MESSAGE, demo_call, demo_call_went_through, heard
from bridge.lab.sipp import free_port
from tests.asterisk_harness import AMI_SECRET, AsteriskLab, asterisk_lab, asterisk_root
from tests.container_harness import ROOT, Container, build_image, require_containers

__all__ = ["asterisk_lab", "asterisk_root"]  # the fixtures this module uses

pytestmark = [pytest.mark.container, pytest.mark.integration]

COMPOSE = ROOT / "docker" / "compose.yaml"
IMAGE = "localhost/sipbridge:test"


def compose(*args: str) -> str:
    if shutil.which("docker-compose") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("docker-compose is not installed (./dev test installs it)")
        pytest.skip("docker-compose is not installed (./dev test installs it)")
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_compose_file_validates_and_pins_freeswitch() -> None:
    assert compose("config", "--services").split() == [
        "freeswitch",
        "pipeline",
        "sipbridge",
        "caller",
    ]
    resolved = compose("config")
    # FreeSWITCH from a public image at an exact release, never a moving tag.
    [image] = re.findall(r"image: (\S*freeswitch\S*)", resolved)
    assert image == "docker.io/safarov/freeswitch:1.10.12"
    # freeswitch_conf/ is what the lab's FreeSWITCH runs, mounted as docs/freeswitch.md says.
    mounts = re.findall(r"- (\S+):(/etc/freeswitch/\S+):ro", resolved)
    assert {Path(source).name: target for source, target in mounts} == {
        "sipbridge.xml": "/etc/freeswitch/dialplan/public/00_sipbridge.xml",
        "sipbridge_context.xml": "/etc/freeswitch/dialplan/sipbridge_context.xml",
    }
    assert all(Path(source).is_file() for source, _ in mounts)
    # The caller waits for a healthy sipbridge, which waits for a healthy FreeSWITCH.
    assert resolved.count("condition: service_healthy") == 2


async def wait_healthy(client: ApiClient, container: Container, pbx: str) -> None:
    """Awaits the containerised service's log lines saying its API listens and its PBX link is
    up, then checks /health says so too."""
    link_up = {"asterisk": "AMI link up"}[pbx]
    last = "its log never said so"
    if await container.wait_for_log({": API on http", link_up}, timeout=60):
        health = await asyncio.to_thread(client.request, "GET", "/health")
        if health.get("pbx", {}).get(pbx) == "up":
            return
        last = str(health)
    raise AssertionError(
        f"sipbridge in the container never came up: {last}\n{await container.logs()}"
    )


@pytest.mark.asterisk
async def test_the_image_carries_a_real_call_through_asterisk(
    asterisk_lab: AsteriskLab, tmp_path: Path
) -> None:
    require_containers()
    await asyncio.to_thread(build_image, "sipbridge", IMAGE, tmp_path)
    lab = asterisk_lab
    api_port = free_port(socket.SOCK_STREAM)
    pipeline_port = free_port(socket.SOCK_STREAM)
    audiosocket_port = free_port(socket.SOCK_STREAM)
    suffix = f"{os.getpid()}-{api_port}"
    containers: list[Container] = []
    try:
        containers.append(
            await Container.run(
                f"sipbridge-pipeline-{suffix}",
                IMAGE,
                "demo-pipeline",
                "--port",
                str(pipeline_port),
                env={},
            )
        )
        service = await Container.run(
            f"sipbridge-{suffix}",
            IMAGE,
            env={
                "SIPBRIDGE_API__LAB_MODE": "true",
                "SIPBRIDGE_API__PORT": str(api_port),
                "SIPBRIDGE_ASTERISK__ENABLED": "true",
                "SIPBRIDGE_ASTERISK__PORT": str(lab.asterisk.ami_port),
                "SIPBRIDGE_ASTERISK__SECRET": AMI_SECRET,
                "SIPBRIDGE_MEDIA__AUDIOSOCKET_PORT": str(audiosocket_port),
                "SIPBRIDGE_PIPELINE__DEFAULT_URL": f"ws://127.0.0.1:{pipeline_port}/pipeline",
            },
        )
        containers.append(service)
        client = ApiClient(f"http://127.0.0.1:{api_port}", None, timeout_s=5)
        await wait_healthy(client, service, "asterisk")
        assert await service.healthy()  # the image's HEALTHCHECK: sipbridge health
        user = await service.exec("id", "-u")
        assert user.returncode == 0 and user.stdout.strip() not in ("", "0")  # not root
        said: list[str] = []
        status, record, capture = await demo_call(
            client, lab.target, tmp_path / "call", said.append
        )
        assert status == 200, "\n".join(said)
        assert record["endedReason"] == "customer-ended-call"
        assert record["assistant"]["firstMessage"] == FIRST_MESSAGE.replace(
            "{{first_name}}", "John"
        )
        # By content: the caller heard the greeting, then its own 440 Hz echoed by the pipeline.
        assert demo_call_went_through(record, capture), heard(capture)
        assert "the greeting" in heard(capture)
        media = record["sipbridge"]["media"]
        assert media["framesFromCaller"] > 100 and media["framesToCaller"] > 300
    finally:
        for container in containers:
            await container.stop()
