"""Backup policy inheritance (engine/vm/policy.py; docs/policies.md): backup job -> VM -> pool ->
``[backup]`` of the config -> defaults, with the layer that set each key; pools and their
commands and routes; ``vm list`` and ``vm show`` give the same answer as ``effective``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, select

from vmkeep.api.app import create_app
from vmkeep.catalog.tables import BackupJob, Vm
from vmkeep.cli import pool_cmd, vm_cmd
from vmkeep.config import load_config
from vmkeep.engine.core.backup_config import KEYS, BackupConfig, resolve, resolve_named
from vmkeep.engine.core.context import Context
from vmkeep.engine.protect.backup import run_backup
from vmkeep.engine.protect.member import prepare_job
from vmkeep.engine.service import tokens
from vmkeep.engine.vm import inventory, policy
from vmkeep.errors import AlreadyExists, InvalidValue, PoolNotFound, Refused
from vmkeep.hypervisor.fake import SAMPLE_XML, FakeHypervisor
from vmkeep.model import Warnings

# per key, a distinct value for each layer: backupjob, vm, pool, config (the defaults differ)
VALUES: dict[str, tuple[Any, Any, Any, Any]] = {
    "keep_last": (1, 2, 3, 4),
    "keep_hourly": (24, 12, 6, 3),
    "keep_daily": (7, 14, 30, 21),
    "keep_weekly": (4, 8, 2, 1),
    "keep_monthly": (6, 12, 3, 2),
    "keep_yearly": (1, 2, 3, 5),
    "mode": ("full", "increment", "full", "increment"),
    "fs_freeze": ("suspend", "agent", "suspend", "agent"),
    "backup_volatile": ("yes", "no", "yes", "no"),
    "memory": ("no", "yes", "no", "yes"),
    "exclude": ("yes", "no", "yes", "no"),
    "exclude_disks": ("vdc", ["vdb"], "vdd,vde", ["vdf"]),
}
CONFIG_LAYER = {
    "keep_last": 4,
    "keep_hourly": 3,
    "keep_daily": 21,
    "keep_weekly": 1,
    "keep_monthly": 2,
    "keep_yearly": 5,
    "mode": "increment",
    "fs_freeze": "agent",
    "backup_volatile": False,
    "memory": True,
    "exclude": False,
    "exclude_disks": ["vdf"],
}


def test_every_key_has_layer_values() -> None:
    assert set(VALUES) == set(KEYS) == set(CONFIG_LAYER)


def _context(clean_env: Path, backup: dict[str, Any] | None) -> Context:
    lines = ["version = 1"]
    if backup:
        lines.append("[backup]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in backup.items()]
    Path(clean_env.parent / "home" / "config.toml").write_text("\n".join(lines) + "\n")
    return Context(load_config(), _hv=FakeHypervisor())


@pytest.fixture
def ctx(clean_env: Path) -> Context:
    """A fake-hypervisor Context whose config sets every key in ``[backup]``."""
    return _context(clean_env, CONFIG_LAYER)


def add_vm(ctx: Context, name: str, config: dict[str, Any] | None = None) -> None:
    with ctx.catalog.session() as s:
        s.add(Vm(name=name, uuid=f"uuid-{name}", host_uri="fake:///system", state="ACTIVE",
                 lcm_state="RUNNING", backup_config=config or {}))  # fmt: skip


def vm_row(ctx: Context, name: str) -> Vm:
    with ctx.catalog.session() as s:
        return s.execute(select(Vm).where(Vm.name == name)).scalar_one()


def expected(key: str, value: Any) -> Any:
    return getattr(resolve({key: value}), key)


@pytest.mark.parametrize("key", KEYS)
def test_precedence_backupjob_vm_pool_config_default(
    clean_env: Path, ctx: Context, key: str
) -> None:
    job, vm, pool, config = VALUES[key]
    policy.create_pool(ctx, "web", {key: pool})
    add_vm(ctx, "a")
    inventory.configure(ctx, "a", {key: vm, "pool": "web"})

    def check(overrides: dict[str, Any] | None, value: Any, source: str) -> None:
        cfg, sources = policy.effective(ctx, vm_row(ctx, "a"), overrides)
        assert (getattr(cfg, key), sources[key]) == (expected(key, value), source)

    check({key: job}, job, "backupjob")
    check(None, vm, "vm")
    inventory.configure(ctx, "a", {key: "unset"})
    check(None, pool, "pool web")
    check({key: job}, job, "backupjob")
    policy.set_pool(ctx, "web", {key: "UNSET"})
    check(None, config, "config")
    bare = _context(clean_env, None)  # no [backup]: the built-in default
    cfg, sources = policy.effective(bare, vm_row(bare, "a"))
    assert (getattr(cfg, key), sources[key]) == (getattr(BackupConfig(), key), "default")


def test_a_vm_without_pool_has_no_pool_layer(ctx: Context) -> None:
    policy.create_pool(ctx, "web", {"mode": "full", "keep_last": 9})
    add_vm(ctx, "solo", {"fs_freeze": "suspend"})
    cfg, sources = policy.effective(ctx, vm_row(ctx, "solo"))
    assert cfg.keep_last == 4 and str(cfg.mode) == "INCREMENT"  # [backup], not the pool's
    assert sources == dict.fromkeys(KEYS, "config") | {"fs_freeze": "vm"}
    shown = inventory.show_vm(ctx, "solo")
    assert shown["pool"] is None and shown["backup_config_sources"] == sources


def test_bad_stored_values_name_key_and_layer() -> None:
    with pytest.raises(InvalidValue) as e:
        resolve_named([("vm", {}), ("config", {"mode": "diff"})])
    assert "mode (set by config)" in str(e.value) and "full or increment" in str(e.value)
    with pytest.raises(InvalidValue) as e:
        resolve_named([("backupjob", {"colour": "red"})])
    assert "colour" in str(e.value) and "known keys are" in str(e.value)


def test_exclude(ctx: Context) -> None:
    assert BackupConfig().exclude is False
    add_vm(ctx, "a")
    assert inventory.configure(ctx, "a", {"exclude": "yes"})["backup_config"]["exclude"] is True
    with pytest.raises(InvalidValue) as e:
        inventory.configure(ctx, "a", {"exclude": "maybe"})
    assert "exclude" in str(e.value) and "'maybe'" in str(e.value) and "yes or no" in str(e.value)
    policy.create_pool(ctx, "skip", {"exclude": True})
    inventory.configure(ctx, "a", {"exclude": "unset", "pool": "skip"})
    cfg, sources = policy.effective(ctx, vm_row(ctx, "a"))
    assert cfg.exclude is True and sources["exclude"] == "pool skip"


def test_vm_config_pool_must_exist_and_can_be_left(ctx: Context) -> None:
    add_vm(ctx, "a")
    with pytest.raises(PoolNotFound) as e:
        inventory.configure(ctx, "a", {"pool": "nope"})
    assert "'nope'" in str(e.value) and "vmkeep pool create" in str(e.value)
    with pytest.raises(InvalidValue) as e2:
        inventory.configure(ctx, "a", {"pool": ""})
    assert "--no-pool" in str(e2.value)
    assert vm_row(ctx, "a").pool is None
    policy.create_pool(ctx, "web", {})
    assert inventory.configure(ctx, "a", {"pool": "web"})["pool"] == "web"
    assert inventory.configure(ctx, "a", {"mode": "full"})["pool"] == "web"  # not moved
    assert inventory.configure(ctx, "a", {"pool": None})["pool"] is None


def test_pool_crud_and_delete_refused_while_used(ctx: Context) -> None:
    created = policy.create_pool(ctx, "web", {"keep_last": "5", "mode": "inc"})
    assert created["backup_config"] == {"keep_last": 5, "mode": "INCREMENT"}
    assert created["effective"]["fs_freeze"] == "AGENT"  # from [backup]
    assert created["sources"]["keep_last"] == "pool web"
    assert created["sources"]["fs_freeze"] == "config"
    with pytest.raises(AlreadyExists):
        policy.create_pool(ctx, "web", {})
    with pytest.raises(InvalidValue) as e:
        policy.create_pool(ctx, "1234", {})
    assert "pool name" in str(e.value)
    with pytest.raises(InvalidValue):
        policy.create_pool(ctx, "bad", {"keep_last": 0})
    assert [p["name"] for p in policy.list_pools(ctx)] == ["web"]  # nothing half-made

    add_vm(ctx, "a")
    inventory.configure(ctx, "a", {"pool": "web"})
    with ctx.catalog.session() as s:
        s.add(BackupJob(name="nightly", selector={"pool": "web"}, datastore="local",
                        schedule="0 2 * * *"))  # fmt: skip
        s.add(BackupJob(name="other", selector={"pool": "db"}, datastore="local",
                        schedule="0 3 * * *"))  # fmt: skip
    shown = policy.show_pool(ctx, "web")
    assert shown["vms"] == ["a"] and shown["backup_jobs"] == ["nightly"]
    assert policy.list_pools(ctx)[0]["vms"] == ["a"]
    with pytest.raises(Refused) as r:
        policy.delete_pool(ctx, "web")
    message = str(r.value)
    assert "VMs a" in message and "backup jobs nightly" in message
    assert "--no-pool" in message and "backup jobs that select it" in message
    inventory.configure(ctx, "a", {"pool": None})
    with pytest.raises(Refused) as r:
        policy.delete_pool(ctx, "web")
    assert "VMs" not in str(r.value) and "nightly" in str(r.value)
    with ctx.catalog.session() as s:
        s.delete(s.execute(select(BackupJob).where(BackupJob.name == "nightly")).scalar_one())
    assert policy.delete_pool(ctx, "web") == {"name": "web", "deleted": True}
    with pytest.raises(PoolNotFound):
        policy.show_pool(ctx, "web")


def test_list_fast_path_agrees_with_effective_and_reads_pools_once(ctx: Context) -> None:
    policy.create_pool(ctx, "web", {"keep_last": 2})
    policy.create_pool(ctx, "db", {"mode": "full", "exclude": "yes"})
    configs = [{}, {"keep_last": 7}, {"mode": "full"}, {"memory": "no"}]
    pools = [None, "web", "db"]
    names = []
    for i in range(24):
        name = f"vm{i}"
        add_vm(ctx, name, configs[i % len(configs)])
        pool = pools[i % len(pools)]
        if pool:
            inventory.configure(ctx, name, {"pool": pool})
        names.append(name)
    statements: list[str] = []

    def seen(_c: Any, _cur: Any, sql: str, *_rest: Any) -> None:
        statements.append(sql)

    event.listen(ctx.catalog.engine, "before_cursor_execute", seen)
    listed = {d["name"]: d["backup_config"] for d in inventory.list_vms(ctx)}
    event.remove(ctx.catalog.engine, "before_cursor_execute", seen)
    assert sum("FROM pools" in sql for sql in statements) == 1
    for name in names:
        cfg, sources = policy.effective(ctx, vm_row(ctx, name))
        assert listed[name] == cfg.as_dict(), name
        assert inventory.show_vm(ctx, name)["backup_config_sources"] == sources
    assert listed["vm4"]["keep_last"] == 2 and listed["vm5"]["exclude"] is True
    assert listed["vm1"]["keep_last"] == 7  # the VM's own key over its pool's


def test_backup_takes_overrides_over_the_effective_policy(ctx: Context, tmp_path: Path) -> None:
    hv = ctx.hv
    assert isinstance(hv, FakeHypervisor)
    hv.define(SAMPLE_XML.format(disk=tmp_path / "web.qcow2"))
    inventory.import_vm(ctx, "web")
    policy.create_pool(ctx, "p", {"keep_last": 3, "mode": "full"})
    inventory.configure(ctx, "web", {"pool": "p"})
    vm = vm_row(ctx, "web")
    job = prepare_job(ctx, vm, 1, None, False, Warnings())  # type: ignore[arg-type]
    assert job.cfg.keep_last == 3 and str(job.cfg.mode) == "FULL"  # retention uses job.cfg
    job = prepare_job(ctx, vm, 1, None, False, Warnings(), {"keep_last": 1})  # type: ignore[arg-type]
    assert job.cfg.keep_last == 1 and str(job.cfg.mode) == "FULL"
    # bad overrides are refused before anything is looked up or locked
    with pytest.raises(InvalidValue) as e:
        run_backup(ctx, "no-such-vm", "no-such-store", overrides={"mode": "diff"})
    assert "set by backupjob" in str(e.value)


# --- the CLI --------------------------------------------------------------------------------------
@pytest.fixture
def run_cli(ctx: Context, cli_on: Any) -> Any:
    """``vmkeep ARGS`` in-process on the fake-hypervisor context; (exit code, output)."""
    return cli_on(ctx, vm_cmd, pool_cmd)


def test_pool_and_vm_config_commands(ctx: Context, run_cli: Any) -> None:
    add_vm(ctx, "a")
    code, out = run_cli("pool", "create", "web", "--keep-last", "3", "--exclude", "yes", "--json")
    assert code == 0, out
    assert json.loads(out)["backup_config"] == {"keep_last": 3, "exclude": True}
    code, out = run_cli("pool", "set", "web", "--mode", "full", "--exclude", "unset", "--json")
    assert code == 0, out
    assert json.loads(out)["backup_config"] == {"keep_last": 3, "mode": "FULL"}
    code, out = run_cli("pool", "set", "web")
    assert code == 2 and "--keep-last" in out and "--exclude" in out

    code, out = run_cli("vm", "config", "a", "--pool", "nope")
    assert code == 6 and "Pool 'nope' does not exist" in out
    code, out = run_cli("vm", "config", "a", "--pool", "web", "--no-pool")
    assert code == 2 and "not both" in out
    code, out = run_cli("vm", "config", "a", "--pool", "web", "--memory", "yes", "--json")
    assert code == 0, out
    shown = json.loads(out)
    assert shown["pool"] == "web" and shown["backup_config"]["keep_last"] == 3
    assert shown["backup_config_sources"]["keep_last"] == "pool web"
    assert shown["backup_config_sources"]["memory"] == "vm"

    code, out = run_cli("vm", "show", "a", "--json")
    assert code == 0, out
    assert json.loads(out)["backup_config_sources"]["mode"] == "pool web"
    code, out = run_cli("vm", "show", "a")
    assert code == 0, out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert lines["keep_last"].split() == ["keep_last", "3", "(pool", "web)"]
    assert lines["fs_freeze"].split() == ["fs_freeze", "AGENT", "(config)"]
    assert lines["memory"].split() == ["memory", "yes", "(vm)"]

    code, out = run_cli("pool", "list", "--json")
    assert code == 0 and [(p["name"], p["vms"]) for p in json.loads(out)] == [("web", ["a"])]
    code, out = run_cli("pool", "list")
    assert code == 0 and out.splitlines()[1].split()[:3] == ["1", "web", "1"]
    code, out = run_cli("pool", "show", "web")
    assert code == 0 and "vms:         a" in out
    code, out = run_cli("pool", "delete", "web")
    assert code == 25 and "vmkeep vm config VM --no-pool" in out
    code, out = run_cli("vm", "config", "a", "--no-pool")
    assert code == 0 and "pool (none)" in out
    code, out = run_cli("pool", "delete", "web")
    assert code == 0 and "pool web deleted" in out


def test_the_policy_options_are_declared_once() -> None:
    """``vm config`` and ``pool create|set`` take the same policy options (one declaration)."""
    from vmkeep.cli.policy_options import OPTIONS

    wanted = {option for option, _, _ in OPTIONS}
    assert {param for _, param, _ in OPTIONS} == set(KEYS)
    for command in (vm_cmd.config_cmd, pool_cmd.create_cmd, pool_cmd.set_cmd):
        declared = {o for p in command.params for o in getattr(p, "opts", [])}
        assert wanted <= declared, command.name


# --- the API --------------------------------------------------------------------------------------
def test_pool_routes(ctx: Context) -> None:
    client = TestClient(create_app(ctx.config))
    admin = {"Authorization": f"Bearer {tokens.create(ctx, 'a', 'admin')['token']}"}
    operator = {"Authorization": f"Bearer {tokens.create(ctx, 'o', 'operator')['token']}"}
    add_vm(ctx, "a")
    body = {"name": "web", "config": {"keep_last": 2, "mode": "increment"}}
    assert client.post("/v1/pools", json=body, headers=operator).status_code == 403
    r = client.post("/v1/pools", json=body, headers=admin)
    assert r.status_code == 201, r.text
    assert r.json()["backup_config"] == {"keep_last": 2, "mode": "INCREMENT"}
    r = client.post("/v1/pools", json={"name": "x", "config": {"colour": 1}}, headers=admin)
    assert r.status_code == 422
    r = client.patch("/v1/pools/web", json={"config": {"mode": "diff"}}, headers=admin)
    assert r.status_code == 422 and "full or increment" in r.json()["error"]["message"], r.text
    r = client.patch("/v1/pools/web", json={"config": {"keep_last": "unset"}}, headers=admin)
    assert r.status_code == 200 and r.json()["backup_config"] == {"mode": "INCREMENT"}
    r = client.patch("/v1/vms/a/config", json={"pool": "web", "exclude": True}, headers=admin)
    assert r.status_code == 200, r.text
    assert r.json()["backup_config_sources"]["mode"] == "pool web"
    assert r.json()["backup_config"]["exclude"] is True
    r = client.patch("/v1/vms/a/config", json={"pool": "nope"}, headers=admin)
    assert r.status_code == 404 and "pool create" in r.json()["error"]["message"]
    assert client.get("/v1/pools", headers=operator).json()[0]["vms"] == ["a"]
    assert client.get("/v1/pools/web", headers=operator).json()["vms"] == ["a"]
    assert client.get("/v1/pools/nope", headers=operator).status_code == 404
    r = client.delete("/v1/pools/web", headers=admin)
    assert r.status_code == 409 and "VMs a" in r.json()["error"]["message"]
    r = client.patch("/v1/vms/a/config", json={"pool": None}, headers=admin)
    assert r.status_code == 200 and r.json()["pool"] is None
    assert client.delete("/v1/pools/web", headers=admin).json() == {"name": "web", "deleted": True}
