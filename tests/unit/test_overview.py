"""The dashboard's facts (``overview.vm_states`` and ``summary``) on a real SQLite catalog with
rows put in by hand: each state's rule, the policy interval from the backup jobs that cover a VM,
the newest backup job's failure, the newest drill, and a fixed number of queries at any scale."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from vmkeep.catalog.tables import (
    Backup,
    BackupJob,
    Datastore,
    Drill,
    Group,
    GroupMember,
    Increment,
    Job,
    Pool,
    Vm,
)
from vmkeep.config import load_config
from vmkeep.engine.core.context import Context
from vmkeep.engine.service import overview

NOW = datetime.now(UTC)


@pytest.fixture
def ctx(clean_env: Path) -> Context:
    return Context(load_config())


def add_vm(s: Any, name: str, **kw: Any) -> Vm:
    vm = Vm(name=name, uuid=f"uuid-{name}", host_uri="qemu:///system", state="ACTIVE",
            lcm_state="RUNNING", **kw)  # fmt: skip
    s.add(vm)
    s.flush()
    return vm


def add_point(
    s: Any, vm: Vm, ds: Datastore, age: timedelta, size: int = 100, status: str = "VALID",
    chain_status: str = "VALID", seq: int = 0, backup: Backup | None = None,
) -> tuple[Backup, Increment]:  # fmt: skip
    if backup is None:
        backup = Backup(vm_id=vm.id, datastore_id=ds.id, chain=f"{vm.name}/x", mode="FULL",
                        status=chain_status)  # fmt: skip
        s.add(backup)
        s.flush()
    inc = Increment(backup_id=backup.id, seq=seq, status=status, size=size, files=[],
                    started_at=NOW - age)  # fmt: skip
    s.add(inc)
    s.flush()
    return backup, inc


def add_job(s: Any, target: str, state: str, kind: str = "backup", ago: float = 1.0) -> Job:
    at = NOW - timedelta(hours=ago)
    j = Job(kind=kind, target=target, state=state, host="h", pid=1, origin="api",
            created_at=at, finished_at=at if state in ("DONE", "FAILED") else None)  # fmt: skip
    s.add(j)
    s.flush()
    return j


def test_states_follow_the_newest_valid_point_and_the_default_interval(ctx: Context) -> None:
    with ctx.catalog.session() as s:
        ds = Datastore(name="ds", driver="dir", options={"path": "/nonexistent"})
        s.add(ds)
        s.flush()
        fresh, old, none = add_vm(s, "fresh"), add_vm(s, "old"), add_vm(s, "none")
        b, _ = add_point(s, fresh, ds, timedelta(hours=30), size=10)
        add_point(s, fresh, ds, timedelta(hours=2), size=20, seq=1, backup=b)
        add_point(s, fresh, ds, timedelta(hours=1), size=99, seq=2, backup=b, status="FAILED")
        add_point(s, old, ds, timedelta(hours=25), size=30)
        add_point(s, old, ds, timedelta(hours=1), size=40, chain_status="DAMAGED")
        add_point(s, none, ds, timedelta(hours=1), status="RUNNING")
    got = overview.vm_states(ctx)
    assert {n: v["state"] for n, v in got.items()} == {
        "fresh": "protected",
        "old": "stale",
        "none": "unprotected",
    }
    assert got["fresh"]["last_size"] == 20  # the FAILED newer point does not count
    assert datetime.fromisoformat(got["fresh"]["last_point"]) == NOW - timedelta(hours=2)
    assert got["old"]["last_size"] == 30  # the point of a DAMAGED chain does not count
    assert got["none"] == {"state": "unprotected", "last_point": None, "last_size": None,
                           "last_drill": None, "failed": False}  # fmt: skip
    assert set(overview.vm_states(ctx, ["old", "nosuch"])) == {"old"}


def test_interval_comes_from_the_backup_jobs_that_cover_the_vm(ctx: Context) -> None:
    with ctx.catalog.session() as s:
        ds = Datastore(name="ds", driver="dir", options={"path": "/nonexistent"})
        s.add_all([ds, Pool(name="web", backup_config={})])
        s.flush()
        vms = {n: add_vm(s, n) for n in ("hourly", "grouped", "pooled", "excluded", "plain")}
        vms["pooled"].pool = vms["excluded"].pool = "web"
        vms["excluded"].backup_config = {"exclude": True}
        g = Group(name="g")
        s.add(g)
        s.flush()
        s.add(GroupMember(group_id=g.id, vm_id=vms["grouped"].id, position=0))
        for vm in vms.values():
            add_point(s, vm, ds, timedelta(hours=3))  # older than hourly, younger than a day
        every_hour = dict(schedule="0 * * * *", datastore="ds", timezone="UTC")
        s.add_all([
            BackupJob(name="a", selector={"vms": ["hourly"]}, **every_hour),
            BackupJob(name="b", selector={"group": "g"}, **every_hour),
            BackupJob(name="c", selector={"pool": "web"}, **every_hour),
            BackupJob(name="d", selector={"all": True}, **every_hour, enabled=False),
            BackupJob(name="e", selector={"all": True}, **every_hour, task="verify"),
            BackupJob(name="f", selector={"vms": ["plain"]}, schedule="at 2020-01-01T00:00:00+00:00",
                      datastore="ds"),
        ])  # fmt: skip
    got = {n: v["state"] for n, v in overview.vm_states(ctx).items()}
    assert got == {
        "hourly": "stale",
        "grouped": "stale",
        "pooled": "stale",
        "excluded": "protected",  # the pool job leaves it out: 24 h
        "plain": "protected",  # disabled, verify and one-shot jobs set no interval
    }


def test_failed_is_the_newest_backup_job_and_drill_is_the_newest(ctx: Context) -> None:
    with ctx.catalog.session() as s:
        ds = Datastore(name="ds", driver="dir", options={"path": "/nonexistent"})
        s.add(ds)
        s.flush()
        a, _ = add_vm(s, "a"), add_vm(s, "b")
        _, inc = add_point(s, a, ds, timedelta(hours=1))
        s.add_all([Drill(increment_id=inc.id, result="PASS", started_at=NOW, finished_at=NOW),
                   Drill(increment_id=inc.id, result="FAIL", reason="no ping",
                         started_at=NOW, finished_at=NOW + timedelta(seconds=3))])  # fmt: skip
        add_job(s, "a", "DONE")
        add_job(s, "a", "FAILED")
        add_job(s, "a", "DONE", kind="verify")  # not a backup: does not clear it
        add_job(s, "b", "FAILED")
        add_job(s, "b", "DONE")
    got = overview.vm_states(ctx)
    assert (got["a"]["failed"], got["b"]["failed"]) == (True, False)
    drill = got["a"]["last_drill"]
    assert (drill["result"], drill["reason"], drill["duration_s"], drill["increment"]) == (
        "FAIL", "no ping", 3.0, 0)  # fmt: skip
    assert got["b"]["last_drill"] is None


def test_summary_counts_datastores_running_and_recent_failures(
    ctx: Context, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    with ctx.catalog.session() as s:
        ds = Datastore(name="ds", driver="dir", options={"path": str(store)})
        gone = Datastore(name="gone", driver="dir", options={"path": str(tmp_path / "nope")})
        s.add_all([ds, gone])
        s.flush()
        a, b, _ = add_vm(s, "a"), add_vm(s, "b"), add_vm(s, "c")
        add_point(s, a, ds, timedelta(hours=1), size=1000)
        add_point(s, b, ds, timedelta(hours=48), size=500)
        add_point(s, b, ds, timedelta(hours=1), size=7, status="FAILED")
        add_job(s, "c", "FAILED", ago=30)  # too old for the failures list, still its last
        for k in range(25):
            add_job(s, "a", "FAILED", kind="verify", ago=1 + k / 100)
        running = add_job(s, "b", "RUNNING")
    out = overview.summary(ctx)
    assert out["vms"] == {"total": 3, "protected": 1, "stale": 1, "unprotected": 1, "failed": 1}
    by_name = {d["name"]: d for d in out["datastores"]}
    assert by_name["ds"]["used_bytes"] == 1500 and by_name["ds"]["points"] == 2
    assert by_name["ds"]["free_bytes"] > 0 and by_name["ds"]["driver"] == "dir"
    assert by_name["gone"] == {"name": "gone", "driver": "dir", "used_bytes": 0,
                               "free_bytes": None, "points": 0}  # fmt: skip
    assert [j["id"] for j in out["running"]] == [running.id]
    assert len(out["failures"]) == 20
    finished = [j["finished"] for j in out["failures"]]
    assert finished == sorted(finished, reverse=True)
    assert all(j["target"] == "a" for j in out["failures"])
    assert datetime.fromisoformat(out["generated"]) >= NOW


def test_queries_do_not_grow_with_the_vms(ctx: Context) -> None:
    """A fixed number of statements for 5 VMs and for 300 (no query per VM)."""

    def statements(n: int) -> int:
        with ctx.catalog.session() as s:
            ds = s.query(Datastore).filter_by(name="ds").one_or_none()
            if ds is None:
                ds = Datastore(name="ds", driver="dir", options={"path": "/nonexistent"})
                s.add(ds)
                s.flush()
            have = s.query(Vm).count()
            for k in range(have, n):
                vm = add_vm(s, f"vm{k}")
                add_point(s, vm, ds, timedelta(hours=k % 48))
                add_job(s, vm.name, "FAILED" if k % 3 else "DONE")
            s.add(BackupJob(name=f"all{n}", selector={"all": True}, schedule="0 2 * * *",
                            datastore="ds"))  # fmt: skip
        count = 0

        def seen(*_: Any) -> None:
            nonlocal count
            count += 1

        engine = ctx.catalog.engine
        event.listen(engine, "before_cursor_execute", seen)
        try:
            out = overview.summary(ctx)
        finally:
            event.remove(engine, "before_cursor_execute", seen)
        assert out["vms"]["total"] == n
        return count

    assert statements(5) == statements(300)
