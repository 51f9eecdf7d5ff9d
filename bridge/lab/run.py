"""``sipbridge lab``: a real call through real Asterisk, end to end, on one machine.

Provisions Asterisk 22 from Debian's packages (cached after the first run), installs the
project's dialplan, starts Asterisk, sipbridge (SQLite) and the demo pipeline as separate
processes, creates an assistant and a SIP number over the API, places a SIPp call with
``X-First_Name: John`` and a tone, and prints what happened. With ``--stay`` everything keeps
running for a softphone until Ctrl-C. Every process it started is stopped at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from bridge.audio import pcm_to_ulaw, rms, sine, tone_share
from bridge.client import ApiClient
from bridge.demo import CHIME_HZ
from bridge.errors import ApiClientError
from bridge.lab.asterisk import AsteriskInstance, ensure_root, root_version, sipbridge_ami_user
from bridge.lab.rtp import RtpCapture
from bridge.lab.sipp import CallPlan, SippCaller, free_port
from bridge.protocol.dialects import DEFAULT_DIALECT, DialectName

CALLER_TONE_HZ = 440.0
FIRST_MESSAGE = "Hello {{first_name}}, you've reached me over SIP."
START_TIMEOUT_S = 30.0


def _port(preferred: int, kind: int) -> int:
    """``preferred`` if it is free on 127.0.0.1, else any free port."""
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port(kind)
    return preferred


@dataclass
class LabPorts:
    """Where each part listens (the usual ports when they are free)."""

    sip: int = field(default_factory=lambda: _port(5060, socket.SOCK_DGRAM))
    ami: int = field(default_factory=lambda: _port(5038, socket.SOCK_STREAM))
    api: int = field(default_factory=lambda: _port(8000, socket.SOCK_STREAM))
    audiosocket: int = field(default_factory=lambda: _port(9092, socket.SOCK_STREAM))
    pipeline: int = field(default_factory=lambda: _port(8765, socket.SOCK_STREAM))


class Lab:
    """The lab's processes and the demo call."""

    def __init__(
        self,
        state_dir: Path,
        out: TextIO = sys.stdout,
        pipeline_format: DialectName = DEFAULT_DIALECT,
    ) -> None:
        self.state = state_dir
        self.out = out
        self.pipeline_format = pipeline_format
        self.ports = LabPorts()
        self.asterisk: AsteriskInstance | None = None
        self.processes: list[tuple[str, asyncio.subprocess.Process]] = []
        self.secret = secrets.token_hex(16)

    def say(self, text: str = "") -> None:
        """One line for the person running the lab."""
        self.out.write(text + "\n")
        self.out.flush()

    # ---- processes -----------------------------------------------------------------------------

    async def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        log = (self.state / f"{name}.log").open("wb")
        process = await asyncio.create_subprocess_exec(
            *args, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.processes.append((name, process))

    async def start(self) -> ApiClient:
        """Starts Asterisk, the demo pipeline and sipbridge; returns an API client."""
        self.state.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        self.say("sipbridge lab")
        self.say("  preparing the Asterisk root (the first run builds it with mmdebstrap, ~20 s)…")
        root = await asyncio.to_thread(ensure_root)
        self.say(
            f"  {root_version(root)} from Debian sid, root {root} "
            f"({time.monotonic() - started:.1f} s)"
        )
        ports = self.ports
        self.asterisk = AsteriskInstance(
            root, "lab", ports.sip, ports.ami, 30000, 30999, [sipbridge_ami_user(self.secret)]
        )
        booted = time.monotonic()
        await asyncio.to_thread(self.asterisk.start)
        self.say(
            f"  Asterisk      SIP udp 127.0.0.1:{ports.sip}, AMI 127.0.0.1:{ports.ami} "
            f"(booted in {time.monotonic() - booted:.2f} s)"
        )
        environment = {k: v for k, v in os.environ.items() if not k.startswith("SIPBRIDGE_")}
        python = sys.executable
        await self._spawn(
            "demo-pipeline",
            [python, "-m", "bridge", "demo-pipeline", "--port", str(ports.pipeline)],
            environment,
        )
        pipeline_url = f"ws://127.0.0.1:{ports.pipeline}/pipeline"
        voice = "espeak-ng" if shutil.which("espeak-ng") else "a chime (espeak-ng is not installed)"
        self.say(
            f"  demo pipeline {pipeline_url}, {self.pipeline_format} format, speaks with {voice}"
        )
        database = self.state / "sipbridge.sqlite3"
        service_env = {
            **environment,
            "SIPBRIDGE_API__LAB_MODE": "true",
            "SIPBRIDGE_API__PORT": str(ports.api),
            "SIPBRIDGE_STORE__PATH": str(database),
            "SIPBRIDGE_ASTERISK__ENABLED": "true",
            "SIPBRIDGE_ASTERISK__PORT": str(ports.ami),
            "SIPBRIDGE_ASTERISK__SECRET": self.secret,
            "SIPBRIDGE_MEDIA__AUDIOSOCKET_PORT": str(ports.audiosocket),
            "SIPBRIDGE_PIPELINE__DEFAULT_URL": pipeline_url,
            "SIPBRIDGE_PIPELINE__DEFAULT_FORMAT": self.pipeline_format,
        }
        await self._spawn("sipbridge", [python, "-m", "bridge", "serve"], service_env)
        client = ApiClient(f"http://127.0.0.1:{ports.api}", None, timeout_s=5)
        await self._wait_healthy(client)
        self.say(
            f"  sipbridge     API http://127.0.0.1:{ports.api}, "
            f"AudioSocket 127.0.0.1:{ports.audiosocket}, "
            f"database {database}, log {self.state / 'sipbridge.log'}"
        )
        return client

    async def _wait_healthy(self, client: ApiClient) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        last = ""
        while time.monotonic() < deadline:
            for name, process in self.processes:
                if process.returncode is not None:
                    tail = (self.state / f"{name}.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{name} exited with {process.returncode}:\n{tail}")
            try:
                health = await asyncio.to_thread(client.request, "GET", "/health")
                if health.get("pbx", {}).get("asterisk") == "up":
                    return
                last = str(health)
            except ApiClientError as exc:
                last = str(exc)
            await asyncio.sleep(0.1)  # polling a process that is starting up
        raise RuntimeError(f"sipbridge did not become healthy: {last}")

    async def aclose(self) -> None:
        """Stops every process the lab started."""
        for _, process in reversed(self.processes):
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for _, process in reversed(self.processes):
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
        if self.asterisk is not None:
            (self.state / "asterisk.log").write_text(self.asterisk.log_text())
            await asyncio.to_thread(self.asterisk.stop)

    # ---- the demo call -----------------------------------------------------------------------

    async def demo_call(self, client: ApiClient) -> dict[str, Any]:
        """Creates the assistant and number, calls it, and returns the call record."""
        status, record, capture = await demo_call(
            client, f"127.0.0.1:{self.ports.sip}", self.state, self.say
        )
        summary(self.say, status, record, capture, client.base_url)
        channels = self.asterisk.channels() if self.asterisk else []
        self.say(f"  channels left     {len(channels)} in Asterisk")
        return record

    async def stay(self) -> None:
        """Keeps running until Ctrl-C."""
        self.say()
        self.say(
            f"The lab stays up. Call sip:demo@127.0.0.1:{self.ports.sip} (UDP) "
            "from a softphone on this machine;"
        )
        self.say(
            f"calls: .venv/bin/sipbridge --url http://127.0.0.1:{self.ports.api} calls. "
            "Ctrl-C stops everything."
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()


def _caller_tone(state_dir: Path) -> Path:
    """The caller's tone as SIPp plays it (raw μ-law)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tone = state_dir / "caller-tone.ulaw"
    tone.write_bytes(pcm_to_ulaw(sine(CALLER_TONE_HZ, 2.0)))
    return tone


async def demo_call(
    client: ApiClient, sip_target: str, state_dir: Path, say: Callable[[str], None]
) -> tuple[int | None, dict[str, Any], RtpCapture]:
    """Creates the demo assistant and its SIP number on a running sipbridge, calls the number
    through the PBX at ``sip_target`` (host:port) with SIPp, and returns the SIP status, the
    call record and what the caller heard."""
    assistant = await asyncio.to_thread(
        client.request, "POST", "/assistant", {"name": "Demo", "firstMessage": FIRST_MESSAGE}
    )
    host = sip_target.rsplit(":", 1)[0]
    sip_uri = f"sip:demo@{host}"
    existing = await asyncio.to_thread(client.request, "GET", "/phone-number")
    for number in existing:
        if number.get("sipUri", "").lower() == sip_uri:
            await asyncio.to_thread(client.request, "DELETE", f"/phone-number/{number['id']}")
    await asyncio.to_thread(
        client.request,
        "POST",
        "/phone-number",
        {"provider": "vapi", "sipUri": sip_uri, "assistantId": assistant["id"], "name": "Lab demo"},
    )
    say(f"  assistant     Demo ({assistant['id']}): firstMessage {FIRST_MESSAGE!r}")
    say(f"  phone number  {sip_uri} → Demo")
    say("")
    say(
        f"Calling {sip_uri} at {sip_target} from SIPp with X-First_Name: John; the caller "
        f"listens for 3 s, then plays a {CALLER_TONE_HZ:.0f} Hz tone for 3 s and listens for "
        "2 s more…"
    )
    tone = _caller_tone(state_dir)
    media_port = free_port(pair=True)
    capture = RtpCapture(media_port)
    capture.start()
    caller = SippCaller(sip_target, state_dir / "sipp")
    try:
        result = await caller.call(
            CallPlan(
                user="demo",
                to_host=host,
                headers=[("X-First_Name", "John")],
                tone_file=tone,
                silent_ms=3000,
                talk_ms=3000,
                listen_ms=2000,
            ),
            name="demo",
            media_port=media_port,
        )
    finally:
        capture.stop()
    record: dict[str, Any] = {}
    # The record is written when the call's report is: a moment after the caller's BYE.
    for _ in range(50):
        calls = await asyncio.to_thread(client.request, "GET", "/call", None, {"limit": "1"})
        record = calls[0] if calls else {}
        if record.get("status") == "ended":
            break
        await asyncio.sleep(0.1)  # polling another process's API
    return result.final_status, record, capture


def summary(
    say: Callable[[str], None],
    status: int | None,
    call: dict[str, Any],
    capture: RtpCapture,
    api_url: str,
) -> None:
    """What happened to the demo call, one line per fact."""
    say("")
    if not call:
        say(f"  no call record; SIPp got {status}")
        return
    extension = call.get("sipbridge") or {}
    media = extension.get("media") or {}
    assistant = call.get("assistant") or {}
    variables = (call.get("assistantOverrides") or {}).get("variableValues") or {}
    say(
        f"  call              {call['id']}: SIP {status}, ended: {call.get('endedReason')} "
        f"after {extension.get('durationSeconds', 0):.1f} s"
    )
    say(f"  assistant chosen  {assistant.get('name')} ({call.get('assistantId')})")
    say(f"  variables         {', '.join(f'{k}={v}' for k, v in variables.items()) or '(none)'}")
    say(f"  first message     {assistant.get('firstMessage')!r}")
    say(f"  caller → pipeline {media.get('framesFromCaller', 0)} frames of 20 ms")
    say(
        f"  pipeline → caller {media.get('framesToCaller', 0)} frames of 20 ms "
        f"({media.get('silenceFramesToCaller', 0)} of them silence fill), "
        f"{media.get('lateFrames', 0)} sent late"
    )
    say(f"  caller heard      {heard(capture)}")
    say(
        f"  call record       GET {api_url}/call/{call['id']} "
        f"(or: sipbridge --url {api_url} call show {call['id']})"
    )


def heard(capture: RtpCapture) -> str:
    """What the caller heard: the greeting, and its own tone echoed by the demo pipeline."""
    pcm = capture.pcm()
    second = 16000
    windows = [pcm[i : i + second] for i in range(0, len(pcm) - second + 1, second)]
    # The caller is silent for its first 3 s: what it hears then is the greeting.
    greeting = windows[:2]
    chime = any(max(tone_share(w, 8000, f) for f in CHIME_HZ) > 0.05 for w in greeting)
    spoken = not chime and any(rms(w) > 200 for w in greeting)
    echo = [w for w in windows if tone_share(w, 8000, CALLER_TONE_HZ) > 0.5]
    parts = [f"{len(capture.packets)} RTP packets ({len(pcm) / second:.1f} s)"]
    if chime:
        parts.append("the greeting (chime)")
    elif spoken:
        parts.append("the greeting (spoken by espeak-ng)")
    if echo:
        parts.append(
            f"its own {CALLER_TONE_HZ:.0f} Hz tone echoed "
            f"(in {len(echo)} of {len(windows)} one-second windows)"
        )
    return ", ".join(parts)


def demo_call_went_through(call: dict[str, Any], capture: RtpCapture) -> bool:
    """The demo call worked: answered, the caller ended it, and it heard its tone echoed."""
    return call.get("endedReason") == "customer-ended-call" and "echoed" in heard(capture)


async def call_running_sipbridge(
    client: ApiClient, sip_target: str, state_dir: Path, out: TextIO = sys.stdout
) -> int:
    """``sipbridge lab-call``: the demo call against a sipbridge and PBX already running (the
    compose lab's caller); 0 when it went through as expected."""

    def say(text: str = "") -> None:
        out.write(text + "\n")
        out.flush()

    say(f"sipbridge lab call: sipbridge {client.base_url}, PBX {sip_target}")
    try:
        status, record, capture = await demo_call(client, sip_target, state_dir, say)
    except ApiClientError as exc:
        say(f"  {exc}")
        return 1
    summary(say, status, record, capture, client.base_url)
    return 0 if demo_call_went_through(record, capture) else 1


async def run(
    state_dir: Path,
    *,
    stay: bool,
    out: TextIO = sys.stdout,
    pipeline_format: DialectName = DEFAULT_DIALECT,
) -> int:
    """Runs the lab; 0 when the demo call went through as expected."""
    if os.geteuid() != 0:
        out.write("sipbridge lab: runs Asterisk under chroot, which needs root (sudo ./dev lab)\n")
        return 1
    lab = Lab(state_dir, out, pipeline_format)
    try:
        client = await lab.start()
        call = await lab.demo_call(client)
        ok = call.get("endedReason") == "customer-ended-call"
        if stay:
            await lab.stay()
        return 0 if ok else 1
    except RuntimeError as exc:
        out.write(f"sipbridge lab: {exc}\n")
        return 1
    finally:
        lab.say("stopping the lab…")
        await lab.aclose()
