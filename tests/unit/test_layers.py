"""The layout stays honest: arrows point down only, no circles inside engine/, only hypervisor/
imports libvirt (DESIGN.md "Layers")."""

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
