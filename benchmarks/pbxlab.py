"""The real-PBX benchmarks' shared parts: the lab's Asterisk, a ``sipbridge serve`` process, an
echo pipeline, SIPp, and what /proc says about each process.

``soak.py`` and ``pbx_load.py`` measure through the same path a production call takes: SIPp
(calls with looping PCMU RTP) → the lab's Asterisk 22 (the project's dialplan, the sample's
manager user) → AudioSocket → sipbridge (its own process, SQLite) → websocket → a pipeline
process that sends every frame of caller audio straight back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.server import ServerConnection, serve

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.client import ApiClient  # noqa: E402
from bridge.errors import ApiClientError  # noqa: E402
from bridge.lab.asterisk import (  # noqa: E402
    RTP_BLOCK_PORTS,
    AmiUser,
    AsteriskInstance,
    ensure_root,
    reserve_rtp_block,
    sipbridge_ami_user,
)
from bridge.lab.sipp import free_port  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
AMI_SECRET = "bench-ami-secret"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---- the echo pipeline (run in a process of its own) ---------------------------------------------


async def run_echo_pipeline(port: int) -> None:
    """Sends every frame of caller audio straight back, in either dialect: raw binary frames as
    they are, twilio ``media`` messages as a ``media`` reply on the same stream."""

    async def session(ws: ServerConnection) -> None:
        with contextlib.suppress(Exception):
            async for message in ws:
                if isinstance(message, bytes):
                    await ws.send(message)
                elif '"media"' in message:
                    data = json.loads(message)
                    if data.get("event") == "media":
                        payload = data["media"]["payload"]
                        base64.b64decode(payload, validate=True)  # as a real pipeline decodes
                        await ws.send(
                            json.dumps(
                                {
                                    "event": "media",
                                    "streamSid": data["streamSid"],
                                    "media": {"payload": payload},
                                }
                            )
                        )

    async with serve(session, "127.0.0.1", port, compression=None, max_size=2**20):
        await asyncio.Future()


# ---- /proc ---------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process and its threads so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # utime and stime are fields 14 and 15 of proc(5); 3 is the first after the name.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def live_calls(client: ApiClient) -> int:
    try:
        calls = client.request(
            "GET", "/call", None, {"status": "ringing,in-progress", "limit": "1000"}
        )
    except ApiClientError:
        return -1
    return len(calls)


def all_call_records(client: ApiClient) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    before: str | None = None
    while True:
        query = {"limit": "1000"} | ({"createdAtLt": before} if before else {})
        page = client.request("GET", "/call", None, query)
        records += page
        if len(page) < 1000:
            return records
        before = page[-1]["createdAt"]


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1)]


# ---- processes -----------------------------------------------------------------------------------


@dataclass
class Lab:
    """One Asterisk and the processes started next to it; everything stops with the lab."""

    state: Path
    asterisk: AsteriskInstance
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)

    @property
    def sip_target(self) -> str:
        return f"127.0.0.1:{self.asterisk.sip_port}"

    def asterisk_pid(self) -> int:
        """Asterisk's own pid (the chroot wrapper execs it, so the Popen's pid)."""
        assert self.asterisk.process is not None
        return self.asterisk.process.pid

    async def spawn(self, *argv: str, env: Mapping[str, str] | None = None) -> Any:
        log = (self.state / f"{Path(argv[1]).stem if len(argv) > 1 else 'proc'}.log").open("ab")
        process = await asyncio.create_subprocess_exec(
            *argv, env=dict(env) if env is not None else None, stdout=log, stderr=log
        )
        log.close()
        self.processes.append(process)
        return process

    async def echo_pipeline(self, script: Path) -> str:
        """Starts ``script --echo-pipeline PORT`` and returns the pipeline's URL."""
        port = free_port(socket.SOCK_STREAM)
        await self.spawn(sys.executable, str(script), "--echo-pipeline", str(port), env=clean_env())
        return f"ws://127.0.0.1:{port}/"

    async def sipbridge(
        self, pipeline_url: str, store: Path, settings: Mapping[str, str] | None = None
    ) -> tuple[asyncio.subprocess.Process, ApiClient]:
        """Starts ``sipbridge serve`` on this lab's Asterisk and waits until its AMI link is up."""
        for suffix in ("", "-wal", "-shm"):  # every run starts from an empty store
            await asyncio.to_thread(Path(f"{store}{suffix}").unlink, missing_ok=True)
        api_port = free_port(socket.SOCK_STREAM)
        env = {
            **clean_env(),
            "SIPBRIDGE_API__LAB_MODE": "true",
            "SIPBRIDGE_API__PORT": str(api_port),
            "SIPBRIDGE_STORE__PATH": str(store),
            "SIPBRIDGE_ASTERISK__ENABLED": "true",
            "SIPBRIDGE_ASTERISK__PORT": str(self.asterisk.ami_port),
            "SIPBRIDGE_ASTERISK__SECRET": AMI_SECRET,
            "SIPBRIDGE_MEDIA__AUDIOSOCKET_PORT": str(free_port(socket.SOCK_STREAM)),
            "SIPBRIDGE_PIPELINE__DEFAULT_URL": pipeline_url,
            "SIPBRIDGE_LOG__LEVEL": "WARNING",
            **(settings or {}),
        }
        with (self.state / "sipbridge.log").open("ab") as log:
            service = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bridge", "serve", env=env, stdout=log, stderr=log, cwd=ROOT
            )
        self.processes.append(service)
        client = ApiClient(f"http://127.0.0.1:{api_port}", None, timeout_s=10)
        for _ in range(300):
            with contextlib.suppress(ApiClientError):
                health = await asyncio.to_thread(client.request, "GET", "/health")
                if health["pbx"].get("asterisk") == "up":
                    return service, client
            await asyncio.sleep(0.1)
        raise RuntimeError(f"sipbridge did not come up: see {self.state / 'sipbridge.log'}")

    async def stop(self, process: asyncio.subprocess.Process) -> None:
        if process.returncode is None:
            process.terminate()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(20):
                    await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
        with contextlib.suppress(ValueError):
            self.processes.remove(process)


def clean_env() -> dict[str, str]:
    """This environment without SIPBRIDGE_ settings: each process gets exactly its own."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SIPBRIDGE_")}


@asynccontextmanager
async def asterisk_lab(
    state: Path,
    calls: int,
    extra_dialplan: str = "",
    ami_users: list[AmiUser] | None = None,
) -> AsyncIterator[Lab]:
    """The lab's Asterisk with room for ``calls`` concurrent calls, and a state directory."""
    await asyncio.to_thread(state.mkdir, parents=True, exist_ok=True)
    root = await asyncio.to_thread(ensure_root)
    # Two ports (RTP, RTCP) per call at Asterisk, and room for calls still closing.
    blocks = math.ceil(calls * 2.5 / RTP_BLOCK_PORTS)
    with reserve_rtp_block(blocks=blocks) as (rtp_start, rtp_end):
        asterisk = AsteriskInstance(
            root,
            f"bench{os.getpid()}",
            sip_port=free_port(socket.SOCK_DGRAM),
            ami_port=free_port(socket.SOCK_STREAM),
            rtp_start=rtp_start,
            rtp_end=rtp_end,
            ami_users=ami_users or [sipbridge_ami_user(AMI_SECRET)],
            extra_dialplan=extra_dialplan,
        )
        await asyncio.to_thread(asterisk.start)
        lab = Lab(state, asterisk)
        try:
            yield lab
        finally:
            for process in reversed(list(lab.processes)):
                await lab.stop(process)
            await asyncio.to_thread(asterisk.stop)
