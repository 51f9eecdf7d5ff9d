"""Benchmark of template rendering: how long hostile templates hold the event loop, and what a
normal template costs.

Rendering is synchronous on the event loop, so a render's time is how long every call's audio
and ``/health`` wait. Each case runs in a child process of its own (a runaway one is stopped at
``--timeout`` and cannot disturb the next), which renders it on a running asyncio loop next to a
task ticking every millisecond: the longest gap between ticks is the stall the render caused.

Before vs after a change: run once with ``--source`` pointing at a checkout of the old code and
``--label before``, once on the current one with ``--label after``; both land in one results
file (``benchmarks/results/templating.json`` and ``.md``), each with its command and machine.

Usage::

    git archive <old commit> bridge | tar -x -C /tmp/old
    .venv/bin/python benchmarks/templating.py --source /tmp/old --label before
    .venv/bin/python benchmarks/templating.py --label after
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).parents[1]
NOW = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
TICK_S = 0.001


def _doublings(filter_: str, rounds: int, start: str, tail: str) -> str:
    return f"{{% assign x = {start} %}}" + f"{{% assign x = x | {filter_}: x %}}" * rounds + tail


GREW = "{% if x > 1 %}grew{% endif %}"
# name -> (template, variables): the examples first, then the other ways to grow.
HOSTILE: dict[str, tuple[str, dict[str, Any]]] = {
    "date with a 300-character tz": ('{{ "now" | date: "%H:%M", tz }}', {"tz": "A" * 300}),
    "modulo: 0 on a decimal": ("{{ 3.5 | modulo: 0 }}", {}),
    "sum of split '1,a'": ('{{ x | split: "," | sum }}', {"x": "1,a"}),
    "date of a 20-digit number": ('{{ 99999999999999999999 | date: "%Y" }}', {}),
    "times: x, 24 rounds": (_doublings("times", 24, "2", GREW), {}),
    "times: x, 26 rounds": (_doublings("times", 26, "2", GREW), {}),
    "append: x, 26 rounds": (_doublings("append", 26, '"ab"', "{{ x | size }}"), {}),
    "replace each char with the string (400 chars)": (
        '{% assign x = "' + "a" * 400 + '" %}{{ x | replace: "a", x | size }}',
        {},
    ),
    "join 5,000 items with a 1,000-char separator": (
        '{% assign s = "' + "b" * 1000 + '" %}{{ (1..5000) | join: s | size }}',
        {},
    ),
    "uniq of 5,000 items": ('{{ (1..5000) | join: "," | split: "," | uniq | size }}', {}),
    "240 empty loops of 10,000": ("{% for i in (1..10000) %}{% endfor %}" * 240, {}),
    "10,000 appends of 50 KB": (
        "{% for i in (1..10000) %}{% assign y = x | append: x %}{% endfor %}{{ y | size }}",
        {"x": "z" * 50_000},
    ),
    "1,000 nested ifs": ("{% if true %}" * 1000 + "x" + "{% endif %}" * 1000, {}),
    "100 KB of outputs": ("{{ x }}" * 14_285, {"x": "y"}),
}
FIRST_MESSAGE = "Hello {{first_name}}, you've reached Acme over SIP."
SYSTEM_PROMPT = (
    "You are Acme's receptionist. Today is {{ 'now' | date: '%A %B %-d, %Y', 'Europe/Paris' }}.\n"
    "The caller is {{ first_name | default: 'a customer' }} ({{ customer.number }}).\n"
    "{% if account_id %}Their account is {{ account_id | upcase }}.{% else %}No account."
    "{% endif %}\n"
    "{% for item in topics %}- {{ forloop.index }}. {{ item | capitalize }}\n{% endfor %}"
    + "Be brief, be kind, never read out an account number in full. "
    * 30
)
NORMAL: dict[str, tuple[str, dict[str, Any]]] = {
    "firstMessage": (FIRST_MESSAGE, {"first_name": "John"}),
    "system prompt (~2 KB, date, if, for)": (
        SYSTEM_PROMPT,
        {
            "first_name": "John",
            "customer": {"number": "+15551230000"},
            "account_id": "ac-42",
            "topics": ["billing", "outage", "moving"],
        },
    ),
}


def child(kind: str, name: str, source: str | None, runs: int) -> dict[str, Any]:
    if source:
        sys.path.insert(0, source)
    sys.path.insert(1, str(ROOT))
    templating = importlib.import_module("bridge.templating")

    template, variables = (HOSTILE if kind == "hostile" else NORMAL)[name]
    # As the service renders: with the thread's CPU clock where the code takes one.
    render: Any = templating.render
    if "cpu_clock" in inspect.signature(render).parameters:
        render = partial(render, cpu_clock=time.thread_time)
    if kind == "normal":
        render(template, variables, NOW)  # parsed once, as in a service
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            render(template, variables, NOW)
            times.append(time.perf_counter() - start)
        return {"medianUs": round(statistics.median(times) * 1e6, 1), "runs": runs}

    async def one_render() -> tuple[float, float, float, str]:
        gaps: list[float] = []

        async def ticker() -> None:
            last = time.perf_counter()
            while True:
                await asyncio.sleep(TICK_S)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticks = asyncio.create_task(ticker())
        await asyncio.sleep(0.02)
        cpu, wall = time.process_time(), time.perf_counter()
        output = render(template, variables, NOW)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        await asyncio.sleep(0.02)
        ticks.cancel()
        return wall, cpu, max(gaps), output

    walls, cpus, stalls = [], [], []
    output = ""
    for _ in range(runs):
        wall, cpu, stall, output = asyncio.run(one_render())
        walls.append(wall)
        cpus.append(cpu)
        stalls.append(stall)
        if wall > 1:  # one run of a runaway is enough
            break
    return {
        "renderMsMax": round(max(walls) * 1000, 2),
        "cpuMsMax": round(max(cpus) * 1000, 2),
        "loopStallMsMax": round(max(stalls) * 1000, 2),
        "outcome": "literal" if output == template else "rendered",
        "outputChars": len(output),
        "maxRssMb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "runs": len(walls),
    }


def run_case(kind: str, name: str, source: str | None, runs: int, timeout: float) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", kind, name, "--runs", str(runs)]
    if source:
        command += ["--source", source]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return {"name": name, "outcome": f"stopped after {timeout:g} s", "renderMsMax": None}
    except subprocess.CalledProcessError as exc:
        last = (exc.stderr.strip().splitlines() or ["?"])[-1]
        return {"name": name, "outcome": f"raised: {last[:120]}", "renderMsMax": None}
    return {"name": name, **json.loads(done.stdout)}


def table(runs: dict[str, Any]) -> str:
    labels = sorted(runs, key=lambda label: label != "before")
    lines = [
        "| hostile template | "
        + " | ".join(f"{label}: render ms / loop stall ms / outcome" for label in labels)
        + " |",
        "|---|" + "---|" * len(labels),
    ]
    for name in HOSTILE:
        cells = []
        for label in labels:
            r = next((c for c in runs[label]["hostile"] if c["name"] == name), None)
            if r is None:
                cells.append("–")
            elif r["renderMsMax"] is None:
                cells.append(r["outcome"])
            else:
                cells.append(
                    f"{r['renderMsMax']} / {r['loopStallMsMax']} / {r['outcome']}"
                    f" ({r['outputChars']} chars, {r['maxRssMb']} MB RSS)"
                )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| normal template | " + " | ".join(f"{label}: µs per render" for label in labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for name in NORMAL:
        cells = [
            str(next(c["medianUs"] for c in runs[label]["normal"] if c["name"] == name))
            for label in labels
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=2, metavar=("KIND", "NAME"), help=argparse.SUPPRESS)
    parser.add_argument("--source", help="a directory holding the bridge package to measure")
    parser.add_argument("--label", default="after")
    parser.add_argument("--runs", type=int, default=5, help="renders per hostile case")
    parser.add_argument("--normal-runs", type=int, default=5000)
    parser.add_argument("--timeout", type=float, default=120, help="seconds per hostile case")
    parser.add_argument("--out", type=Path, default=RESULTS / "templating.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.source, args.runs)))
        return
    hostile = []
    for name in HOSTILE:
        print(f"{args.label}: {name}…", file=sys.stderr)
        hostile.append(run_case("hostile", name, args.source, args.runs, args.timeout))
    normal = [
        run_case("normal", name, args.source, args.normal_runs, args.timeout) for name in NORMAL
    ]
    document: dict[str, Any] = {"benchmark": "templating", "runs": {}}
    if args.out.exists():
        document = json.loads(args.out.read_text())
    document["runs"][args.label] = {
        "command": "benchmarks/templating.py " + " ".join(sys.argv[1:]),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "hostile": hostile,
        "normal": normal,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    header = "\n".join(
        f"- {label}: `{run['command']}` on {run['machine']}, Python {run['python']}, {run['when']}"
        for label, run in sorted(document["runs"].items(), key=lambda item: item[0] != "before")
    )
    text = table(document["runs"])
    args.out.with_suffix(".md").write_text(f"# templating\n\n{header}\n\n{text}\n")
    print(text)
    print(f"\nwritten: {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
