"""A daemon's monitoring of its own host, and the sweep of silent and unreachable hosts
(``engine/hosts/monitor.py``) on a SQLite catalog with the fake hypervisor."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from vmkeep.catalog.tables import Datastore, Host, Job, Vm
from vmkeep.config import load_config
from vmkeep.engine.core import jobs
from vmkeep.engine.core.context import Context
from vmkeep.engine.hosts import monitor, records
from vmkeep.engine.lifecycle import dispatch
from vmkeep.errors import HostNotFound
from vmkeep.hypervisor.fake import SAMPLE_XML, FakeHypervisor

URI = "qemu+tcp://10.77.0.{}/system"


def on_host(name: str | None, hv: FakeHypervisor | None = None) -> Context:
    config = load_config()
    config = config.model_copy(update={"cluster": config.cluster.model_copy(update={"host": name})})
    return Context(config, _hv=hv or FakeHypervisor())


def add_vm(ctx: Context, name: str, host: str | None, lcm: str = "RUNNING") -> None:
    state = {"RUNNING": "ACTIVE", "BACKUP": "ACTIVE"}.get(lcm, lcm)
    with ctx.catalog.session() as s:
        n = s.execute(select(Vm.id)).all()
        s.add(Vm(name=name, uuid=f"00000000-0000-4000-8000-{len(n):012d}", host_uri="x",
                 host=host, state=state, lcm_state=lcm, backup_config={}))  # fmt: skip


def vm(ctx: Context, name: str) -> Vm:
    with ctx.catalog.session() as s:
        row = s.execute(select(Vm).where(Vm.name == name)).scalar_one()
        s.expunge(row)
        return row


def host(ctx: Context, name: str) -> Host:
    with ctx.catalog.session() as s:
        row = records.find_host(s, name)
        s.expunge(row)
        return row


def set_host(ctx: Context, name: str, **values: object) -> None:
    with ctx.catalog.session() as s:
        s.execute(update(Host).where(Host.name == name).values(**values))


@pytest.fixture
def two(clean_env: Path) -> tuple[Context, Context, FakeHypervisor]:
    """Hosts h1 and h2 on one catalog; the context of h1's daemon (on a fake libvirt) and of
    h2's."""
    hv = FakeHypervisor()
    h1 = on_host("h1", hv)
    records.add(h1, "h1", URI.format(1))
    records.add(h1, "h2", URI.format(2))
    return h1, on_host("h2"), hv


def test_monitor_reads_the_node_its_vms_and_dir_datastores(two, tmp_path: Path) -> None:
    h1, _h2, hv = two
    add_vm(h1, "web", "h1")
    add_vm(h1, "db", "h1", "POWEROFF")
    add_vm(h1, "other", "h2")
    hv.start(hv.define(SAMPLE_XML.format(disk="/x.qcow2")))  # the domain "web" runs
    hv.define(SAMPLE_XML.format(disk="/y.qcow2").replace("<name>web<", "<name>db<"))
    (tmp_path / "ds").mkdir()
    with h1.catalog.session() as s:
        s.add(Datastore(name="local", driver="dir", options={"path": str(tmp_path / "ds")}))
        s.add(Datastore(name="gone", driver="dir", options={"path": str(tmp_path / "nope")}))
        s.add(Datastore(name="far", driver="restic", options={"repo": "sftp:x:/r"}))
    out = monitor.monitor(h1)
    assert out["state"] == "MONITORED" and out["error"] is None
    m = host(h1, "h1").monitor
    assert (m["cpus"], m["memory_kib"], m["free_memory_kib"]) == (4, 8 << 20, 6 << 20)
    assert (m["vms"], m["running"], m["domains"]) == (2, 1, 2)
    assert set(m["datastores"]) == {"local"} and m["datastores"]["local"] > 0
    assert host(h1, "h1").monitored_at is not None
    assert host(h1, "h2").state == "INIT"  # only its own host


def test_unreachable_is_error_then_monitored_again(two) -> None:
    h1, _h2, hv = two
    hv.reachable = False
    out = monitor.monitor(h1)
    assert out["state"] == "ERROR" and "fake host is down" in out["error"]
    assert host(h1, "h1").monitored_at is None
    hv.reachable = True
    out = monitor.monitor(h1)
    assert (out["state"], out["error"]) == ("MONITORED", None)


def test_disabled_keeps_its_state_offline_is_not_monitored(two) -> None:
    h1, _h2, hv = two
    records.disable(h1, "h1")
    assert monitor.monitor(h1)["state"] == "DISABLED"
    assert host(h1, "h1").monitor["cpus"] == 4  # figures updated all the same
    hv.reachable = False
    out = monitor.monitor(h1)
    assert out["state"] == "DISABLED" and "down" in out["error"]
    records.disable(h1, "h1", offline=True)
    hv.reachable = True
    set_host(h1, "h1", monitor={})
    assert monitor.monitor(h1) == {"host": "h1", "state": "OFFLINE"}
    assert host(h1, "h1").monitor == {}


def test_vms_of_an_unreachable_host_become_unknown_after_unknown_after(two) -> None:
    h1, h2, hv = two
    add_vm(h1, "web", "h1")
    add_vm(h1, "off", "h1", "POWEROFF")
    add_vm(h1, "busy", "h1", "BACKUP")
    add_vm(h1, "parked", "h1", "UNDEPLOYED")
    add_vm(h1, "there", "h2")
    monitor.heartbeat(h1, "127.0.0.1:1")
    monitor.monitor(h1)
    hv.reachable = False
    assert monitor.monitor(h1)["state"] == "ERROR"
    now = datetime.now(UTC)
    assert monitor.sweep(h2, now + timedelta(seconds=30))["unknown"] == []  # within the grace
    swept = monitor.sweep(h2, now + timedelta(seconds=61))  # any daemon's sweep
    assert sorted(swept["unknown"]) == ["off", "web"]
    web = vm(h1, "web")
    assert (web.state, web.lcm_state) == ("UNKNOWN", "UNKNOWN")
    assert "host h1 cannot be reached since" in (web.error or "")
    assert "fake host is down" in (web.error or "")
    assert vm(h1, "busy").lcm_state == "BACKUP"  # vmkeep is busy with it: left alone
    assert vm(h1, "parked").lcm_state == "UNDEPLOYED"  # off the host
    assert vm(h1, "there").lcm_state == "RUNNING"  # another host's
    assert monitor.sweep(h2, now + timedelta(seconds=90))["unknown"] == []  # marked once


def test_vms_of_a_silent_daemon_become_unknown_and_its_poll_brings_them_back(two) -> None:
    h1, h2, hv = two
    add_vm(h1, "web", "h1")
    hv.start(hv.define(SAMPLE_XML.format(disk="/x.qcow2")))
    monitor.heartbeat(h1, "127.0.0.1:1")
    monitor.monitor(h1)
    beat = host(h1, "h1").heartbeat_at
    assert beat is not None
    assert monitor.sweep(h2, beat + timedelta(seconds=89))["unknown"] == []
    assert monitor.sweep(h2, beat + timedelta(seconds=91))["unknown"] == ["web"]
    assert "host h1's daemon is silent since" in (vm(h1, "web").error or "")
    # h2's own poll does not touch h1's VM; h1's daemon back: its poll sets the real state
    dispatch.poll(on_host("h2", FakeHypervisor()))
    assert vm(h1, "web").lcm_state == "UNKNOWN"
    monitor.heartbeat(h1, "127.0.0.1:1")
    dispatch.poll(h1)
    assert (vm(h1, "web").state, vm(h1, "web").lcm_state) == ("ACTIVE", "RUNNING")
    assert vm(h1, "web").error is None  # the sweep's "unknown until it polls again" is gone


def test_jobs_for_a_silent_daemon_wait_with_the_reason_then_fail(two) -> None:
    h1, h2, _hv = two
    waiting = jobs.enqueue(h1, "quiesce", "web", {}, "api", "t", runs_on="h2")["id"]
    anyone = jobs.enqueue(h1, "verify", "1", {}, "api", "t")["id"]
    mine = jobs.enqueue(h1, "quiesce", "db", {}, "api", "t", runs_on="h1")["id"]
    monitor.heartbeat(h1, "127.0.0.1:1")  # h1's daemon alive; h2's never started
    now = datetime.now(UTC)
    swept = monitor.sweep(h1, now)
    assert swept == {"unknown": [], "waiting": [waiting], "failed": []}
    why = jobs.get(h1, waiting)["waiting"]
    assert why == (
        "host h2's daemon has never sent a heartbeat; the job waits for it "
        "(fails after [cluster] queued_timeout, 3600 s)"
    )
    assert jobs.get(h1, anyone)["waiting"] is None and jobs.get(h1, mine)["waiting"] is None
    assert monitor.sweep(h1, now)["waiting"] == []  # the same reason is not written again
    # h1's daemon claims its own and the any-host job, never h2's
    claimed = {jobs.claim(h1), jobs.claim(h1), jobs.claim(h1)}
    assert claimed == {anyone, mine, None}
    swept = monitor.sweep(h1, now + timedelta(seconds=3601))
    assert swept["failed"] == [waiting]
    job = jobs.get(h1, waiting)
    assert job["state"] == "FAILED" and job["error"]["code"] == "HostUnavailable"
    assert job["exit_code"] == 31
    assert "Host 'h2'" in job["error"]["message"]
    assert "vmkeep daemon --host h2" in job["error"]["message"]
    assert "[cluster] queued_timeout (3600 s)" in job["error"]["message"]
    del h2


def test_a_job_older_than_the_silence_waits_from_the_last_heartbeat(two) -> None:
    h1, h2, _hv = two
    job = jobs.enqueue(h1, "quiesce", "web", {}, "api", "t", runs_on="h2")["id"]
    later = datetime.now(UTC) + timedelta(seconds=1000)
    set_host(h1, "h2", heartbeat_at=later)  # h2's daemon was alive 1000 s after the queueing
    swept = monitor.sweep(h1, later + timedelta(seconds=40))
    assert swept["waiting"] == [job] and swept["failed"] == []
    assert "host h2's daemon is silent since" in (jobs.get(h1, job)["waiting"] or "")
    assert monitor.sweep(h1, later + timedelta(seconds=3000))["failed"] == []
    assert monitor.sweep(h1, later + timedelta(seconds=3601))["failed"] == [job]
    del h2


def test_an_alive_daemon_s_jobs_are_left_to_it(two) -> None:
    h1, h2, _hv = two
    job = jobs.enqueue(h1, "quiesce", "web", {}, "api", "t", runs_on="h2")["id"]
    monitor.heartbeat(h2, "127.0.0.1:2")
    assert monitor.sweep(h1) == {"unknown": [], "waiting": [], "failed": []}
    assert jobs.get(h1, job)["waiting"] is None
    info = host(h1, "h2").daemon
    assert info["listen"] == "127.0.0.1:2" and info["pid"] > 0 and info["machine"]


def test_a_process_without_a_host_neither_beats_nor_monitors(clean_env: Path) -> None:
    ctx = on_host(None)
    records.add(ctx, "h1", URI.format(1))
    monitor.heartbeat(ctx, "x")
    assert monitor.monitor(ctx) == {}
    assert host(ctx, "h1").heartbeat_at is None


def test_the_daemon_refuses_a_host_the_catalog_does_not_have(clean_env: Path) -> None:
    from vmkeep.api.daemon import serve

    with pytest.raises(HostNotFound, match="vmkeep host add"):
        serve(load_config(), "127.0.0.1:1", host_name="nope")


def test_an_offline_host_s_vms_are_not_marked(two) -> None:
    h1, h2, _hv = two
    add_vm(h1, "web", "h1")
    set_host(h1, "h1", heartbeat_at=datetime.now(UTC) - timedelta(hours=1), state="OFFLINE")
    assert monitor.sweep(h2)["unknown"] == []
    with h1.catalog.session() as s:
        assert s.execute(select(Job.id)).first() is None


def test_two_daemons_of_one_machine_recover_only_dead_processes_jobs(two) -> None:
    """Both hosts' daemons on one machine (the lab): h1's daemon starting again leaves the job
    h2's live daemon runs, and fails the one whose process is gone."""
    import socket
    import subprocess
    import sys

    h1, _h2, _hv = two
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        ids = {}
        for name, proc in (("alive", alive), ("dead", dead)):
            j = jobs.enqueue(h1, "quiesce", name, {}, "api", "t", runs_on="h2")["id"]
            with h1.catalog.session() as s:
                s.execute(update(Job).where(Job.id == j).values(
                    state="RUNNING", host=socket.gethostname(), pid=proc.pid))  # fmt: skip
            ids[name] = j
        assert jobs.recover(h1) == [ids["dead"]]
        assert jobs.get(h1, ids["alive"])["state"] == "RUNNING"
        failed = jobs.get(h1, ids["dead"])
        assert failed["state"] == "FAILED" and failed["error"]["code"] == "ProcessDied"
        assert (
            f"daemon restarted: the vmkeep process running it (pid {dead.pid}) died"
            in (failed["error"]["message"])
        )
    finally:
        alive.kill()
        alive.wait()
