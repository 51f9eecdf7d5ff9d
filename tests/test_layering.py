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
    "bridge.recording",
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
# Edges each wrap one outside thing, and so do the PBX backends and the media engine: none of
# them imports another; they meet only in the flow and the composition root.
EDGE_PREFIXES = (
    "bridge.store",
    "bridge.webhooks",
    "bridge.pbx",
    "bridge.media",
    "bridge.pipeline",
    "bridge.client",
    "bridge.recordings",
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


# Every module, bottom to top (docs/architecture.md, "The layers"). A name ending in ".*" is
# every module below that package.
LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("core", frozenset(CORE | {"bridge.backend", "bridge.protocol", "bridge.protocol.*"})),
    (
        "tools",
        frozenset({"bridge.tasks", "bridge.logs", "bridge.overload", "bridge.tls", "bridge.legs"}),
    ),
    (
        "edges",
        frozenset(
            {
                "bridge.store",
                "bridge.webhooks",
                "bridge.pipeline",
                "bridge.client",
                "bridge.recordings",
            }
        ),
    ),
    ("backends", frozenset({"bridge.pbx", "bridge.pbx.*"})),
    ("engine", frozenset({"bridge.media", "bridge.media.*"})),
    (
        "flow",
        frozenset({"bridge.records", "bridge.resources", "bridge.conversation", "bridge.callflow"}),
    ),
    ("surfaces", frozenset({"bridge.api", "bridge.demo", "bridge.lab", "bridge.lab.*"})),
    ("root", frozenset({"bridge.service"})),
    ("entry", frozenset({"bridge.cli", "bridge.__main__"})),
)


def layer_of(name: str) -> int | None:
    for index, (_, members) in enumerate(LAYERS):
        for member in members:
            if name == member or (
                member.endswith(".*") and name.startswith(member.removesuffix("*"))
            ):
                return index
    return None


def test_every_module_has_a_layer() -> None:
    assert sorted(name for name in MODULES if layer_of(name) is None) == []


def test_imports_never_run_back_up() -> None:
    problems = []
    for name, imported in MODULES.items():
        own = layer_of(name)
        assert own is not None
        for target in imported:
            if target in MODULES and (other := layer_of(target)) is not None and other > own:
                problems.append(f"{name} ({LAYERS[own][0]}) imports {target} ({LAYERS[other][0]})")
    assert problems == []


def test_a_pbx_package_never_imports_another() -> None:
    """Adding or removing a PBX touches its own package (and the factory in bridge.pbx) only."""
    problems = [
        f"{name} imports {target}"
        for name, imported in MODULES.items()
        if name.startswith("bridge.pbx.")
        for target in imported
        if target.startswith("bridge.pbx.") and name.split(".")[2] != target.split(".")[2]
    ]
    assert problems == []


def test_the_check_sees_the_package() -> None:
    assert {"bridge.routing", "bridge.service", "bridge.api", "bridge.pbx.freeswitch.link"} <= set(
        MODULES
    )
