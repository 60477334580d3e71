"""Named sets of VM and lcm states live in ``engine/core/states.py`` only, and keep their members;
job states are ``JobState`` members whose values are the strings the catalog stores and JSON
shows."""

from __future__ import annotations

import ast
from pathlib import Path

import orjson
from sqlalchemy import text

from vmkeep import jsontext
from vmkeep.cli.jobs_cmd import list_cmd
from vmkeep.config import load_config
from vmkeep.engine.core import jobs, states
from vmkeep.engine.core.context import Context
from vmkeep.model import JobState
from vmkeep.model import LcmState as L
from vmkeep.model import VmState as S

SRC = Path(__file__).parents[2] / "src" / "vmkeep"
STATES_PY = SRC / "engine" / "core" / "states.py"


def _state_enums(tree: ast.Module) -> dict[str, str]:
    """The names a module gives LcmState and VmState (``import ... as L`` too)."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "vmkeep.model":
            for a in node.names:
                if a.name in ("LcmState", "VmState"):
                    out[a.asname or a.name] = a.name
    return out


def _members(node: ast.AST, enums: dict[str, str]) -> list[str]:
    """The enum of each element of ``node`` that is a LcmState or VmState member."""
    elts = node.elts if isinstance(node, ast.Set | ast.Tuple | ast.List) else []
    return [
        enums[e.value.id]
        for e in elts
        if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id in enums
    ]


def _is_state_set(node: ast.AST, enums: dict[str, str]) -> bool:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        wraps = node.func.id in ("set", "frozenset") and bool(node.args)
        return wraps and bool(_members(node.args[0], enums))
    members = _members(node, enums)
    if isinstance(node, ast.Set):
        return bool(members)
    return len(members) >= 2 and len(set(members)) == 1


def state_sets(root: Path, skip: Path | None = None) -> list[str]:
    """Module-level assignments (``file:line``) under ``root`` that hold a set of states: a set
    literal or ``set()``/``frozenset()`` of LcmState or VmState members, or a tuple or list of two
    or more members of one of them. A (VmState, LcmState) pair is one VM's state, not a set."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if path == skip:
            continue
        tree = ast.parse(path.read_text())
        enums = _state_enums(tree)
        for stmt in tree.body if enums else []:
            if not isinstance(stmt, ast.Assign | ast.AnnAssign) or stmt.value is None:
                continue
            if any(_is_state_set(node, enums) for node in ast.walk(stmt.value)):
                found.append(f"{path.relative_to(root)}:{stmt.lineno}")
    return found


def test_state_sets_are_defined_in_states_py_only() -> None:
    assert state_sets(SRC, skip=STATES_PY) == [], "move them to engine/core/states.py"


def test_the_scan_finds_state_sets(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text(
        "from vmkeep.model import LcmState as X, VmState\n"
        "A = {X.BACKUP}\n"
        "B = frozenset([X.RUNNING, X.POWEROFF])\n"
        "C = (VmState.DONE, VmState.HOLD)\n"
        "PAIR = (VmState.ACTIVE, X.RUNNING)\n"
        "MAP = {'a': (VmState.ACTIVE, X.RUNNING), 'e': (VmState.UNKNOWN, X.UNKNOWN)}\n"
        "ONE = X.BACKUP\n"
    )
    assert state_sets(tmp_path) == ["m.py:2", "m.py:3", "m.py:4"]
    assert state_sets(SRC / "engine" / "core") != []  # states.py's own sets


def test_state_sets_keep_their_members() -> None:
    busy = {L.BACKUP, L.BACKUP_POWEROFF, L.QUIESCING, L.QUIESCED, L.UNQUIESCING, L.RESTORE,
            L.ERROR, *states.TRANSIENT, *states.FAILURES}  # fmt: skip
    members = {
        "ON_HOST": {L.RUNNING, L.POWEROFF},
        "FAILURES": {L.BOOT_FAILURE, L.EPILOG_FAILURE},
        "STALE_STATES": {L.BACKUP, L.BACKUP_POWEROFF, L.QUIESCING, L.UNQUIESCING, L.RESTORE},
        "QUIESCE_STATES": {L.QUIESCING, L.QUIESCED, L.UNQUIESCING},
        "BUSY_STATES": busy,
        "OFF_HOST": {S.PENDING, S.HOLD, S.STOPPED, S.UNDEPLOYED, S.DONE},
    }
    for name, wanted in members.items():
        assert getattr(states, name) == wanted, name
    # each set is a frozenset with a comment above it that says what it means
    lines = STATES_PY.read_text().splitlines()
    sets = [
        stmt
        for stmt in ast.parse(STATES_PY.read_text()).body
        if isinstance(stmt, ast.Assign)
        and isinstance(stmt.value, ast.Call)
        and getattr(stmt.value.func, "id", "") == "frozenset"
        and isinstance(stmt.value.args[0], ast.Set)
    ]
    assert len(sets) >= 7
    for stmt in sets:
        name = ast.unparse(stmt.targets[0])
        assert isinstance(getattr(states, name), frozenset), name
        assert lines[stmt.lineno - 2].startswith("# "), name


def test_job_states_are_the_stored_strings() -> None:
    assert [s.value for s in JobState] == ["QUEUED", "RUNNING", "DONE", "FAILED", "CANCELLED"]
    assert all(s == s.value and str(s) == s.value for s in JobState)
    final = jobs.FINAL
    assert final == {"DONE", "FAILED", "CANCELLED"} and isinstance(final, frozenset)
    assert all(isinstance(s, JobState) for s in final)
    choice = next(p for p in list_cmd.params if p.name == "state")
    assert list(choice.type.choices) == [s.value for s in JobState]  # type: ignore[attr-defined]


def test_job_rows_and_json_hold_the_plain_strings(clean_env: Path) -> None:
    ctx = Context(load_config())
    queued = jobs.enqueue(ctx, "backup", "web", {}, "api", "t")
    assert orjson.loads(jsontext.dumps(queued))["state"] == "QUEUED"
    cancelled = jobs.cancel(ctx, queued["id"])
    assert orjson.loads(jsontext.dumps(cancelled))["state"] == "CANCELLED"
    with jobs.recorded(ctx, "verify", "web", {}) as progress:
        progress.result = {"ok": True}
    with ctx.catalog.session() as s:
        rows = s.execute(text("SELECT state FROM jobs ORDER BY id")).scalars().all()
    assert rows == ["CANCELLED", "DONE"] and all(type(r) is str for r in rows)
    listed = jobs.list_jobs(ctx, "done")
    assert [j["state"] for j in listed] == ["DONE"] and type(listed[0]["state"]) is str
