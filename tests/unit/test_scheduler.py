"""Backup jobs on a simulated clock, over a real SQLite catalog: 20 catalog-only VMs (the fake
hypervisor's domains) fired at 02:00, run by worker threads through the real claim within the
limits (a runner that holds each job a moment stands in for the backup); counts come from the
job rows."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from vmkeep.catalog.tables import BackupJobRun, Datastore, Job, Vm
from vmkeep.config import load_config
from vmkeep.engine.core import jobs, schedules, stores
from vmkeep.engine.core.context import Context
from vmkeep.engine.service import backupjobs, scheduler
from vmkeep.engine.vm import inventory
from vmkeep.errors import InvalidValue
from vmkeep.hypervisor.fake import SAMPLE_XML, FakeHypervisor

NIGHT = datetime(2026, 12, 4, 18, 0, tzinfo=UTC)  # the jobs are made the evening before


def _ctx(tmp_path: Path, **limits: int) -> Context:
    env = {"VMKEEP_DATA_DIR": str(tmp_path / "data"), "VMKEEP_SCHEDULE_TIMEZONE": "UTC"}
    env |= {f"VMKEEP_LIMITS_{k.upper()}": str(v) for k, v in limits.items()}
    ctx = Context(load_config(environ=env), _hv=FakeHypervisor())
    stores.add(ctx, "ds", "dir", {"path": str(tmp_path / "ds")})
    return ctx


def _vms(ctx: Context, tmp_path: Path, n: int) -> list[str]:
    names = [f"vm{i:02d}" for i in range(n)]
    for name in names:
        disk = tmp_path / f"{name}.qcow2"
        disk.touch()
        ctx.hv.define(
            SAMPLE_XML.format(disk=disk).replace("<name>web</name>", f"<name>{name}</name>")
        )
        inventory.import_vm(ctx, name)
    return names


class Workers:
    """``n`` worker threads claiming and running jobs as the daemon's do (``jobs.claim`` +
    ``jobs.execute``), each job held ``hold`` s; stops when told."""

    def __init__(self, ctx: Context, n: int, hold: float = 0.05) -> None:
        self.stop = threading.Event()

        def backup(
            _c: Context, params: dict[str, Any], _p: Any
        ) -> tuple[dict[str, Any], list[str]]:
            time.sleep(hold)
            return {"vm": params["vm"]}, []

        runners = {"backup": backup, "group-backup": backup}

        def work() -> None:
            mine = Context(ctx.config, _hv=ctx.hv)
            while not self.stop.is_set():
                job_id = jobs.claim(mine)
                if job_id is None:
                    time.sleep(0.01)
                    continue
                jobs.execute(mine, job_id, runners)

        self.threads = [threading.Thread(target=work) for _ in range(n)]
        for t in self.threads:
            t.start()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def _rows(ctx: Context) -> list[Job]:
    with ctx.catalog.session() as s:
        return list(s.execute(select(Job).order_by(Job.id)).scalars())


def _drain(ctx: Context, timeout: float = 60) -> list[Job]:
    deadline = time.monotonic() + timeout
    while True:
        rows = _rows(ctx)
        if all(j.state not in ("QUEUED", "RUNNING") for j in rows):
            return rows
        assert time.monotonic() < deadline, "jobs did not end"
        time.sleep(0.05)


def _most_at_once(rows: list[Job]) -> int:
    """The most jobs RUNNING at one instant, from their rows' start and end times."""
    edges = sorted([(j.started_at, 1) for j in rows] + [(j.finished_at, -1) for j in rows],
                   key=lambda e: (e[0], e[1]))  # fmt: skip
    now = most = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def test_a_cron_job_backs_up_20_vms_over_a_night_never_more_than_max_backups(
    tmp_path: Path,
) -> None:
    ctx = _ctx(tmp_path, max_backups=2)
    names = _vms(ctx, tmp_path, 20)
    backupjobs.create(ctx, "nightly", {"all": True}, "ds", "0 2 * * *", execution="parallel",
                      now=NIGHT)  # fmt: skip
    workers = Workers(ctx, 5)
    try:
        fired = []
        t = NIGHT
        while t < NIGHT + timedelta(hours=24):  # a look every 10 simulated minutes
            fired += scheduler.tick(ctx, t, grace=600)
            t += timedelta(minutes=10)
        rows = _drain(ctx)
    finally:
        workers.close()
    assert len(fired) == 1 and fired[0]["slot"] == datetime(2026, 12, 5, 2, 0, tzinfo=UTC)
    assert sorted(j.target for j in rows) == names
    assert all(j.state == "DONE" and j.run_id == fired[0]["id"] for j in rows)
    assert _most_at_once(rows) == 2  # 5 workers, limit 2: it was reached and never passed


def test_priority_first_then_the_oldest_and_the_reason_shown(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, max_backups=1)
    _vms(ctx, tmp_path, 6)
    backupjobs.create(ctx, "low", {"vms": ["vm00", "vm01", "vm02"]}, "ds", "0 2 * * *",
                      priority=10, execution="parallel", now=NIGHT)  # fmt: skip
    backupjobs.create(ctx, "high", {"vms": ["vm03", "vm04", "vm05"]}, "ds", "0 2 * * *",
                      priority=90, execution="parallel", now=NIGHT)  # fmt: skip
    fired = scheduler.tick(ctx, datetime(2026, 12, 5, 2, 0, 30, tzinfo=UTC))
    assert len(fired) == 2
    first = jobs.claim(ctx)
    assert first is not None
    assert jobs.claim(ctx) is None  # max_backups=1 is reached
    waiting = [j for j in _rows(ctx) if j.state == "QUEUED"]
    assert all(j.wait_reason == "max_backups: 1 of 1 backups running" for j in waiting)
    shown = jobs.list_jobs(ctx, "QUEUED")
    assert {j["waiting"] for j in shown} == {"max_backups: 1 of 1 backups running"}
    jobs._finish(ctx, first, jobs.JobState.DONE, {})
    order = [first]
    while (nxt := jobs.claim(ctx)) is not None:
        order.append(nxt)
        jobs._finish(ctx, nxt, jobs.JobState.DONE, {})
    targets = {j.id: j.target for j in _rows(ctx)}
    assert [targets[i] for i in order] == ["vm03", "vm04", "vm05", "vm00", "vm01", "vm02"]


def test_a_sequential_run_runs_one_vm_at_a_time(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    _vms(ctx, tmp_path, 4)
    backupjobs.create(ctx, "seq", {"all": True}, "ds", "now", now=NIGHT)
    workers = Workers(ctx, 4)
    try:
        assert len(scheduler.tick(ctx, NIGHT + timedelta(seconds=1))) == 1
        rows = _drain(ctx)
    finally:
        workers.close()
    assert len(rows) == 4 and _most_at_once(rows) == 1


def test_a_missed_slot_runs_once_or_is_skipped(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    _vms(ctx, tmp_path, 2)
    backupjobs.create(ctx, "again", {"all": True}, "ds", "0 2 * * *", now=NIGHT)
    backupjobs.create(ctx, "not-again", {"all": True}, "ds", "0 2 * * *", repeat_missed=False,
                      now=NIGHT)  # fmt: skip
    back = NIGHT + timedelta(days=3, hours=5)  # the daemon was down for three nights
    fired = {r["id"]: r for r in scheduler.tick(ctx, back)}
    assert len(fired) == 2
    by_job = {backupjobs.show(ctx, n)["name"]: backupjobs.show(ctx, n)["last_run"]
              for n in ("again", "not-again")}  # fmt: skip
    assert by_job["again"]["origin"] == "missed" and by_job["again"]["state"] == "FIRED"
    assert len(by_job["again"]["jobs"]) == 2  # once, not once per missed night
    assert by_job["again"]["slot"] == datetime(2026, 12, 7, 2, 0, tzinfo=UTC)
    assert by_job["not-again"]["state"] == "SKIPPED" and by_job["not-again"]["jobs"] == []
    assert scheduler.tick(ctx, back + timedelta(minutes=5)) == []  # nothing fires twice
    nxt = backupjobs.show(ctx, "again", now=back)["next_run"]
    assert nxt == datetime(2026, 12, 8, 2, 0, tzinfo=UTC)


def test_daemons_on_one_catalog_fire_each_slot_once(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    _vms(ctx, tmp_path, 3)
    backupjobs.create(ctx, "nightly", {"all": True}, "ds", "0 2 * * *", now=NIGHT)
    at = datetime(2026, 12, 5, 2, 0, 5, tzinfo=UTC)
    results: list[list[dict[str, Any]]] = []
    start = threading.Barrier(4)

    def daemon() -> None:
        mine = Context(ctx.config, _hv=ctx.hv)
        start.wait()
        results.append(scheduler.tick(mine, at))

    threads = [threading.Thread(target=daemon) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(len(r) for r in results) == 1
    with ctx.catalog.session() as s:
        assert len(list(s.execute(select(BackupJobRun)).scalars())) == 1
    assert len(_rows(ctx)) == 3


def test_exclusion_and_vanished_vms_are_shown_with_their_reason(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    _vms(ctx, tmp_path, 3)
    inventory.configure(ctx, "vm01", {"exclude": "yes"})
    backupjobs.create(ctx, "all", {"all": True}, "ds", "now", now=NIGHT)
    backupjobs.create(ctx, "named", {"vms": ["vm01", "vm02"]}, "ds", "now", now=NIGHT)
    scheduler.tick(ctx, NIGHT + timedelta(seconds=1))
    shown = {r["vm"]: r for r in backupjobs.show(ctx, "all")["vms"]}
    assert shown["vm01"]["state"] == "SKIPPED"
    assert "excluded by its policy (vm; vm config vm01 --exclude no)" in shown["vm01"]["reason"]
    assert (
        shown["vm00"]["state"] == "QUEUED"
        and shown["vm00"]["reason"] == "waiting for a free worker"
    )
    named = backupjobs.show(ctx, "named")["last_run"]
    assert sorted(j["target"] for j in named["jobs"]) == ["vm01", "vm02"]  # named: no exclusion
    with ctx.catalog.session() as s:
        s.delete(s.execute(select(Vm).where(Vm.name == "vm02")).scalar_one())
    run = scheduler.run_now(ctx, "named", "tester")
    assert [j["target"] for j in run["jobs"]] == ["vm01"]
    assert run["skipped"][0]["vm"] == "vm02" and "not in the catalog" in run["skipped"][0]["reason"]


def test_a_restic_datastore_takes_one_writer(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    _vms(ctx, tmp_path, 2)
    with ctx.catalog.session() as s:
        s.add(Datastore(name="repo", driver="restic", options={"repository": "/nowhere"}))
    backupjobs.create(ctx, "offsite", {"all": True}, "repo", "now", execution="parallel",
                      now=NIGHT)  # fmt: skip
    scheduler.tick(ctx, NIGHT + timedelta(seconds=1))
    assert jobs.claim(ctx) is not None
    assert jobs.claim(ctx) is None
    (waiting,) = [j for j in _rows(ctx) if j.state == "QUEUED"]
    assert waiting.wait_reason == "datastore repo takes one writer at a time: 1 of 1 writing"


@pytest.mark.parametrize(
    ("spec", "now", "due", "nxt"),
    [
        ("0 2 * * *", "2026-12-05T02:00:00", "2026-12-05T02:00:00", "2026-12-06T02:00:00"),
        ("0 2 * * *", "2026-12-05T01:59:59", "2026-12-04T02:00:00", "2026-12-05T02:00:00"),
        ("mon..fri 02:00", "2026-12-05T12:00:00", "2026-12-04T02:00:00", "2026-12-07T02:00:00"),
        ("sat,sun 3:30", "2026-12-05T12:00:00", "2026-12-05T03:30:00", "2026-12-06T03:30:00"),
        ("daily", "2026-12-05T12:00:00", "2026-12-05T00:00:00", "2026-12-06T00:00:00"),
        ("*/15", "2026-12-05T12:07:00", "2026-12-05T12:00:00", "2026-12-05T12:15:00"),
        ("+3600", "2026-12-05T12:00:00", None, "2026-12-05T13:00:00"),
        ("2026-12-24T22:00", "2026-12-05T12:00:00", None, "2026-12-24T22:00:00"),
    ],
)
def test_schedule_forms(spec: str, now: str, due: str | None, nxt: str) -> None:
    t = datetime.fromisoformat(now).replace(tzinfo=UTC)
    parsed = schedules.parse(spec, t, UTC)
    got = schedules.latest_due(parsed, t, UTC)
    assert (got.isoformat()[:19] if got else None) == due
    assert schedules.next_after(parsed, t, UTC) == datetime.fromisoformat(nxt).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    "bad",
    ["", "often", "25:00", "mon..fry 02:00", "+soon", "0 2 * *", "0 0 30 2 *", "2020-01-01T00:00"],
)
def test_a_bad_schedule_names_the_forms(bad: str) -> None:
    with pytest.raises(InvalidValue, match="--schedule"):
        schedules.parse(bad, NIGHT, UTC)


def test_a_jobs_bwlimit_reaches_a_remote_datastores_driver(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    _vms(ctx, tmp_path, 1)
    backupjobs.create(ctx, "slow", {"all": True}, "ds", "now", options={"bwlimit": "512",
                      "keep_last": "3"}, now=NIGHT)  # fmt: skip
    (run,) = scheduler.tick(ctx, NIGHT + timedelta(seconds=1))
    params = jobs.get(ctx, run["jobs"][0]["id"])["params"]
    assert (params["bwlimit"], params["policy"]) == (512, {"keep_last": 3})
    far = Datastore(name="far", driver="rsync", options={"host": "nas", "user": "b", "path": "/s"})
    assert stores.driver_of(far, 512).options.bwlimit == 512  # type: ignore[attr-defined]
    assert stores.driver_of(far).options.bwlimit is None  # type: ignore[attr-defined]
    local = Datastore(name="d", driver="dir", options={"path": str(tmp_path)})
    assert not hasattr(stores.driver_of(local, 512).options, "bwlimit")  # local: no limit
    with pytest.raises(InvalidValue, match="--bwlimit"):
        backupjobs.edit(ctx, "slow", {"options": {"bwlimit": "fast"}})


def test_backup_job_routes_by_role(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from vmkeep.api import app
    from vmkeep.engine.service import tokens

    ctx = _ctx(tmp_path)
    _vms(ctx, tmp_path, 2)
    monkeypatch.setattr(app, "Context", lambda config: Context(config, _hv=ctx.hv))
    client = TestClient(app.create_app(ctx.config))
    admin = {"Authorization": f"Bearer {tokens.create(ctx, 'a', 'admin')['token']}"}
    operator = {"Authorization": f"Bearer {tokens.create(ctx, 'o', 'operator')['token']}"}
    viewer = {"Authorization": f"Bearer {tokens.create(ctx, 'v', 'viewer')['token']}"}
    body = {"name": "nightly", "all": True, "datastore": "ds", "schedule": "0 2 * * *",
            "options": {"mode": "increment", "keep_last": "all"}, "priority": 70}  # fmt: skip
    assert client.post("/v1/backupjobs", json=body, headers=operator).status_code == 403
    made = client.post("/v1/backupjobs", json=body, headers=admin)
    assert made.status_code == 201, made.text
    assert (made.json()["owner"], made.json()["role"], made.json()["priority"]) == (
        "a",
        "admin",
        70,
    )
    bad = client.post(
        "/v1/backupjobs", json=body | {"name": "x", "schedule": "often"}, headers=admin
    )
    assert bad.status_code == 422 and "--schedule" in bad.json()["error"]["message"]
    listed = client.get("/v1/backupjobs", headers=viewer).json()
    assert [j["name"] for j in listed] == ["nightly"] and listed[0]["next_run"] is not None
    changed = client.patch("/v1/backupjobs/nightly", json={"enabled": False}, headers=admin)
    assert changed.json()["enabled"] is False and changed.json()["next_run"] is None
    # keep_last 'all' (null) is a value too: the run's jobs carry it
    run = client.post("/v1/backupjobs/nightly/run", headers=operator)
    assert run.status_code == 201 and run.json()["who"] == "o" and run.json()["skipped"] == []
    assert sorted(j["target"] for j in run.json()["jobs"]) == ["vm00", "vm01"]
    queued = jobs.get(ctx, run.json()["jobs"][0]["id"])
    assert (queued["priority"], queued["who"], queued["params"]["policy"]) == (
        70, "backupjob:nightly", {"mode": "INCREMENT", "keep_last": None})  # fmt: skip
    shown = client.get("/v1/backupjobs/nightly", headers=viewer).json()
    assert {v["vm"]: v["state"] for v in shown["vms"]} == {"vm00": "QUEUED", "vm01": "QUEUED"}
    # policy keys in a backup's body are a backup job's: not an operator's
    sneaky = {"datastore": "ds", "policy": {"keep_last": 1}}
    refused = client.post("/v1/vms/vm00/backup", json=sneaky, headers=operator)
    assert refused.status_code == 403, refused.text
    assert client.post("/v1/vms/vm00/backup", json=sneaky, headers=admin).status_code == 202
    # the datastore a job writes to cannot go from under it
    gone = client.delete("/v1/datastores/ds", headers=admin)
    assert gone.status_code == 409 and "backup jobs nightly" in gone.json()["error"]["message"]
    assert client.delete("/v1/backupjobs/nightly", headers=admin).status_code == 200
    assert jobs.get(ctx, queued["id"])["state"] == "CANCELLED"  # its queued jobs went with it
    assert client.get("/v1/backupjobs/nightly", headers=viewer).status_code == 404


def test_the_backupjob_commands(tmp_path: Path, cli_on: Any) -> None:
    import json

    from vmkeep.cli import backupjob_cmd

    ctx = _ctx(tmp_path)
    _vms(ctx, tmp_path, 2)
    run = cli_on(ctx, backupjob_cmd)

    code, out = run("backupjob", "create", "nightly", "--vm", "vm00", "--vm", "vm01", "--datastore",
                    "ds", "--schedule", "mon..fri 02:00", "--keep-last", "7", "--bwlimit", "900",
                    "--priority", "80", "--json")  # fmt: skip
    assert code == 0, out
    made = json.loads(out)
    assert (made["schedule"], made["options"], made["priority"]) == (
        "0 2 * * 1-5", {"keep_last": 7, "bwlimit": 900}, 80)  # fmt: skip
    code, out = run("backupjob", "create", "x", "--all", "--datastore", "ds", "--schedule", "often")
    assert code == InvalidValue.exit_code and "cron expression" in out, out
    code, out = run(
        "backupjob", "create", "y", "--vm", "nope", "--datastore", "ds", "--schedule", "now"
    )
    assert code == 6 and "nope" in out
    code, out = run("backupjob", "create", "z", "--all", "--pool", "p", "--datastore", "ds",
                    "--schedule", "now")  # fmt: skip
    assert code == InvalidValue.exit_code and "exactly one" in out, out
    code, out = run("backupjob", "edit", "nightly", "--keep-last", "unset", "--execution",
                    "parallel", "--json")  # fmt: skip
    assert code == 0 and json.loads(out)["options"] == {"bwlimit": 900}, out
    assert json.loads(run("backupjob", "disable", "nightly", "--json")[1])["next_run"] is None
    code, out = run("backupjob", "list")
    assert code == 0 and "nightly" in out and "vms vm00,vm01" in out, out
    code, out = run("backupjob", "show", "nightly")
    assert code == 0 and "NEVER" in out, out  # no run yet, per VM
    # no daemon: the run's jobs run here; the fake guests' empty images cannot be backed up
    code, out = run("backupjob", "run", "nightly")
    assert code not in (0, 1) and "2 of 2 jobs of run" in out, out
    shown = json.loads(run("backupjob", "show", "nightly", "--json")[1])
    assert {v["state"] for v in shown["vms"]} == {"FAILED"} and shown["last_run"][
        "origin"
    ] == "manual"
    code, out = run("backupjob", "delete", "nightly")
    assert code == 0 and "deleted backup job nightly" in out
    assert run("backupjob", "show", "nightly")[0] == 6


def test_a_new_schedule_or_a_reenabled_job_does_not_fire_old_slots(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    _vms(ctx, tmp_path, 1)
    backupjobs.create(ctx, "j", {"all": True}, "ds", "0 2 * * *", now=NIGHT)
    (first,) = scheduler.tick(ctx, datetime(2026, 12, 5, 2, 0, 10, tzinfo=UTC))
    # at 10:00 the schedule becomes 03:00: today's 03:00 slot came before the change
    ten = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)
    backupjobs.edit(ctx, "j", {"schedule": "0 3 * * *"}, now=ten)
    assert scheduler.tick(ctx, ten + timedelta(minutes=1)) == []
    assert backupjobs.show(ctx, "j", now=ten)["next_run"] == datetime(2026, 12, 6, 3, 0, tzinfo=UTC)
    # disabled for two nights, enabled again: those nights do not run now
    backupjobs.edit(ctx, "j", {"enabled": False}, now=ten)
    back = ten + timedelta(days=2)
    backupjobs.edit(ctx, "j", {"enabled": True}, now=back)
    assert scheduler.tick(ctx, back + timedelta(minutes=1)) == []
    (nxt,) = scheduler.tick(ctx, datetime(2026, 12, 8, 3, 0, 5, tzinfo=UTC))
    assert nxt["origin"] == "schedule" and nxt["id"] != first["id"]


def test_a_long_queue_waiting_for_one_datastore_hides_no_job_that_may_start(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    with ctx.catalog.session() as s:
        s.add(Datastore(name="repo", driver="restic", options={"repository": "/nowhere"}))
    for i in range(300):
        jobs.enqueue(ctx, "backup", f"v{i}", {"vm": f"v{i}", "datastore": "repo"}, "api", "t")
    last = jobs.enqueue(ctx, "backup", "x", {"vm": "x", "datastore": "ds"}, "api", "t")["id"]
    first = jobs.claim(ctx)
    assert jobs.claim(ctx) == last  # behind 299 waiting jobs, and still found
    assert jobs.claim(ctx) is None
    waiting = [j for j in _rows(ctx) if j.state == "QUEUED"]
    assert len(waiting) == 299 and first is not None
    assert {j.wait_reason for j in waiting} == {
        "datastore repo takes one writer at a time: 1 of 1 writing"
    }


def test_a_night_whose_clocks_go_back_fires_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Europe/Berlin, 25 October 2026: 02:30 comes twice on the wall clock, once as a slot."""
    monkeypatch.setenv("VMKEEP_SCHEDULE_TIMEZONE", "Europe/Berlin")
    ctx = Context(load_config(environ={"VMKEEP_DATA_DIR": str(tmp_path / "data"),
                                       "VMKEEP_SCHEDULE_TIMEZONE": "Europe/Berlin"}),
                  _hv=FakeHypervisor())  # fmt: skip
    stores.add(ctx, "ds", "dir", {"path": str(tmp_path / "ds")})
    _vms(ctx, tmp_path, 1)
    made = backupjobs.create(ctx, "j", {"all": True}, "ds", "30 2 * * *",
                             now=datetime(2026, 10, 24, 12, 0, tzinfo=UTC))  # fmt: skip
    assert made["timezone"] == "Europe/Berlin"
    fired = []
    t = datetime(2026, 10, 24, 22, 0, tzinfo=UTC)
    while t < datetime(2026, 10, 25, 5, 0, tzinfo=UTC):
        fired += scheduler.tick(ctx, t, grace=900)
        t += timedelta(minutes=10)
    assert [r["slot"] for r in fired] == [datetime(2026, 10, 25, 0, 30, tzinfo=UTC)]  # 02:30 CEST
    shown = backupjobs.show(ctx, "j", now=datetime(2026, 10, 25, 2, 0, tzinfo=UTC))
    assert shown["next_run"] == datetime(2026, 10, 26, 1, 30, tzinfo=UTC)  # not the repeat


def test_a_bad_time_zone_is_refused_when_the_config_loads(tmp_path: Path) -> None:
    from vmkeep.errors import ConfigError

    with pytest.raises(ConfigError, match="VMKEEP_SCHEDULE_TIMEZONE"):
        load_config(
            environ={"VMKEEP_DATA_DIR": str(tmp_path), "VMKEEP_SCHEDULE_TIMEZONE": "Mars/Olympus"}
        )


def test_a_vm_a_run_could_not_queue_is_reported_and_an_excluded_one_is_not(tmp_path: Path) -> None:
    from vmkeep.catalog.tables import Notification

    env = {"VMKEEP_DATA_DIR": str(tmp_path / "data"), "VMKEEP_NOTIFY_ON": "failure",
           "VMKEEP_NOTIFY_WEBHOOK_URL": "http://127.0.0.1:9/hook"}  # fmt: skip
    ctx = Context(load_config(environ=env), _hv=FakeHypervisor())
    stores.add(ctx, "ds", "dir", {"path": str(tmp_path / "ds")})
    _vms(ctx, tmp_path, 3)
    inventory.configure(ctx, "vm02", {"exclude": "yes"})
    ctx.hv.undefine("vm01")  # gone from the host: its backup is refused when queued
    backupjobs.create(ctx, "nightly", {"all": True}, "ds", "now", now=NIGHT)
    (run,) = scheduler.tick(ctx, NIGHT + timedelta(seconds=1))
    assert [j["target"] for j in run["jobs"]] == ["vm00"]
    assert {x["vm"] for x in run["skipped"]} == {"vm01", "vm02"}
    with ctx.catalog.session() as s:
        (note,) = [n.payload for n in s.execute(select(Notification)).scalars()]
    assert (note["event"], note["status"], note["vm"], note["backupjob"]) == (
        "run.left_out", "failed", "vm01", "nightly")  # fmt: skip
    assert "vm01: " in note["error"]["message"] and "vm02" not in note["error"]["message"]


def test_a_killed_commands_running_row_holds_no_backup_slot(tmp_path: Path) -> None:
    import socket
    import subprocess

    ctx = _ctx(tmp_path, max_backups=1)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid no process has now: the command that ran the backup was killed
    with ctx.catalog.session() as s:
        s.add(Job(kind="backup", target="a", params={"vm": "a", "datastore": "ds"}, origin="cli",
                  who="t", state="RUNNING", host=socket.gethostname(), pid=gone.pid,
                  datastore="ds"))  # fmt: skip
    waiting = jobs.enqueue(ctx, "backup", "b", {"vm": "b", "datastore": "ds"}, "api", "t")["id"]
    assert jobs.claim(ctx) == waiting
    dead = jobs.list_jobs(ctx, "FAILED")
    assert [(j["target"], j["error"]["code"]) for j in dead] == [("a", "ProcessDied")]


def test_the_next_command_ends_a_killed_command_s_job(tmp_path: Path) -> None:
    """Without a daemon, nothing else would: every in-process action first marks this host's
    jobs of dead processes FAILED; a live process's job (this one's, another's) is left alone."""
    import os
    import socket
    import subprocess

    ctx = _ctx(tmp_path)
    gone = subprocess.Popen(["true"])
    gone.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        with ctx.catalog.session() as s:
            for target, pid in (("dead", gone.pid), ("live", alive.pid), ("mine", os.getpid())):
                s.add(Job(kind="drill", target=target, params={}, origin="cli", who="t",
                          state="RUNNING", host=socket.gethostname(), pid=pid))  # fmt: skip
        with jobs.recorded(ctx, "verify", "next", {}) as progress:
            progress.result = {"ok": True}
    finally:
        alive.kill()
        alive.wait()
    (dead,) = jobs.list_jobs(ctx, "FAILED")
    assert (dead["target"], dead["error"]["code"]) == ("dead", "ProcessDied"), dead
    assert f"(pid {gone.pid}) died" in dead["error"]["message"]
    assert sorted(j["target"] for j in jobs.list_jobs(ctx, "RUNNING")) == ["live", "mine"]
    assert [j["target"] for j in jobs.list_jobs(ctx, "DONE")] == ["next"]


def test_a_vm_s_jobs_run_one_after_another_the_next_waits_with_its_reason(
    tmp_path: Path,
) -> None:
    """A backup of a VM queued while another of its jobs runs (last night's, still going) is
    queued, not refused; it waits, saying for which job, while another VM's job starts; it goes
    once that job ended. A way out of a stuck VM (reset-state) never waits."""
    from vmkeep.engine.core.trust import Actor
    from vmkeep.engine.service import actions
    from vmkeep.engine.vm import record
    from vmkeep.errors import WrongState

    ctx = _ctx(tmp_path)
    a, b = _vms(ctx, tmp_path, 2)
    ops = Actor("ops", "operator")
    backup = actions.action("backup")

    def queue(vm: str, kind: str = "backup") -> int:
        act = actions.action(kind)
        data = {"vm": vm, "datastore": "ds"} if kind == "backup" else {"vm": vm}
        return int(actions.enqueue(ctx, act, actions.parse(act, data), ops)["id"])

    first = queue(a)
    assert jobs.claim(ctx, one_per_target=actions.ONE_PER_VM) == first  # RUNNING, this process
    with ctx.catalog.session() as s:  # the VM as its running backup leaves it
        vm_id = record.find_vm(s, a).id
    record.set_fields(ctx, vm_id, lcm_state="BACKUP")
    second, other = queue(a), queue(b)  # the busy VM's backup is queued, not refused
    assert jobs.claim(ctx, one_per_target=actions.ONE_PER_VM) == other
    waiting = jobs.get(ctx, second)
    assert (waiting["state"], waiting["waiting"]) == (
        "QUEUED", f"waits for job {first} of VM {a} to end"), waiting  # fmt: skip
    assert jobs.claim(ctx, one_per_target=actions.ONE_PER_VM) is None  # still waiting
    way_out = queue(a, "reset-state")
    assert jobs.claim(ctx, one_per_target=actions.ONE_PER_VM) == way_out
    jobs._finish(ctx, first, jobs.JobState.DONE)
    assert jobs.claim(ctx, one_per_target=actions.ONE_PER_VM) == second
    # a VM in a state no backup allows, with no job of it running: refused at once
    record.set_fields(ctx, vm_id, lcm_state="BACKUP")
    for job_id in (second, way_out):
        jobs._finish(ctx, job_id, jobs.JobState.DONE)
    with pytest.raises(WrongState):
        actions.enqueue(ctx, backup, actions.parse(backup, {"vm": a, "datastore": "ds"}), ops)


def test_a_slot_due_between_two_looks_is_on_time_however_long_a_look_takes(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    _vms(ctx, tmp_path, 1)
    backupjobs.create(ctx, "late", {"all": True}, "ds", "0 2 * * *", repeat_missed=False,
                      now=NIGHT)  # fmt: skip
    # the previous look was at 01:59; this one comes at 02:05 (a long run was being queued)
    (run,) = scheduler.tick(ctx, datetime(2026, 12, 5, 2, 5, tzinfo=UTC),
                            since=datetime(2026, 12, 5, 1, 59, tzinfo=UTC))  # fmt: skip
    assert (run["origin"], run["state"], len(run["jobs"])) == ("schedule", "FIRED", 1)
    backupjobs.create(ctx, "gap", {"all": True}, "ds", "0 3 * * *", repeat_missed=False,
                      now=NIGHT)  # fmt: skip
    # a slot from before the previous look was missed (that look did not fire it)
    (skipped,) = scheduler.tick(ctx, datetime(2026, 12, 5, 3, 5, tzinfo=UTC),
                                since=datetime(2026, 12, 5, 3, 1, tzinfo=UTC))  # fmt: skip
    assert (skipped["origin"], skipped["state"], skipped["jobs"]) == ("missed", "SKIPPED", [])
    backupjobs.create(ctx, "outage", {"all": True}, "ds", "0 4 * * *", repeat_missed=False,
                      now=NIGHT)  # fmt: skip
    # the looks stopped at 03:59 (the catalog was down) and come back at 07:00: late, missed
    (late,) = scheduler.tick(ctx, datetime(2026, 12, 5, 7, 0, tzinfo=UTC),
                             since=datetime(2026, 12, 5, 3, 59, tzinfo=UTC))  # fmt: skip
    assert (late["origin"], late["state"]) == ("missed", "SKIPPED")


def test_a_bad_backup_default_stops_at_once(tmp_path: Path) -> None:
    from vmkeep.errors import ConfigError

    env = {"VMKEEP_DATA_DIR": str(tmp_path), "VMKEEP_BACKUP_MODE": "incremental-forever"}
    with pytest.raises(ConfigError, match=r"\[backup\] mode.*use full or increment"):
        Context(load_config(environ=env))
