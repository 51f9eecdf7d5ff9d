"""Soak run: many concurrent calls through the real Asterisk lab for a long time.

Holds ``--calls`` calls at once (SIPp keeps replacing the ones that end) through the lab's Asterisk
22 (the project's dialplan) to a ``sipbridge serve`` process (SQLite), whose pipeline is an echo
server in a process of its own, for ``--minutes``. Every ``--sample-s`` it reads sipbridge's RSS
and open file descriptors from /proc, and its live calls from /metrics. At the end it reads the
call records: how many calls ended as the caller ended them, any other end reason, and the
paced writer's late frames.

Usage (as root: Asterisk runs under chroot; writes benchmarks/results/soak.json and .md)::

    .venv/bin/python benchmarks/soak.py --calls 100 --minutes 60
    .venv/bin/python benchmarks/soak.py --calls 20 --minutes 2     # a short run
    .venv/bin/python benchmarks/soak.py --minutes 20 --record no --out soak_no_recording

The goal the issue sets: RSS growth under 5 % after warm-up (the first quarter), 0 calls lost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge import __version__  # noqa: E402
from bridge.audio import pcm_to_ulaw, sine  # noqa: E402
from bridge.client import ApiClient  # noqa: E402
from bridge.errors import ApiClientError  # noqa: E402
from bridge.lab.asterisk import (  # noqa: E402
    RTP_BLOCK_PORTS,
    AsteriskInstance,
    ensure_root,
    reserve_rtp_block,
    sipbridge_ami_user,
)
from bridge.lab.sipp import CallPlan, free_port, scenario  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pbxlab import (  # noqa: E402
    all_call_records,
    live_calls,
    open_fds,
    rss_kib,
    run_echo_pipeline,
)

RESULTS = Path(__file__).resolve().parent / "results"
SECRET = "soak-ami-secret"


# ---- the run -------------------------------------------------------------------------------------


async def soak(
    calls: int, minutes: float, call_s: int, sample_s: float, state: Path, *, record: bool = True
) -> dict[str, Any]:
    await asyncio.to_thread(state.mkdir, parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):  # every run starts from an empty store
        await asyncio.to_thread((state / f"soak.sqlite3{suffix}").unlink, missing_ok=True)
    root = await asyncio.to_thread(ensure_root)
    processes: list[asyncio.subprocess.Process] = []
    # Two ports (RTP, RTCP) per call at Asterisk, and room for calls still closing.
    with reserve_rtp_block(blocks=math.ceil(calls * 2.5 / RTP_BLOCK_PORTS)) as (rtp_start, rtp_end):
        asterisk = AsteriskInstance(
            root,
            f"soak{os.getpid()}",
            sip_port=free_port(socket.SOCK_DGRAM),
            ami_port=free_port(socket.SOCK_STREAM),
            rtp_start=rtp_start,
            rtp_end=rtp_end,
            ami_users=[sipbridge_ami_user(SECRET)],
        )
        await asyncio.to_thread(asterisk.start)
        try:
            pipeline_port = free_port(socket.SOCK_STREAM)
            api_port = free_port(socket.SOCK_STREAM)
            env = {k: v for k, v in os.environ.items() if not k.startswith("SIPBRIDGE_")}
            processes.append(
                await asyncio.create_subprocess_exec(
                    sys.executable, __file__, "--echo-pipeline", str(pipeline_port), env=env
                )
            )
            service_env = {
                **env,
                "SIPBRIDGE_API__LAB_MODE": "true",
                "SIPBRIDGE_API__PORT": str(api_port),
                "SIPBRIDGE_STORE__PATH": str(state / "soak.sqlite3"),
                "SIPBRIDGE_ASTERISK__ENABLED": "true",
                "SIPBRIDGE_ASTERISK__PORT": str(asterisk.ami_port),
                "SIPBRIDGE_ASTERISK__SECRET": SECRET,
                "SIPBRIDGE_MEDIA__AUDIOSOCKET_PORT": str(free_port(socket.SOCK_STREAM)),
                "SIPBRIDGE_PIPELINE__DEFAULT_URL": f"ws://127.0.0.1:{pipeline_port}/",
                "SIPBRIDGE_LOG__LEVEL": "WARNING",
                # Recording is the product's default; off, the run shows what it costs.
                "SIPBRIDGE_RECORDINGS__ENABLED_BY_DEFAULT": "true" if record else "false",
            }
            with (state / "sipbridge.log").open("wb") as log:
                service = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "bridge", "serve", env=service_env, stdout=log, stderr=log
                )
            processes.append(service)
            client = ApiClient(f"http://127.0.0.1:{api_port}", None, timeout_s=10)
            for _ in range(300):
                with contextlib.suppress(ApiClientError):
                    if client.request("GET", "/health")["pbx"].get("asterisk") == "up":
                        break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError(f"sipbridge did not come up: see {state / 'sipbridge.log'}")
            assistant = client.request("POST", "/assistant", {"name": "Soak"})
            client.request(
                "POST",
                "/phone-number",
                {"sipUri": "sip:soak@127.0.0.1", "assistantId": assistant["id"]},
            )
            tone = state / "tone.ulaw"
            tone.write_bytes(pcm_to_ulaw(sine(440, 2.0)))
            plan = CallPlan(
                user="soak", to_host="127.0.0.1", tone_file=tone, talk_ms=call_s * 1000, listen_ms=1
            )
            (state / "soak.xml").write_text(scenario(plan))
            duration_s = minutes * 60
            total = max(calls, int(duration_s / call_s * calls))
            sipp = await asyncio.create_subprocess_exec(
                "sipp", f"127.0.0.1:{asterisk.sip_port}",
                "-sf", str(state / "soak.xml"), "-s", "soak",
                "-i", "127.0.0.1", "-mi", "127.0.0.1", "-p", str(free_port()),
                "-mp", str(free_port(pair=True)),
                "-l", str(calls), "-r", str(max(1, calls // 10)), "-m", str(total),
                "-nostdin", "-timeout", f"{int(duration_s + call_s * 3)}s",
                "-trace_stat", "-stf", str(state / "sipp_stat.csv"), "-fd", "10",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                cwd=str(state),
            )  # fmt: skip
            samples: list[dict[str, Any]] = []
            started = time.monotonic()
            assert service.pid is not None
            while sipp.returncode is None:
                samples.append(
                    {
                        "t": round(time.monotonic() - started, 1),
                        "rssKiB": rss_kib(service.pid),
                        "fds": open_fds(service.pid),
                        "liveCalls": await asyncio.to_thread(live_calls, client),
                    }
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(sample_s):
                        await sipp.wait()
            elapsed = time.monotonic() - started
            # Reports are written behind the calls: wait until no call is live.
            for _ in range(100):
                if await asyncio.to_thread(live_calls, client) == 0:
                    break
                await asyncio.sleep(0.2)
            records = await asyncio.to_thread(all_call_records, client)
            reasons = Counter(str(r.get("endedReason")) for r in records)
            late = sum(
                (r.get("sipbridge") or {}).get("media", {}).get("lateFrames", 0) for r in records
            )
            frames = sum(
                (r.get("sipbridge") or {}).get("media", {}).get("framesToCaller", 0)
                for r in records
            )
            stat_lines = (state / "sipp_stat.csv").read_text().splitlines()
            header, last = stat_lines[0].split(";"), stat_lines[-1].split(";")
            sipp_stats = dict(zip(header, last, strict=False))
        finally:
            for process in reversed(processes):
                if process.returncode is None:
                    process.terminate()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(20):
                            await process.wait()
                    if process.returncode is None:
                        process.kill()
            await asyncio.to_thread(asterisk.stop)
    placed = int(sipp_stats.get("TotalCallCreated", 0) or 0)
    warm = [s for s in samples if s["t"] >= elapsed / 4]
    rss_growth = (
        round(100 * (warm[-1]["rssKiB"] - warm[0]["rssKiB"]) / warm[0]["rssKiB"], 2)
        if len(warm) > 1
        else None
    )
    return {
        "command": " ".join(sys.argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "sipbridge": __version__,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "concurrentCalls": calls,
        "callSeconds": call_s,
        "minutes": round(elapsed / 60, 2),
        "callsPlaced": placed,
        "sippSuccessful": int(sipp_stats.get("SuccessfulCall(C)", 0) or 0),
        "sippFailed": int(sipp_stats.get("FailedCall(C)", 0) or 0),
        "callRecords": len(records),
        "endedReasons": dict(reasons),
        # A call refused before sipbridge saw it (SIPp's scenario counts a rejection as an
        # end) has no record: every call placed must have one, ended by its caller.
        "callsLost": placed - reasons.get("customer-ended-call", 0),
        "framesToCallers": frames,
        "lateFrames": late,
        "rssGrowthAfterWarmupPercent": rss_growth,
        "liveCallsAfterWarmup": (
            f"{min(s['liveCalls'] for s in warm[:-1])} / {max(s['liveCalls'] for s in warm)}"
            if len(warm) > 1
            else None
        ),
        "rssKiB": {
            "start": samples[0]["rssKiB"] if samples else None,
            "end": samples[-1]["rssKiB"] if samples else None,
            "max": max((s["rssKiB"] for s in samples), default=None),
        },
        "fds": {
            "start": samples[0]["fds"] if samples else None,
            "end": samples[-1]["fds"] if samples else None,
            "max": max((s["fds"] for s in samples), default=None),
        },
        "samples": samples,
    }


def _span(samples: list[dict[str, Any]], key: str) -> dict[str, Any]:
    values = [sample[key] for sample in samples]
    return {
        "start": values[0] if values else None,
        "end": values[-1] if values else None,
        "max": max(values, default=None),
    }


def write_results(result: dict[str, Any], name: str = "soak") -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    rss, fds = result["rssKiB"], result["fds"]
    rows = [
        ("concurrent calls", f"{result['concurrentCalls']} ({result['callSeconds']} s each)"),
        ("duration", f"{result['minutes']} min"),
        (
            "calls placed / SIPp successful / failed",
            f"{result['callsPlaced']} / {result['sippSuccessful']} / {result['sippFailed']}",
        ),
        ("call records", f"{result['callRecords']}, ended reasons {result['endedReasons']}"),
        ("calls lost (placed minus ended by their caller)", str(result["callsLost"])),
        ("live calls sampled after warm-up, min / max", result["liveCallsAfterWarmup"]),
        ("frames to callers, late > 5 ms", f"{result['framesToCallers']}, {result['lateFrames']}"),
        ("RSS KiB start / end / max", f"{rss['start']} / {rss['end']} / {rss['max']}"),
        ("RSS growth after warm-up", f"{result['rssGrowthAfterWarmupPercent']} %"),
        ("open fds start / end / max", f"{fds['start']} / {fds['end']} / {fds['max']}"),
    ]
    header = [
        "# soak",
        "",
        f"`{result['command']}` on {result['machine']}, Python {result['python']}, "
        f"{result['when']}",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    lines = header + [f"| {name} | {value} |" for name, value in rows] + [""]
    (RESULTS / f"{name}.md").write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--call-seconds", type=int, default=120)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--state-dir", type=Path, default=ROOT / ".lab" / "soak")
    parser.add_argument(
        "--record",
        choices=("yes", "no"),
        default="yes",
        help="record every call (the default, as the product does) or none",
    )
    parser.add_argument(
        "--out", default="soak", help="results name: benchmarks/results/<out>.json and .md"
    )
    parser.add_argument("--echo-pipeline", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_pipeline:
        asyncio.run(run_echo_pipeline(args.echo_pipeline))
        return 0
    if os.geteuid() != 0:
        print("soak: the lab's Asterisk runs under chroot: run as root", file=sys.stderr)
        return 1
    result = asyncio.run(
        soak(
            args.calls,
            args.minutes,
            args.call_seconds,
            args.sample_s,
            args.state_dir,
            record=args.record == "yes",
        )
    )
    # Every call's WAV files (17 GB in an hour at 100 calls) were only written to be measured.
    shutil.rmtree(args.state_dir / "recordings", ignore_errors=True)
    write_results(result, args.out)
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=1))
    return 0 if result["callsLost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
