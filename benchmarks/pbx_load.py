"""What sipbridge costs on the real path, next to what the PBX it serves costs for the same calls.

For each dialect and each number of concurrent calls: SIPp places the calls (looping PCMU RTP)
through the lab's Asterisk 22 (the project's dialplan) to a ``sipbridge serve`` process, whose
pipeline is an echo process (every frame of caller audio straight back). Once every call is up
it reads, over a window, the CPU time of sipbridge and of Asterisk from /proc (% of one core,
and per call), sipbridge's RSS (and per call, over the idle process), then, in a window of its
own so that capturing costs nothing in the first, the inter-arrival of Asterisk's RTP at the
callers (kernel timestamps on ``lo``). SIPp times every INVITE → 200 OK.

The same calls also go to two references on the same Asterisk:

- ``asterisk-echo``: Asterisk answers with ``Answer()`` and ``Echo()`` (its own cost of a call,
  and its own INVITE → 200 OK);
- ``naive-relay``: ``Answer()`` and ``AudioSocket()`` to a ~50-line asyncio relay that copies
  frames between AudioSocket and a websocket to the same echo pipeline (raw 8 kHz, no AMI, no
  routing, no resampling, no pacing): the floor a Python bridge starts from.

Usage (as root: Asterisk runs under chroot; writes benchmarks/results/pbx_load.{json,md,png})::

    .venv/bin/python benchmarks/pbx_load.py                         # 25 50 100 200 calls
    .venv/bin/python benchmarks/pbx_load.py --calls 50 --dialects raw16 --no-reference
    .venv/bin/python benchmarks/pbx_load.py --ami-user all          # a read-everything user

Dialects: ``raw16`` (the default: raw PCM at 16 kHz, resampled both ways), ``raw8`` (raw PCM at
the PBX's 8 kHz) and ``twilio`` (μ-law 8 kHz in JSON). CPU is user + system time of the
process and its threads; the machine, its load and Python are in the results: compare runs on
one machine, not across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import socket
import struct
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pbxlab import (
    AMI_SECRET,
    RESULTS,
    Lab,
    all_call_records,
    asterisk_lab,
    cpu_seconds,
    live_calls,
    percentile,
    rss_kib,
    run_echo_pipeline,
)

from bridge import __version__
from bridge.audio import pcm_to_ulaw, sine
from bridge.lab.asterisk import AmiUser, sipbridge_ami_user
from bridge.lab.sipp import CallPlan, free_port, scenario

DIALECTS: dict[str, dict[str, str]] = {
    "raw16": {"SIPBRIDGE_PIPELINE__DEFAULT_FORMAT": "raw"},
    "raw8": {
        "SIPBRIDGE_PIPELINE__DEFAULT_FORMAT": "raw",
        "SIPBRIDGE_PIPELINE__DEFAULT_SAMPLE_RATE": "8000",
    },
    "twilio": {"SIPBRIDGE_PIPELINE__DEFAULT_FORMAT": "twilio"},
}
RELAY_UUID = "5bd1a5e0-8f3c-4b8e-9d0a-3c1f2e4d5a6b"  # the relay needs none; AudioSocket does
# socket(7); the socket module names it only where the platform headers do.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
ACTIVE = re.compile(r"(\d+) active call")


# ---- the naive relay (its own process): the reference a Python bridge starts from -------------


async def run_naive_relay(port: int, pipeline_url: str) -> None:
    """AudioSocket in, websocket out, frames copied both ways and nothing else."""

    async def call(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            async with connect(pipeline_url, compression=None) as ws:

                async def to_caller() -> None:
                    async for message in ws:
                        if isinstance(message, bytes):
                            writer.write(b"\x10" + len(message).to_bytes(2, "big") + message)

                back = asyncio.ensure_future(to_caller())
                try:
                    while True:
                        head = await reader.readexactly(3)
                        payload = await reader.readexactly(int.from_bytes(head[1:], "big"))
                        if head[0] == 0x10:
                            await ws.send(payload)
                        elif head[0] in (0x00, 0xFF):
                            return
                finally:
                    back.cancel()
        writer.close()

    server = await asyncio.start_server(call, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


# ---- RTP at the callers --------------------------------------------------------------------------


class RtpTimes:
    """Kernel arrival times of UDP datagrams from Asterisk's RTP ports, per source port (one per
    call), captured on ``lo`` with a packet socket (root)."""

    def __init__(self, rtp_ports: tuple[int, int]) -> None:
        self.rtp_ports = rtp_ports
        self.arrivals: dict[int, list[float]] = defaultdict(list)
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self._sock.bind(("lo", 0))
        self._sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self._sock.setblocking(False)

    def drain(self) -> None:
        first, last = self.rtp_ports
        while True:
            try:
                frame, ancillary, _, address = self._sock.recvmsg(2048, 64)
            except BlockingIOError:
                return
            if address[2] == socket.PACKET_OUTGOING or len(frame) < 42:
                continue  # loopback shows each packet twice; keep the arriving copy
            if frame[12:14] != b"\x08\x00" or frame[23] != 17:  # IPv4, UDP
                continue
            header = (frame[14] & 0x0F) * 4
            source = int.from_bytes(frame[14 + header : 16 + header], "big")
            if not first <= source <= last or source % 2:  # RTP (even), not RTCP
                continue
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    seconds, nanos = struct.unpack("qq", data[:16])
                    self.arrivals[source].append(seconds + nanos / 1e9)

    async def capture(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self._sock.fileno(), self.drain)
        try:
            await asyncio.sleep(seconds)  # a capture window, not a wait for an event
        finally:
            loop.remove_reader(self._sock.fileno())
            self.drain()
            self._sock.close()

    def gaps_ms(self) -> list[float]:
        gaps: list[float] = []
        for times in self.arrivals.values():
            gaps += [(b - a) * 1000 for a, b in zip(times, times[1:], strict=False)]
        return gaps


# ---- one step ------------------------------------------------------------------------------------


@dataclass
class Step:
    path: str  # a dialect, asterisk-echo or naive-relay
    calls: int


def extra_dialplan(relay_port: int) -> str:
    """Exact extensions win over the project's patterns in the same context."""
    return f"""[sipbridge-inbound]
exten => benchecho,1,Answer()
 same => n,Echo()
exten => benchrelay,1,Answer()
 same => n,AudioSocket({RELAY_UUID},127.0.0.1:{relay_port})
 same => n,Hangup()
"""


def timed_scenario(plan: CallPlan) -> str:
    """The lab caller's scenario, timing INVITE → 200 OK (SIPp's response-time tracking)."""
    xml = scenario(plan)
    xml = xml.replace(
        '<send retrans="500"><![CDATA[\nINVITE',
        '<send retrans="500" start_rtd="answer"><![CDATA[\nINVITE',
        1,
    )
    xml = xml.replace(
        '<recv response="200" rrs="true"', '<recv response="200" rrs="true" rtd="answer"', 1
    )
    assert 'start_rtd="answer"' in xml and 'rtd="answer"' in xml
    return xml


async def active_calls(lab: Lab) -> int:
    output = await asyncio.to_thread(lab.asterisk.rx, "core show channels count", check=False)
    found = ACTIVE.search(output or "")
    return int(found.group(1)) if found else -1


async def run_step(
    lab: Lab,
    step: Step,
    args: argparse.Namespace,
    pipeline_url: str,
    relay_pid: int | None,
) -> dict[str, Any]:
    state = lab.state / f"{step.path}-{step.calls}"
    state.mkdir(parents=True, exist_ok=True)
    service = client = None
    user = {"asterisk-echo": "benchecho", "naive-relay": "benchrelay"}.get(step.path, "load")
    if step.path in DIALECTS:
        settings = dict(DIALECTS[step.path])
        if args.ami_user == "all":
            settings["SIPBRIDGE_ASTERISK__USERNAME"] = "everything"
        service, client = await lab.sipbridge(pipeline_url, state / "sipbridge.sqlite3", settings)
        assistant = client.request("POST", "/assistant", {"name": "Load"})
        client.request(
            "POST",
            "/phone-number",
            {"sipUri": "sip:load@127.0.0.1", "assistantId": assistant["id"]},
        )
    measured_pid = service.pid if service is not None else relay_pid
    idle_rss = rss_kib(measured_pid) if measured_pid else None
    tone = state / "tone.ulaw"
    tone.write_bytes(pcm_to_ulaw(sine(440, 2.0)))
    plan = CallPlan(
        user=user, to_host="127.0.0.1", tone_file=tone, talk_ms=args.seconds * 1000, listen_ms=1
    )
    (state / "load.xml").write_text(timed_scenario(plan))
    rate = max(5, step.calls // 10)
    sipp = await asyncio.create_subprocess_exec(
        "sipp", lab.sip_target,
        "-sf", str(state / "load.xml"), "-s", user,
        "-i", "127.0.0.1", "-mi", "127.0.0.1", "-p", str(free_port()),
        "-mp", str(free_port(pair=True)),
        "-l", str(step.calls), "-r", str(rate), "-m", str(step.calls),
        "-nostdin", "-timeout", f"{args.seconds * 3}s",
        "-trace_stat", "-stf", str(state / "stat.csv"), "-fd", "5",
        "-trace_rtt", "-rtt_freq", "1",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, cwd=str(state),
    )  # fmt: skip
    result: dict[str, Any] = {"path": step.path, "calls": step.calls}
    try:
        # Every call up at Asterisk (and at sipbridge), then settled for a second.
        deadline = time.monotonic() + step.calls / rate + 20
        while time.monotonic() < deadline and sipp.returncode is None:
            up = await active_calls(lab)
            if up >= step.calls and (
                client is None or await asyncio.to_thread(live_calls, client) >= step.calls
            ):
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await sipp.wait()
        result["allUp"] = await active_calls(lab) >= step.calls
        await asyncio.sleep(1.0)  # settle: the last calls' set-up is not their steady cost
        pids = {"asterisk": lab.asterisk_pid()}
        if measured_pid is not None:
            pids["bridge"] = measured_pid
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        started = time.monotonic()
        await asyncio.sleep(args.window)  # the measurement window
        elapsed = time.monotonic() - started
        after = {name: cpu_seconds(pid) for name, pid in pids.items()}
        result["callsUpAfterWindow"] = await active_calls(lab)
        for name in pids:
            share = 100 * (after[name] - before[name]) / elapsed
            result[f"{name}CpuPercent"] = round(share, 1)
            result[f"{name}CpuPercentPerCall"] = round(share / step.calls, 3)
        if measured_pid is not None and idle_rss is not None:
            rss = rss_kib(measured_pid)
            result["bridgeRssKiB"] = rss
            result["bridgeRssKiBPerCall"] = round((rss - idle_rss) / step.calls, 1)
        rtp = RtpTimes((lab.asterisk.rtp_start, lab.asterisk.rtp_end))
        await rtp.capture(args.rtp_window)
        gaps = rtp.gaps_ms()
        result["rtpInterArrivalMs"] = {
            "callers": len(rtp.arrivals),
            "p50": _round(percentile(gaps, 0.5)),
            "p99": _round(percentile(gaps, 0.99)),
            "max": _round(max(gaps, default=None)),
        }
        await sipp.wait()
    finally:
        if sipp.returncode is None:
            sipp.terminate()
            await sipp.wait()
    stat_lines = (state / "stat.csv").read_text().splitlines()
    header, last = stat_lines[0].split(";"), stat_lines[-1].split(";")
    stats = dict(zip(header, last, strict=False))
    result["completed"] = int(stats.get("SuccessfulCall(C)", 0) or 0)
    result["failed"] = int(stats.get("FailedCall(C)", 0) or 0)
    answer_ms = _rtt_ms(state)
    result["inviteTo200Ms"] = {
        "p50": _round(percentile(answer_ms, 0.5)),
        "p99": _round(percentile(answer_ms, 0.99)),
    }
    if client is not None and service is not None:
        for _ in range(100):  # reports are written behind the calls
            if await asyncio.to_thread(live_calls, client) == 0:
                break
            await asyncio.sleep(0.2)
        records = await asyncio.to_thread(all_call_records, client)
        media = [(r.get("sipbridge") or {}).get("media", {}) for r in records]
        result["endedReasons"] = _count(str(r.get("endedReason")) for r in records)
        result["lateFrames"] = sum(m.get("lateFrames", 0) for m in media)
        result["framesToCallers"] = sum(m.get("framesToCaller", 0) for m in media)
        await lab.stop(service)
    return result


def _rtt_ms(state: Path) -> list[float]:
    values: list[float] = []
    for path in state.glob("*_rtt.csv"):
        lines = path.read_text().splitlines()
        if not lines:
            continue
        header = lines[0].split(";")
        column = next((i for i, name in enumerate(header) if "response_time" in name), 1)
        for line in lines[1:]:
            cells = line.split(";")
            with contextlib.suppress(ValueError, IndexError):
                values.append(float(cells[column]))
    return values


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _count(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


# ---- the run -------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    relay_port = free_port(socket.SOCK_STREAM)
    users = [sipbridge_ami_user(AMI_SECRET), AmiUser("everything", AMI_SECRET, "all", "all")]
    steps: list[dict[str, Any]] = []
    async with asterisk_lab(
        args.state_dir, max(args.calls), extra_dialplan(relay_port), users
    ) as lab:
        pipeline_url = await lab.echo_pipeline(Path(__file__))
        relay = await lab.spawn(
            sys.executable, str(Path(__file__)), "--naive-relay", str(relay_port), pipeline_url
        )
        paths = list(args.dialects)
        if args.reference:
            paths = ["asterisk-echo", "naive-relay", *paths]
        for calls in args.calls:
            for path in paths:
                relay_pid = relay.pid if path == "naive-relay" else None
                result = await run_step(lab, Step(path, calls), args, pipeline_url, relay_pid)
                print(json.dumps(result), flush=True)
                steps.append(result)
    return {
        "command": " ".join(sys.argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "loadAverageAtStart": args.load_at_start,
        "python": platform.python_version(),
        "sipbridge": __version__,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "amiUser": args.ami_user,
        "callSeconds": args.seconds,
        "windowSeconds": args.window,
        "steps": steps,
    }


def write_results(result: dict[str, Any], name: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# {name}",
        "",
        f"`{result['command']}` on {result['machine']}, Python {result['python']}, "
        f"{result['when']}; load average at start {result['loadAverageAtStart']}; "
        f"AMI user: {result['amiUser']}",
        "",
        "CPU in % of one core over a "
        f"{result['windowSeconds']} s window with every call up; bridge = sipbridge "
        "(or the naive relay); ratio = bridge / Asterisk on the same calls.",
        "",
        "| calls | path | bridge % | Asterisk % | ratio | bridge % per call | RSS KiB per call "
        "| RTP inter-arrival p99 ms | INVITE→200 p50 / p99 ms | completed / failed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["steps"]:
        bridge, pbx = s.get("bridgeCpuPercent"), s.get("asteriskCpuPercent")
        ratio = round(bridge / pbx, 2) if bridge is not None and pbx else None
        invite = s["inviteTo200Ms"]
        lines.append(
            f"| {s['calls']} | {s['path']} | {_cell(bridge)} | {_cell(pbx)} | {_cell(ratio)} "
            f"| {_cell(s.get('bridgeCpuPercentPerCall'))} | {_cell(s.get('bridgeRssKiBPerCall'))} "
            f"| {_cell(s['rtpInterArrivalMs']['p99'])} "
            f"| {_cell(invite['p50'])} / {_cell(invite['p99'])} "
            f"| {s['completed']} / {s['failed']} |"
        )
    lines.append("")
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    plot(result, RESULTS / f"{name}.png")


def _cell(value: Any) -> str:
    return "–" if value is None else str(value)


def plot(result: dict[str, Any], path: Path) -> None:
    """CPU of the bridge and of Asterisk against concurrent calls, one line per path."""

    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for s in result["steps"]:
        if s.get("bridgeCpuPercent") is not None:
            series[f"{s['path']}"].append((s["calls"], s["bridgeCpuPercent"]))
        if s["path"] in DIALECTS or s["path"] == "asterisk-echo":
            series[f"Asterisk ({s['path']})"].append((s["calls"], s["asteriskCpuPercent"]))
    width, height, margin = 900, 560, 70
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    points = [p for line in series.values() for p in line]
    if not points:
        image.save(path)
        return
    max_x = max(x for x, _ in points)
    max_y = max(10.0, max(y for _, y in points) * 1.1)

    def xy(x: float, y: float) -> tuple[float, float]:
        return (
            margin + (width - 2 * margin - 160) * x / max_x,
            height - margin - (height - 2 * margin) * y / max_y,
        )

    draw.line([xy(0, 0), xy(max_x, 0)], fill="black")
    draw.line([xy(0, 0), xy(0, max_y)], fill="black")
    for calls in sorted({x for x, _ in points}):
        x, y = xy(calls, 0)
        draw.text((x - 8, y + 6), str(calls), fill="black")
    for tick in range(0, int(max_y) + 1, max(10, int(max_y) // 8 // 10 * 10 or 10)):
        x, y = xy(0, tick)
        draw.text((x - 40, y - 6), f"{tick} %", fill="black")
    draw.text((width // 2 - 90, height - 30), "concurrent calls", fill="black")
    draw.text(
        (margin, 20), "CPU, % of one core: bridge (solid) and Asterisk (dashed)", fill="black"
    )
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]
    for index, (name, line) in enumerate(sorted(series.items())):
        colour = colours[index % len(colours)]
        ordered = [xy(x, y) for x, y in sorted(line)]
        dashed = name.startswith("Asterisk")
        for a, b in zip(ordered, ordered[1:], strict=False):
            draw.line([a, b], fill=colour, width=1 if dashed else 3)
        for x, y in ordered:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        legend_y = margin + 18 * index
        draw.line([(width - 220, legend_y + 6), (width - 195, legend_y + 6)], fill=colour,
                  width=1 if dashed else 3)  # fmt: skip
        draw.text((width - 190, legend_y), name, fill="black")
    image.save(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument(
        "--dialects", nargs="+", choices=sorted(DIALECTS), default=["raw16", "twilio", "raw8"]
    )
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="skip Asterisk's Echo() and the naive relay")  # fmt: skip
    parser.add_argument(
        "--ami-user",
        choices=["sample", "all"],
        default="sample",
        help="sipbridge's manager user: the least-privileged sample, or read and write all",
    )
    parser.add_argument("--seconds", type=int, default=40, help="length of each call")
    parser.add_argument("--window", type=float, default=10.0, help="CPU window, s")
    parser.add_argument("--rtp-window", type=float, default=3.0, help="RTP capture window, s")
    parser.add_argument("--name", default="pbx_load", help="results file name")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(__file__).resolve().parent.parent / ".lab" / "pbx_load",
    )
    parser.add_argument("--echo-pipeline", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--naive-relay", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_pipeline:
        asyncio.run(run_echo_pipeline(args.echo_pipeline))
        return 0
    if args.naive_relay:
        asyncio.run(run_naive_relay(int(args.naive_relay[0]), args.naive_relay[1]))
        return 0
    if os.geteuid() != 0:
        print("pbx_load: the lab's Asterisk runs under chroot: run as root", file=sys.stderr)
        return 1
    args.load_at_start = " ".join(f"{v:.2f}" for v in os.getloadavg())
    result = asyncio.run(run(args))
    write_results(result, args.name)
    print((RESULTS / f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
