"""The action table is the one door: every entry is complete and resolves, the adapters reach
long actions only through it, and an action recorded in-process looks like the daemon's job."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import pytest

from vmkeep.config import load_config
from vmkeep.engine.core import jobs, states
from vmkeep.engine.core.context import Context
from vmkeep.engine.service import actions, runners, tokens
from vmkeep.engine.service.actions import ACTIONS, Action, Caller
from vmkeep.errors import DrillFailed, InvalidValue, MissingValue
from vmkeep.model import Warnings

SRC = Path(__file__).resolve().parents[2] / "src" / "vmkeep"


@pytest.mark.parametrize("a", ACTIONS.values(), ids=list(ACTIONS))
def test_every_entry_is_complete(a: Action) -> None:
    assert a.policy in tokens.POLICY, f"{a.kind}: add its policy key to tokens.POLICY"
    fields = a.model.model_fields
    assert a.target in fields and all(f in fields for f in a.path_fields), a
    assert a.locks in ("vm", "point", "group", "datastore")
    for name in ("check", "run"):
        fn = getattr(runners, f"{name}_{getattr(a, name)}", None)
        assert callable(fn), f"{a.kind}: runners.{name}_{getattr(a, name)} is missing"
        n_args = 4 if name == "check" else 5
        assert len(inspect.signature(fn).parameters) == n_args, fn
    assert a.method in ("POST", "DELETE") and a.summary


def test_every_lifecycle_action_is_an_entry() -> None:
    lifecycle = [a for a in states.RULES if a not in states.DATA_ACTIONS and a != "create"]
    assert sorted(f"vm-{a}" for a in lifecycle) == sorted(k for k in ACTIONS if k.startswith("vm-"))


def test_routes_are_unique() -> None:
    routes = [(a.method, a.route) for a in ACTIONS.values()]
    assert len(routes) == len(set(routes))


def test_bad_params_name_the_field() -> None:
    with pytest.raises(InvalidValue, match="timeout"):
        actions.parse(ACTIONS["drill"], {"backup": 1, "timeout": 0})
    with pytest.raises(InvalidValue, match="nosuch"):
        actions.parse(ACTIONS["backup"], {"vm": "a", "datastore": "d", "nosuch": 1})
    with pytest.raises(InvalidValue, match="--name"):  # as the CLI names it
        actions.parse(ACTIONS["restore"], {"backup": 1, "name": "x" * 300}, options=True)
    with pytest.raises(InvalidValue, match="BACKUP"):
        actions.parse(ACTIONS["restore"], {"backup": -1}, options=True)
    with pytest.raises(InvalidValue, match="kind"):
        actions.action("nosuch")
    # a missing field is named, not the whole request as its value
    with pytest.raises(MissingValue, match=r"^--datastore is required: backup needs it$"):
        actions.parse(ACTIONS["backup"], {"vm": "a"}, options=True)


def _calls(module: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.Call):
            f = node.func
            names.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    return names


def test_adapters_run_long_actions_only_through_the_table() -> None:
    """No adapter records a job itself or calls a long action's engine function: the CLI calls
    ``output.act``, the API the generated routes."""
    long_calls = {
        "recorded", "run_backup", "run_group_backup", "run_restore", "verify", "copy_backup",
        "delete_backup", "run_drill", "scan", "quiesce", "unquiesce", "reset_state",
        "run_action", "start_group", "stop_group", "restore_group", "group_drill",
    }  # fmt: skip
    offenders = {
        str(p.relative_to(SRC)): sorted(_calls(p) & long_calls)
        for folder in ("cli", "api")
        for p in (SRC / folder).glob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.fixture
def ctx(clean_env: Path) -> Context:
    return Context(load_config())


def _fake(result: dict[str, Any], warnings: list[str], error: Exception | None = None) -> Any:
    def run(_ctx: Context, _a: Action, _p: Any, progress: Any, caller: Caller) -> Any:
        assert caller.origin == "cli" and caller.actor.is_admin
        progress(1, 2)
        if error is not None:
            raise error
        return result, Warnings(warnings)

    return run


def test_run_here_records_result_and_warnings_as_the_daemon_does(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runners, "run_verify", _fake({"backup": 3, "files": []}, ["slow disk"]))
    result, warnings = actions.run_here(ctx, ACTIONS["verify"], actions.parse(
        ACTIONS["verify"], {"backup": 3}), lambda _d, _t: None)  # fmt: skip
    assert result == {"backup": 3, "files": []} and warnings.items == ["slow disk"]
    job = jobs.list_jobs(ctx)[0]
    assert (job["kind"], job["target"], job["state"], job["origin"]) == (
        "verify",
        "3",
        "DONE",
        "cli",
    )
    assert job["params"] == {"backup": 3}
    assert job["result"] == {"backup": 3, "files": [], "warnings": ["slow disk"]}
    assert job["exit_code"] == 1  # what the command exited with: done, with warnings


def test_a_failed_action_keeps_the_result_its_error_carries(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    err = DrillFailed(4, 3, 0, "fsck vda")
    err.result = {"drill": 4, "result": "FAIL"}
    monkeypatch.setattr(runners, "run_drill", _fake({}, [], err))
    with pytest.raises(DrillFailed) as raised:
        actions.run_here(ctx, ACTIONS["drill"], actions.parse(ACTIONS["drill"], {"backup": 3}),
                         lambda _d, _t: None)  # fmt: skip
    assert raised.value.result == {"drill": 4, "result": "FAIL"}
    job = jobs.list_jobs(ctx)[0]
    assert (job["state"], job["error"]["code"]) == ("FAILED", "DrillFailed")
    assert job["result"] == {"drill": 4, "result": "FAIL"}
    assert job["exit_code"] == DrillFailed.exit_code == 26


def test_a_queued_job_runs_with_the_actor_the_api_named(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Caller] = []

    def run(_ctx: Context, _a: Action, p: Any, _progress: Any, caller: Caller) -> Any:
        seen.append(caller)
        return {"vm": p.vm}, []

    monkeypatch.setattr(runners, "check_vm_state", lambda _c, _a, p, _actor: p)
    monkeypatch.setattr(runners, "run_quiesce", run)
    from vmkeep.engine.core.trust import Actor

    a = ACTIONS["quiesce"]
    job = actions.enqueue(ctx, a, actions.parse(a, {"vm": "web"}), Actor("ops", "operator"))
    assert (job["kind"], job["target"], job["who"], job["origin"]) == ("quiesce", "web", "ops",
                                                                      "api")  # fmt: skip
    assert job["exit_code"] is None  # not ended
    assert jobs.claim(ctx) == job["id"]
    done = jobs.execute(ctx, job["id"], actions.RUNNERS)
    assert done["state"] == "DONE" and done["result"] == {"vm": "web"}, done
    assert done["exit_code"] == 0
    assert [(c.actor.name, c.actor.role, c.origin) for c in seen] == [("ops", "operator", "api")]


def test_a_vm_s_jobs_name_it_however_it_was_given(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By id or name, queued or run here: the job's target is the VM's name (the overview's
    failed backups, ``backup cancel`` and notifications look a VM's jobs up by name); an unknown
    VM stays as typed (its action says it is not found)."""
    from vmkeep.catalog.tables import Vm
    from vmkeep.engine.core.trust import Actor
    from vmkeep.engine.service import overview

    with ctx.catalog.session() as s:
        vm = Vm(name="web", uuid="u-web", host_uri="fake:///", state="ACTIVE", lcm_state="RUNNING")
        s.add(vm)
        s.flush()
        vm_id = str(vm.id)
    monkeypatch.setattr(runners, "check_vm_state", lambda _c, _a, p, _actor: p)
    monkeypatch.setattr(runners, "check_backup", lambda _c, _a, p, _actor: p)
    q = ACTIONS["quiesce"]
    assert actions.enqueue(ctx, q, actions.parse(q, {"vm": vm_id}), Actor("ops", "operator"))[
        "target"] == "web"  # fmt: skip
    assert actions.enqueue(ctx, q, actions.parse(q, {"vm": "gone"}), Actor("ops", "operator"))[
        "target"] == "gone"  # fmt: skip
    b = ACTIONS["backup"]
    monkeypatch.setattr(runners, "run_backup", _fake({}, [], DrillFailed(1, 1, 0, "x")))
    with pytest.raises(DrillFailed):  # any error: a failed backup of the VM given by its id
        actions.run_here(ctx, b, actions.parse(b, {"vm": vm_id, "datastore": "ds"}),
                         lambda _d, _t: None)  # fmt: skip
    assert jobs.list_jobs(ctx, "failed")[0]["target"] == "web"
    assert overview.summary(ctx)["vms"]["failed"] == 1  # the VM's last backup failed


def test_the_table_loads_without_pydantic() -> None:
    """A command that hands its action to the daemon loads the table, not the params models."""
    import subprocess
    import sys

    code = (
        "import sys, vmkeep.engine.service.actions as a; a.ACTIONS['backup'].path("
        "{'vm': 'web'}, str); print('pydantic' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
