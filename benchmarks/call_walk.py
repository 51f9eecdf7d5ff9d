"""How one whole call walks through the package: the modules it enters and the moves between them.

Runs one end-to-end test (by default the FreeSWITCH call from park to report, which takes a call
through the backend, routing, the assistant-request machinery, the pipeline, the media session
and the report) with a profile hook that notes every call from one ``bridge`` module into
another. A *move* is a distinct (caller module, callee module, callee function); a module's
*entries* are the moves into it; a move *back up a layer* calls a module that sits above the
caller in the import graph (a module's layer is one more than the highest layer it imports), as
callbacks and two-way couplings do. Structure, not speed: the figures do not depend on the
machine.

Usage (writes benchmarks/results/call_walk.json and prints a table)::

    .venv/bin/python benchmarks/call_walk.py [pytest node id]
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Generator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tests package, when run as a script

from tests.test_layering import MODULES  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TEST = "tests/test_service.py::test_a_call_through_freeswitch_from_park_to_report"


def layers(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's layer: 0 for one that imports no other module of the package."""
    found: dict[str, int] = {}

    def layer(name: str, path: tuple[str, ...] = ()) -> int:
        if name not in found:
            below = [d for d in graph.get(name, ()) if d in graph and d != name and d not in path]
            found[name] = 1 + max((layer(d, (*path, name)) for d in below), default=-1)
        return found[name]

    for name in graph:
        layer(name)
    return found


class Walk:
    """A pytest plugin that records the moves between package modules during the test."""

    def __init__(self, graph: dict[str, set[str]]) -> None:
        self.graph = graph
        self.moves: dict[tuple[str, str, str], None] = {}

    def _profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call":
            return
        callee = frame.f_globals.get("__name__", "")
        if callee not in self.graph:
            return
        caller = frame.f_back
        while caller is not None and not caller.f_globals.get("__name__", "").startswith("bridge"):
            caller = caller.f_back
        if caller is None:
            return  # resumed by the event loop, or called by the test: not a move
        source = caller.f_globals["__name__"]
        if source != callee:
            self.moves.setdefault((source, callee, frame.f_code.co_qualname), None)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        sys.setprofile(self._profile)
        try:
            yield
        finally:
            sys.setprofile(None)


def main(argv: list[str]) -> int:
    test = argv[0] if argv else DEFAULT_TEST
    # The import graph tests/test_layering.py checks, within the package.
    graph = {
        name: {i for i in imported if i.startswith("bridge")} for name, imported in MODULES.items()
    }
    level = layers(graph)
    walk = Walk(graph)
    code = pytest.main(["-q", "-p", "no:cacheprovider", test], plugins=[walk])
    if code != 0:
        return int(code)
    moves = list(walk.moves)
    entries = Counter(callee for _, callee, _ in moves)
    up = [(a, b, f) for a, b, f in moves if level[b] > level[a]]
    back_up = [f"{a} -> {b}.{f}" for a, b, f in up]
    result: dict[str, Any] = {
        "test": test,
        "modulesEntered": len(entries),
        "moves": len(moves),
        "movesBackUp": len(up),
        "entries": dict(entries.most_common()),
        "backUp": back_up,
        "layers": {name: level[name] for name in sorted(entries)},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "call_walk.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"modules entered {len(entries)}, moves {len(moves)}, back up a layer {len(up)}")
    for name, count in entries.most_common():
        print(f"  {name:40s} entered {count:2d} times (layer {level[name]})")
    for line in back_up:
        print(f"  up: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
