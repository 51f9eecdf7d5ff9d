"""The architecture, checked: pure core, thin edges that never import each other, one root."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "bridge"

# Pure: bytes in, events out; time comes in as an argument. No sockets, threads, clocks or DBs.
CORE = {
    "bridge",
    "bridge.errors",
    "bridge.settings",
    "bridge.models",
    "bridge.templating",
    "bridge.routing",
    "bridge.calls",
    "bridge.events",
    "bridge.messages",
    "bridge.metrics",
    "bridge.audio",
}
CORE_PREFIXES = ("bridge.protocol",)
FORBIDDEN_IN_CORE = {
    "asyncio",
    "socket",
    "ssl",
    "threading",
    "time",
    "sqlite3",
    "select",
    "selectors",
    "aiohttp",
    "websockets",
    "panoramisk",
    "greenswitch",
    "gevent",
    "urllib.request",
    "subprocess",
}
# Edges each wrap one outside thing; they meet only in the flow and the composition root.
EDGE_PREFIXES = (
    "bridge.store",
    "bridge.webhooks",
    "bridge.pbx",
    "bridge.media",
    "bridge.pipeline",
    "bridge.client",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


MODULES = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def is_core(name: str) -> bool:
    return name in CORE or name.startswith(CORE_PREFIXES)


def edge_of(name: str) -> str | None:
    return next(
        (prefix for prefix in EDGE_PREFIXES if name == prefix or name.startswith(prefix + ".")),
        None,
    )


def test_the_core_is_pure() -> None:
    problems = []
    for name, imported in MODULES.items():
        if not is_core(name):
            continue
        for target in imported:
            if target.split(".")[0] in FORBIDDEN_IN_CORE or target in FORBIDDEN_IN_CORE:
                problems.append(f"{name} imports {target}")
            if target.startswith("bridge") and not is_core(target):
                problems.append(f"{name} imports the non-core {target}")
    assert problems == []


def test_edges_do_not_import_each_other() -> None:
    problems = []
    for name, imported in MODULES.items():
        own = edge_of(name)
        if own is None:
            continue
        for target in imported:
            other = edge_of(target)
            if other is not None and other != own:
                problems.append(f"{name} imports {target}")
    assert problems == []


def test_only_the_root_and_the_cli_know_the_service() -> None:
    importers = {name for name, imported in MODULES.items() if "bridge.service" in imported}
    assert importers <= {"bridge.cli"}
    assert {name for name, imported in MODULES.items() if "bridge.cli" in imported} <= {
        "bridge.__main__"
    }
    assert not any(
        t.startswith(("bridge.pbx", "bridge.media", "bridge.pipeline"))
        for t in MODULES["bridge.api"]
    )


def test_the_check_sees_the_package() -> None:
    assert {"bridge.routing", "bridge.service", "bridge.api"} <= set(MODULES)
