"""How the wire parsers' cost grows with hostile input: linear, not quadratic or worse.

Times :func:`bridge.protocol.ami.parse_name_addr` on From values of N spaces (the shape that
made the regex it replaced cubic: 1,600 spaces took about 2 s), and :class:`EslDecoder` on a
header block of N bytes arriving one byte at a time (it used to search the whole buffer again
for every byte). If the cost is linear, 10 times the input costs about 10 times the time.

Usage (writes benchmarks/results/parsers.json and prints a table)::

    .venv/bin/python benchmarks/parsers.py
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.protocol.ami import parse_name_addr  # noqa: E402
from bridge.protocol.esl import EslDecoder  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def best_of(runs: int, work: Callable[[], object]) -> float:
    """The fastest of ``runs`` runs, in seconds."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def esl_byte_by_byte(size: int) -> None:
    block = b"Content-Type: api/response\nX-Pad: " + b"a" * size + b"\n\n"
    decoder = EslDecoder(max_header_bytes=size + 100)
    for index in range(len(block)):
        decoder.receive_data(block[index : index + 1])
        decoder.next_message()


def main() -> None:
    rows = []
    for size in (1_600, 10_000, 100_000):
        spaces = " " * size
        rows.append(
            {
                "input_chars": size,
                "name_addr_spaces_s": best_of(3, partial(parse_name_addr, spaces)),
                "name_addr_spaces_then_lt_s": best_of(
                    3, partial(parse_name_addr, "a" + spaces + '"' + spaces + "<")
                ),
                "esl_header_byte_by_byte_s": best_of(1, partial(esl_byte_by_byte, size)),
            }
        )
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
        "machine": platform.platform(),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "parsers.json").write_text(json.dumps(result, indent=2) + "\n")
    print('| input chars | name-addr: spaces | name-addr: a␠…"␠…< | ESL block byte by byte |')
    print("|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['input_chars']:,} | {row['name_addr_spaces_s'] * 1000:.2f} ms "
            f"| {row['name_addr_spaces_then_lt_s'] * 1000:.2f} ms "
            f"| {row['esl_header_byte_by_byte_s'] * 1000:.1f} ms |"
        )


if __name__ == "__main__":
    main()
