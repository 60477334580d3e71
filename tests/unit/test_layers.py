"""The layout stays honest: arrows point down only, no circles inside engine/, the engine's rooms
import only rooms of a lower rank, only hypervisor/ imports libvirt, the adapters (cli/, api/,
web/) reach the engine and not each other (docs/architecture.md)."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "vmkeep"
LOWER = ("catalog", "hypervisor", "datastores", "model", "errors", "config", "names", "faults")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        if "migrations" in path.parts:
            continue
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[module_name(path)] = deps
    return graph


def test_only_hypervisor_imports_libvirt() -> None:
    offenders = [
        m
        for m, deps in imports().items()
        if any(d.split(".")[0] in ("libvirt", "libvirt_qemu") for d in deps)
        and not m.startswith("vmkeep.hypervisor")
    ]
    assert offenders == []


def test_lower_layers_never_import_engine_or_adapters() -> None:
    bad = [
        (m, d)
        for m, deps in imports().items()
        if m.count(".") and m.split(".")[1] in LOWER
        for d in deps
        if d.startswith(("vmkeep.engine", "vmkeep.cli"))
    ]
    assert bad == []


def test_engine_has_no_import_cycles() -> None:
    graph = imports()
    engine = {m for m in graph if m.startswith("vmkeep.engine.")}
    edges = {m: {d for d in graph[m] if d in engine and d != m} for m in engine}
    try:
        list(TopologicalSorter(edges).static_order())
    except CycleError as err:  # pragma: no cover - the message is the point
        raise AssertionError(f"import cycle in engine/: {err.args[1]}") from None


# engine/'s rooms by rank: a room imports only rooms of a lower rank (and itself)
RANKS = {
    "core": 0,
    "vm": 1,
    "hosts": 1,
    "points": 2,
    "lifecycle": 2,
    "protect": 3,
    "restore": 3,
    "groups": 4,
    "service": 5,
}


def room(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 3 and parts[:2] == ["vmkeep", "engine"] else None


def test_every_engine_module_is_in_a_ranked_room() -> None:
    engine = SRC / "engine"
    loose = [p.name for p in engine.glob("*.py") if p.name != "__init__.py"]
    rooms = {p.name for p in engine.iterdir() if (p / "__init__.py").exists()}
    assert loose == [], "put each engine module in one of the rooms of RANKS"
    assert rooms == set(RANKS)
    assert all((engine / r / "__init__.py").read_text().startswith('"""') for r in rooms)


def test_rooms_import_only_lower_ranks() -> None:
    bad = []
    for m, deps in imports().items():
        own = room(m)
        if own is None:
            continue
        for d in deps:
            other = room(d)
            if other is not None and other != own and RANKS[other] >= RANKS[own]:
                bad.append(f"{m} -> {d}")
    assert sorted(set(bad)) == []


def test_adapters_reach_the_engine_not_each_other() -> None:
    """cli/ never imports api/ (but the command that starts the daemon) nor web/, api/ never
    imports cli/, and web/ (the dashboard, served by the API's app) never imports cli/; of api/
    only app.py imports web/ (to mount it)."""
    bad = [
        (m, d)
        for m, deps in imports().items()
        for d in deps
        if (
            m.startswith("vmkeep.cli.")
            and d.startswith("vmkeep.api")
            and m != "vmkeep.cli.daemon_cmd"
        )
        or (m.startswith("vmkeep.cli") and d.startswith("vmkeep.web"))
        or (m.startswith(("vmkeep.api", "vmkeep.web")) and d.startswith("vmkeep.cli"))
        or (m.startswith("vmkeep.api") and d.startswith("vmkeep.web") and m != "vmkeep.api.app")
    ]
    assert bad == []


def test_the_engine_never_imports_an_adapter() -> None:
    """engine/ serves the CLI, the API and the web pages; it imports none of them."""
    bad = [
        (m, d)
        for m, deps in imports().items()
        if m.startswith("vmkeep.engine")
        for d in deps
        if d.startswith(("vmkeep.cli", "vmkeep.api", "vmkeep.web"))
    ]
    assert bad == []
