"""docs/test-matrix.md is current and every command the README shows has a real-guest test
(scripts/test_matrix.py builds it from the README, the CLI, the API and the test sources)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "test_matrix.py"


def _matrix():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("test_matrix_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_readme_command_has_a_real_guest_test_and_the_matrix_is_current() -> None:
    m = _matrix()
    text, missing = m.build()
    assert not missing, "README commands without a real-guest test: " + ", ".join(
        "vmkeep " + " ".join(c) for c in missing
    )
    assert m.DOC.read_text() == text, "docs/test-matrix.md is stale: python scripts/test_matrix.py"


def test_the_scan_sees_cli_words_api_paths_and_helpers(tmp_path: Path) -> None:
    import ast

    m = _matrix()
    commands = {("vm",), ("vm", "nic"), ("vm", "nic", "attach"), ("backup",)}
    api = [("POST", "/v1/vms/{vm}/actions/suspend"), ("GET", "/v1/vms")]
    routes = [(a, b, m._route_pattern(b)) for a, b in api]
    src = (
        "def helper(vmkeep, c, vm):\n"
        "    vmkeep('vm', 'nic', 'attach', vm)\n"
        "    c.post(f'/v1/vms/{vm}/actions/suspend', json={})\n"
        "    c.get('/v1/vms?limit=5')\n"
    )
    uses = m._scan(ast.parse(src), commands, routes)
    assert uses.commands == {("vm", "nic", "attach")}
    assert uses.routes == {("POST", "/v1/vms/{vm}/actions/suspend"), ("GET", "/v1/vms")}
