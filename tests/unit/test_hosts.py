"""Hosts on one catalog (engine/hosts): the rows and their states, placement's choice and its
refusals, which daemon claims a job (``runs_on``), in-process actions on another host's VM, the
per-host limit, and the CLI and API over them. SQLite catalog, no libvirt."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from vmkeep.api.app import create_app
from vmkeep.catalog.tables import Group, GroupMember, Host, Job, Vm
from vmkeep.cli import host_cmd
from vmkeep.config import load_config
from vmkeep.engine.core import jobs
from vmkeep.engine.core.context import Context
from vmkeep.engine.hosts import placement, records
from vmkeep.engine.service import actions, tokens
from vmkeep.engine.vm import inventory
from vmkeep.errors import (
    AlreadyExists,
    HostNotFound,
    HostUnavailable,
    HypervisorError,
    InvalidValue,
    Refused,
)
from vmkeep.hypervisor.fake import SAMPLE_XML, FakeHypervisor
from vmkeep.model import JobState


@pytest.fixture
def ctx(clean_env: Path) -> Context:
    return Context(load_config(), _hv=FakeHypervisor())


def on_host(ctx: Context, host: str | None) -> Context:
    """The same catalog as seen by a process acting for ``host``."""
    config = ctx.config.model_copy(
        update={"cluster": ctx.config.cluster.model_copy(update={"host": host})}
    )
    return Context(config, _hv=FakeHypervisor())


def add_vm(ctx: Context, name: str, host: str | None, uri: str = "qemu:///system") -> None:
    with ctx.catalog.session() as s:
        s.add(Vm(name=name, uuid=f"uuid-{name}", host_uri=uri, host=host, state="ACTIVE",
                 lcm_state="RUNNING"))  # fmt: skip


def monitored(ctx: Context, name: str, running: int, free_mib: int, cpus: int = 2) -> None:
    with ctx.catalog.session() as s:
        h = records.find_host(s, name)
        h.state = records.MONITORED
        h.heartbeat_at = datetime.now(UTC)
        h.monitor = {"cpus": cpus, "running": running, "free_memory_kib": free_mib * 1024}


# --- rows ------------------------------------------------------------------------------------
def test_add_list_show_and_the_admin_states(ctx: Context) -> None:
    h = records.add(ctx, "h1", "qemu+tcp://10.0.0.1/system", max_backups=2)
    assert (h["state"], h["daemon"], h["max_backups"]) == ("INIT", "none", 2)
    records.add(ctx, "h2", "qemu+tcp://10.0.0.2/system")
    assert [r["name"] for r in records.list_hosts(ctx)] == ["h1", "h2"]
    assert records.disable(ctx, "h1")["state"] == "DISABLED"
    assert records.disable(ctx, "h1", offline=True)["state"] == "OFFLINE"
    assert records.enable(ctx, "h1")["state"] == "INIT"
    shown = records.show(ctx, "h2")
    assert (shown["vm_list"], shown["queued_jobs"]) == ([], 0)


def test_bad_hosts_are_refused_with_the_fix(ctx: Context, tmp_path: Path) -> None:
    records.add(ctx, "h1", "qemu:///system")
    with pytest.raises(AlreadyExists, match="host 'h1'"):
        records.add(ctx, "h1", "qemu:///other")
    with pytest.raises(InvalidValue, match="qemu\\+tcp://HOST/system"):
        records.add(ctx, "h2", "not a uri")
    with pytest.raises(InvalidValue, match="host name"):
        records.add(ctx, "../x", "qemu:///system")
    with pytest.raises(InvalidValue, match="folder of scripts"):
        records.add(ctx, "h3", "qemu:///system", vmm="exec")
    with pytest.raises(InvalidValue, match="no such folder"):
        records.add(ctx, "h3", "qemu:///system", vmm="exec", vmm_dir=str(tmp_path / "none"))
    assert records.add(ctx, "h3", "qemu:///system", vmm="exec", vmm_dir=str(tmp_path))["vmm"] == (
        "exec"
    )
    with pytest.raises(HostNotFound, match="vmkeep host add"):
        records.show(ctx, "nope")


def test_the_first_host_adopts_the_vms_of_its_uri(ctx: Context) -> None:
    add_vm(ctx, "web", None, "qemu:///system")
    add_vm(ctx, "far", None, "qemu+tcp://10.0.0.9/system")
    assert records.add(ctx, "h1", "qemu:///system")["vms"] == 1
    with ctx.catalog.session() as s:
        hosts = {v.name: v.host for v in s.query(Vm)}
    assert hosts == {"web": "h1", "far": None}


def test_remove_is_refused_while_vms_live_there_or_jobs_wait(ctx: Context) -> None:
    records.add(ctx, "h1", "qemu:///system")
    add_vm(ctx, "web", "h1")
    with pytest.raises(Refused, match=r"1 VM\(s\) live on it \(web\).*vmkeep vm migrate"):
        records.remove(ctx, "h1")
    with ctx.catalog.session() as s:
        s.query(Vm).delete()
    jobs.enqueue(ctx, "backup", "web", {}, "api", "t", runs_on="h1")
    with pytest.raises(Refused, match="1 job"):
        records.remove(ctx, "h1")
    with ctx.catalog.session() as s:
        s.query(Job).delete()
    assert records.remove(ctx, "h1")["name"] == "h1"
    assert records.list_hosts(ctx) == []


# --- placement -------------------------------------------------------------------------------
def test_placement_ranks_fewest_running_then_most_free_memory(ctx: Context) -> None:
    for name in ("a", "b", "c"):
        records.add(ctx, name, f"qemu+tcp://{name}/system")
    monitored(ctx, "a", running=3, free_mib=8000)
    monitored(ctx, "b", running=1, free_mib=1000)
    monitored(ctx, "c", running=1, free_mib=4000)
    assert placement.place(ctx, 1, 512 * 1024) == "c"
    assert placement.place(ctx, 1, 2000 * 1024) == "c"
    assert placement.place(ctx, 1, 6000 * 1024) == "a"  # only a has that much free
    assert placement.place(ctx, 1, 512 * 1024, pin="a") == "a"


def test_placement_names_each_host_and_why_it_was_passed_over(ctx: Context) -> None:
    for name in ("a", "b", "c", "d", "e"):
        records.add(ctx, name, f"qemu+tcp://{name}/system")
    monitored(ctx, "a", running=0, free_mib=100)
    monitored(ctx, "b", running=0, free_mib=9000, cpus=1)
    monitored(ctx, "c", running=0, free_mib=9000)
    records.disable(ctx, "c")
    monitored(ctx, "d", running=0, free_mib=9000)
    with ctx.catalog.session() as s:  # d's daemon last spoke an hour ago
        records.find_host(s, "d").heartbeat_at = datetime.now(UTC) - timedelta(hours=1)
    with pytest.raises(HostUnavailable) as err:
        placement.place(ctx, 2, 512 * 1024)
    text = str(err.value)
    for part in ("a: 100 MiB free, the VM needs 512 MiB", "b: 1 CPUs, the VM needs 2",
                 "c: it is DISABLED", "d: its daemon is silent", "e: it is INIT"):  # fmt: skip
        assert part in text
    with pytest.raises(HostUnavailable, match="'c' cannot take this now: it is DISABLED"):
        placement.place(ctx, 1, 1024, pin="c")


def test_a_group_on_two_hosts_is_refused_by_name(ctx: Context) -> None:
    add_vm(ctx, "db", "h1")
    add_vm(ctx, "web", "h2")
    with ctx.catalog.session() as s:
        g = Group(name="app")
        s.add(g)
        s.flush()
        for pos, name in enumerate(("db", "web")):
            vm = s.query(Vm).filter_by(name=name).one()
            s.add(GroupMember(group_id=g.id, vm_id=vm.id, position=pos))
    with pytest.raises(Refused, match="h1: db; h2: web"):
        placement.host_of_group(ctx, "app")


# --- which daemon runs a job -------------------------------------------------------------------
def test_a_job_is_claimed_only_by_its_hosts_daemon(ctx: Context) -> None:
    records.add(ctx, "h1", "qemu+tcp://h1/system")
    records.add(ctx, "h2", "qemu+tcp://h2/system")
    add_vm(ctx, "web", "h2")
    a = actions.ACTIONS["reset-state"]
    p = actions.parse(a, {"vm": "web"})
    assert actions.runs_on(ctx, a, p) == "h2"
    for_h2 = jobs.enqueue(ctx, "reset-state", "web", {}, "api", "t", runs_on="h2")["id"]
    anyone = jobs.enqueue(ctx, "verify", "1", {}, "api", "t")["id"]
    h1, h2, nohost = on_host(ctx, "h1"), on_host(ctx, "h2"), on_host(ctx, None)
    assert nohost.host is None
    assert jobs.claim(h1, only=for_h2) is None
    assert jobs.claim(nohost, only=for_h2) is None
    assert jobs.claim(h2, only=for_h2) == for_h2
    assert jobs.claim(h1) == anyone


def test_a_hosts_max_backups_holds_its_queue(ctx: Context) -> None:
    records.add(ctx, "h1", "qemu+tcp://h1/system", max_backups=1)
    h1 = on_host(ctx, "h1")
    first = jobs.enqueue(ctx, "backup", "a", {"datastore": "d"}, "api", "t", runs_on="h1")["id"]
    second = jobs.enqueue(ctx, "backup", "b", {"datastore": "d"}, "api", "t", runs_on="h1")["id"]
    assert jobs.claim(h1) == first
    assert jobs.claim(h1) is None
    with ctx.catalog.session() as s:
        waiting = s.get(Job, second)
        assert waiting is not None
        assert waiting.state == JobState.QUEUED
        assert waiting.wait_reason == "max_backups_host: 1 of 1 backups running on h1"


def test_an_in_process_action_on_another_hosts_vm_is_refused_with_the_fix(ctx: Context) -> None:
    records.add(ctx, "h2", "qemu+tcp://h2/system")
    add_vm(ctx, "web", "h2")
    with (
        pytest.raises(HostUnavailable, match="lives there.*no host.*any daemon's API"),
        inventory.vm_action(ctx, "web", "quiesce"),
    ):
        pass  # pragma: no cover - refused before
    with (
        pytest.raises(HostUnavailable, match="acts for host 'h1'"),
        inventory.vm_action(on_host(ctx, "h1"), "web", "quiesce"),
    ):
        pass  # pragma: no cover


def test_vm_list_shows_the_host_and_leaves_other_hosts_states_alone(ctx: Context) -> None:
    records.add(ctx, "h2", "qemu+tcp://h2/system")
    add_vm(ctx, "web", "h2")  # RUNNING in the catalog; this process's libvirt has no such domain
    add_vm(ctx, "old", None)
    rows = {r["name"]: r for r in inventory.list_vms(ctx)}
    assert (rows["web"]["host"], rows["web"]["lcm_state"]) == ("h2", "RUNNING")
    assert rows["old"]["host"] == "qemu:///system"  # no host: its libvirt URI, as before
    assert rows["old"]["lcm_state"] == "UNKNOWN"  # this process's to refresh: no domain


def test_ctx_uri_is_its_hosts(ctx: Context) -> None:
    records.add(ctx, "h2", "qemu+tcp://10.0.0.2/system")
    assert on_host(ctx, "h2").uri == "qemu+tcp://10.0.0.2/system"
    assert on_host(ctx, None).uri == ctx.config.libvirt.uri
    with pytest.raises(HostNotFound):
        _ = on_host(ctx, "h9").uri


# --- adapters --------------------------------------------------------------------------------
def test_the_cli_adds_lists_and_removes(ctx: Context, cli_on) -> None:  # type: ignore[no-untyped-def]
    run = cli_on(ctx, host_cmd)
    assert run("host", "add", "h1", "--uri", "qemu+tcp://10.0.0.1/system")[0] == 0
    code, out = run("host", "list")
    assert code == 0 and "h1" in out and "INIT" in out and "none" in out
    code, out = run("host", "add", "h1", "--uri", "qemu:///system")
    assert code == 7 and "already exists" in out
    assert run("host", "disable", "h1")[0] == 0
    code, out = run("host", "show", "h1")
    assert code == 0 and "DISABLED" in out
    code, out = run("host", "remove", "h1")
    assert code == 0 and "host h1 removed" in out
    code, out = run("host", "show", "h1")
    assert code == 6 and "vmkeep host add" in out


def test_the_api_reads_for_every_role_and_edits_for_admins(ctx: Context) -> None:
    secrets = {r: tokens.create(ctx, f"t-{r}", r)["token"] for r in ("viewer", "operator", "admin")}

    def auth(role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {secrets[role]}"}

    client = TestClient(create_app(ctx.config))
    body = {"name": "h1", "uri": "qemu+tcp://10.0.0.1/system"}
    assert client.post("/v1/hosts", json=body, headers=auth("operator")).status_code == 403
    r = client.post("/v1/hosts", json=body, headers=auth("admin"))
    assert r.status_code == 201 and r.json()["state"] == "INIT"
    assert client.post("/v1/hosts", json=body, headers=auth("admin")).status_code == 409
    bad = client.post("/v1/hosts", json={"name": "h2", "uri": "x"}, headers=auth("admin"))
    assert bad.status_code == 422
    listed = client.get("/v1/hosts", headers=auth("viewer"))
    assert [h["name"] for h in listed.json()] == ["h1"]
    r = client.post("/v1/hosts/h1/disable", json={"offline": True}, headers=auth("admin"))
    assert r.json()["state"] == "OFFLINE"
    assert client.post("/v1/hosts/h1/enable", headers=auth("admin")).json()["state"] == "INIT"
    add_vm(ctx, "web", "h1")
    r = client.delete("/v1/hosts/h1", headers=auth("admin"))
    assert r.status_code == 409 and "(web)" in r.json()["error"]["message"]
    assert client.get("/v1/hosts/nope", headers=auth("viewer")).status_code == 404
    with ctx.catalog.session() as s:
        assert s.query(Host).count() == 1


def test_the_cli_queues_another_hosts_vm_for_its_daemon_and_follows_it(
    ctx: Context,
    cli_on,  # type: ignore[no-untyped-def]
) -> None:
    """No daemon here, the VM on h2: the command queues the job for h2's daemon (a worker of
    a context acting for h2 stands in for it) and prints its result as if it ran here."""
    import threading

    from vmkeep.cli import vm_cmd
    from vmkeep.engine.service.actions import RUNNERS

    records.add(ctx, "h2", "qemu+tcp://h2/system")
    add_vm(ctx, "web", "h2")
    code, out = cli_on(ctx, vm_cmd)("vm", "reset-state", "web")  # no daemon on h2: refused
    assert code == 31 and "has never sent a heartbeat" in out and "--host h2" in out, out
    records.heartbeat(ctx, "h2", {"pid": 1})
    h2 = on_host(ctx, "h2")
    assert isinstance(h2.hv, FakeHypervisor)
    h2.hv.define(SAMPLE_XML.format(disk="/d/vda.qcow2"))
    h2.hv.start("web")
    ran: list[int] = []

    def h2_daemon() -> None:
        for _ in range(200):
            job_id = jobs.claim(h2)
            if job_id is not None:
                ran.append(job_id)
                jobs.execute(h2, job_id, RUNNERS)
                return
            threading.Event().wait(0.05)

    worker = threading.Thread(target=h2_daemon)
    worker.start()
    code, out = cli_on(ctx, vm_cmd)("vm", "reset-state", "web")
    worker.join()
    assert code == 0, out
    assert "queued for host h2's daemon" in out
    with ctx.catalog.session() as s:
        job = s.get(Job, ran[0])
        assert job is not None
        assert (job.kind, job.runs_on, job.state) == ("reset-state", "h2", JobState.DONE)


class _Unreachable(FakeHypervisor):
    """This process's libvirt, down: every look at a domain fails."""

    def states(self) -> dict[str, Any]:
        raise HypervisorError("cannot reach libvirt")

    def domain(self, name: str) -> Any:
        raise HypervisorError("cannot reach libvirt")


def test_vm_list_and_show_of_other_hosts_vms_never_ask_this_processs_libvirt(
    ctx: Context,
) -> None:
    """Another host's VM is listed and shown from the catalog: this process's libvirt is not
    asked (it may be down, or hold a stale definition of the same name)."""
    records.add(ctx, "h2", "qemu+tcp://h2/system")
    add_vm(ctx, "web", "h2")
    h1 = on_host(ctx, "h1")
    h1._hv = _Unreachable()
    assert [r["name"] for r in inventory.list_vms(h1)] == ["web"]
    assert inventory.show_vm(h1, "web")["lcm_state"] == "RUNNING"
    stale = on_host(ctx, "h1")  # a definition of the same name left on this host
    assert isinstance(stale.hv, FakeHypervisor)
    stale.hv.define(SAMPLE_XML.format(disk="/stale/vda.qcow2"))
    shown = inventory.show_vm(stale, "web")
    assert "/stale/vda.qcow2" not in str(shown), shown


def test_the_cli_queues_a_deploy_for_the_host_it_is_placed_on(
    ctx: Context,
    cli_on,  # type: ignore[no-untyped-def]
) -> None:
    """No daemon here: ``vm deploy web --host h2`` of a VM undeployed from h1 goes to h2's
    daemon (where the check places it), not to h1's, whose run would refuse it."""
    import threading

    from vmkeep.cli import vm_cmd

    for name in ("h1", "h2"):
        records.add(ctx, name, f"qemu+tcp://{name}/system")
        monitored(ctx, name, running=0, free_mib=4096)
    with ctx.catalog.session() as s:
        s.add(Vm(name="web", uuid="uuid-web", host_uri="qemu+tcp://h1/system", host="h1",
                 state="UNDEPLOYED", lcm_state="UNDEPLOYED", created=True,
                 template=SAMPLE_XML.format(disk="/d/vda.qcow2")))  # fmt: skip
    queued: list[str | None] = []

    def a_daemon() -> None:  # stands in for the daemon the job is for: it just cancels it
        for _ in range(200):
            with ctx.catalog.session() as s:
                job = s.query(Job).filter(Job.state == JobState.QUEUED).first()
                if job is not None:
                    queued.append(job.runs_on)
                    break
            threading.Event().wait(0.05)
        if queued:
            jobs.cancel(ctx, job.id)

    worker = threading.Thread(target=a_daemon)
    worker.start()
    code, out = cli_on(ctx, vm_cmd)("vm", "deploy", "web", "--host", "h2")
    worker.join()
    assert queued == ["h2"], out
    assert "queued for host h2's daemon" in out


def test_backup_cancel_of_a_backup_run_on_another_machine_cancels_its_job(ctx: Context) -> None:
    """A backup run by another machine's daemon (another host's VM): ``backup cancel`` sets its
    job's cancel flag (that daemon stops it) instead of refusing with 'busy ... wait for it'."""
    from vmkeep.catalog.tables import Lock
    from vmkeep.engine.protect.backup import cancel_backup
    from vmkeep.errors import BackupFailed

    records.add(ctx, "h2", "qemu+tcp://h2/system")
    add_vm(ctx, "web", "h2")
    job_id = jobs.enqueue(ctx, "backup", "web", {}, "api", "t", runs_on="h2")["id"]
    with ctx.catalog.session() as s:
        vm_id = s.query(Vm).filter(Vm.name == "web").one().id
        s.add(Lock(name=f"vm:{vm_id}", host="machine-of-h2", pid=4242, reason="backup"))
        job = s.get(Job, job_id)
        assert job is not None
        job.state, job.host, job.pid = JobState.RUNNING, "machine-of-h2", 4242
    with pytest.raises(BackupFailed, match="did not stop within"):  # the lock stays: no h2 here
        cancel_backup(ctx, "web", wait=0.3)
    with ctx.catalog.session() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.cancel_requested


def test_backup_cancel_never_cleans_up_another_hosts_vm_through_this_libvirt(
    ctx: Context,
) -> None:
    """No live process runs the backup of h2's VM: what a dead one left is on h2's libvirt, so
    the clean-up is refused here with the fix, this process's libvirt untouched."""
    from vmkeep.engine.protect.backup import cancel_backup

    records.add(ctx, "h2", "qemu+tcp://h2/system")
    add_vm(ctx, "web", "h2")
    with ctx.catalog.session() as s:
        s.query(Vm).filter(Vm.name == "web").update({"lcm_state": "BACKUP"})
    h1 = on_host(ctx, "h1")
    assert isinstance(h1.hv, FakeHypervisor)
    h1.hv.define(SAMPLE_XML.format(disk="/stale/vda.qcow2"))  # a same-named domain here
    with pytest.raises(HostUnavailable, match="backup cancel web' there"):
        cancel_backup(h1, "web", wait=0.3)
    assert [c for c in h1.hv.calls if c[0] != "define"] == []
    with ctx.catalog.session() as s:
        assert s.query(Vm).filter(Vm.name == "web").one().lcm_state == "BACKUP"


def test_a_daemon_that_signs_off_takes_nothing_and_a_waiting_cli_gives_up(
    ctx: Context,
    cli_on,  # type: ignore[no-untyped-def]
) -> None:
    """A daemon stopping says so: placement passes its host over, a CLI does not queue for it,
    and a CLI following a job queued for it cancels the job and says why (never waits on)."""
    import threading

    from vmkeep.cli import vm_cmd

    records.add(ctx, "h2", "qemu+tcp://h2/system")
    add_vm(ctx, "web", "h2")
    monitored(ctx, "h2", running=0, free_mib=4000)
    records.heartbeat(ctx, "h2", {"pid": 4242})
    records.sign_off(ctx, "h2", 4141)  # another daemon's sign-off: not this one's
    assert records.show(ctx, "h2")["daemon"] == "alive"

    def stop_soon() -> None:  # h2's daemon stops while the command waits for it
        threading.Event().wait(1.0)
        records.sign_off(ctx, "h2", 4242)

    stopper = threading.Thread(target=stop_soon)
    stopper.start()
    code, out = cli_on(ctx, vm_cmd)("vm", "reset-state", "web")
    stopper.join()
    assert code == 31 and "that host's daemon stopped" in out, out
    with ctx.catalog.session() as s:
        assert [j.state for j in s.query(Job)] == [JobState.CANCELLED]
    assert records.show(ctx, "h2")["daemon"] == "stopped"
    with pytest.raises(HostUnavailable, match="h2: its daemon is stopped"):
        placement.place(ctx, 1, 1024)
    code, out = cli_on(ctx, vm_cmd)("vm", "reset-state", "web")
    assert code == 31 and "stopped" in out
    records.heartbeat(ctx, "h2", {"pid": 4343})  # started again
    assert records.show(ctx, "h2")["daemon"] == "alive"
