"""Benchmark of the assistant-request budget: how long a call really waits for a silent server.

Vapi's assistant-request budget is 7.5 s. ``WebhookClient.assistant_request`` is sent to a local
aiohttp server that never answers, ``--requests`` times, each started at a random moment within
``--spread`` seconds (deadlines then fall at every phase of the loop's clock, which is what
aiohttp's whole-second rounding depends on). Each elapsed time is measured with
``time.monotonic()`` around the call; the figure that matters is the overshoot past the budget.

Run it on the code to compare (``--label``), e.g. the commit before the fix and after it::

    git archive <commit> bridge | tar -x -C /tmp/before
    PYTHONPATH=/tmp/before .venv/bin/python benchmarks/webhooks.py --label before
    .venv/bin/python benchmarks/webhooks.py --label after

Each run replaces its label's entry in benchmarks/results/webhooks.json and rewrites
benchmarks/results/webhooks.md from all entries.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bridge.messages import WebhookTarget
from bridge.metrics import Metrics
from bridge.routing import ASSISTANT_REQUEST_BUDGET_S
from bridge.settings import WebhookSettings
from bridge.webhooks import WebhookClient

RESULTS = Path(__file__).parent / "results"


async def silent_server(stopping: asyncio.Event) -> tuple[web.AppRunner, str]:
    """An HTTP server on 127.0.0.1 that reads each request and never answers it."""

    async def hold(request: web.Request) -> web.Response:
        await request.read()
        await stopping.wait()
        return web.Response(status=503)

    app = web.Application()
    app.router.add_post("/hook", hold)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/hook"


async def measure(requests: int, spread_s: float, budget_s: float) -> list[float]:
    """Elapsed seconds of each abandoned assistant-request."""
    stopping = asyncio.Event()
    runner, url = await silent_server(stopping)
    rng = random.Random(7)
    try:
        async with aiohttp.ClientSession() as session:
            client = WebhookClient(session, WebhookSettings(), Metrics())

            async def one(delay_s: float) -> float:
                await asyncio.sleep(delay_s)
                started = time.monotonic()
                result = await client.assistant_request(
                    WebhookTarget(url), {"message": {"type": "assistant-request"}}, budget_s
                )
                elapsed = time.monotonic() - started
                assert result.status is None, result
                return elapsed

            return list(
                await asyncio.gather(*(one(rng.uniform(0, spread_s)) for _ in range(requests)))
            )
    finally:
        stopping.set()
        await runner.cleanup()


def summary(elapsed: list[float], budget_s: float) -> dict[str, Any]:
    ordered = sorted(elapsed)
    return {
        "budget_s": budget_s,
        "requests": len(elapsed),
        "elapsed_s": {
            "min": round(ordered[0], 4),
            "p50": round(statistics.median(ordered), 4),
            "max": round(ordered[-1], 4),
            "mean": round(statistics.fmean(ordered), 4),
        },
        "overshoot_ms": {
            "min": round((ordered[0] - budget_s) * 1000, 1),
            "p50": round((statistics.median(ordered) - budget_s) * 1000, 1),
            "max": round((ordered[-1] - budget_s) * 1000, 1),
        },
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# webhooks: the assistant-request budget as spent",
        "",
        "`benchmarks/webhooks.py`: assistant-requests to a local server that never answers, "
        "started at random phases; elapsed = from the call to the abandoned result.",
        "",
        "| label | commit | budget s | requests | elapsed min/p50/max s | overshoot "
        "min/p50/max ms | machine, Python, when |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, entry in results.items():
        e, o = entry["elapsed_s"], entry["overshoot_ms"]
        lines.append(
            f"| {label} | {entry['commit']} | {entry['budget_s']} | {entry['requests']} | "
            f"{e['min']}/{e['p50']}/{e['max']} | {o['min']}/{o['p50']}/{o['max']} | "
            f"{entry['machine']}, Python {entry['python']}, {entry['when']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--spread", type=float, default=1.0, help="start window, seconds")
    parser.add_argument("--budget", type=float, default=ASSISTANT_REQUEST_BUDGET_S)
    parser.add_argument("--label", default="after")
    parser.add_argument("--commit", default="", help="the commit measured, for the table")
    parser.add_argument("--out", type=Path, default=RESULTS / "webhooks.json")
    args = parser.parse_args()
    elapsed = asyncio.run(measure(args.requests, args.spread, args.budget))
    entry = summary(elapsed, args.budget)
    entry.update(
        commit=args.commit,
        command=" ".join(["benchmarks/webhooks.py", *sys.argv[1:]]),
        python=platform.python_version(),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
        when=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results[args.label] = entry
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results))
    print(json.dumps({args.label: entry}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
