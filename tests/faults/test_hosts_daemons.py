"""One catalog, a daemon per host: two real daemons, ``--host h1`` and ``--host h2``, each with
its own data dir, on one real PostgreSQL catalog (``vmkeep.lab.postgres``: one server for the
module, a new database for each test), with a real lab guest on each host (shared by the module's
tests, reset and imported again for each: the tests stand alone, in any order).

Both hosts' daemons drive this machine's libvirtd (the lab's host 1, ``qemu:///system``): the
two hosts are told apart by the catalog (each guest's ``vms.host``, each job's ``runs_on``), which
is what decides where a job runs. What is checked: each host's jobs run only on its daemon (the
job rows' pid and runs_on), whichever daemon's API queued them; each daemon monitors its own host
and sends heartbeats; h2's daemon SIGKILLed mid-backup: h1 goes on running its own jobs, h2's
queued jobs wait with the reason, h2's guest becomes UNKNOWN, and h2's daemon started again
ends the dead backup's job (FAILED, the documented reason; the guest was cleaned up by its guard
process), runs the queued jobs and polls its guest back to RUNNING; a job queued for a silent
daemon fails after ``[cluster] queued_timeout``; a host whose libvirt its daemon cannot reach is
ERROR and its VMs UNKNOWN. The last two tests run h2's daemon inside lab host 2
(``vmkeep.lab.hosts``: its own libvirtd in its own namespaces) on a guest of that host: a backup
there, and the same SIGKILL mid-backup and recovery.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from vmkeep.catalog.tables import Host, Vm
from vmkeep.config import load_config
from vmkeep.engine.core.context import Context
from vmkeep.engine.hosts import records
from vmkeep.hypervisor import Hypervisor
from vmkeep.lab import Lab, postgres

from .conftest import Guest, fresh_guest

LAB_DIR = Path(os.environ.get("VMKEEP_E2E_LAB_DIR", "/var/lib/vmkeep/lab"))

PREFIX = os.environ.get("VMKEEP_FAULT_PREFIX", "vmkeep-fault-") + "hostsd-"
CLUSTER = {  # fast heartbeats and sweeps: silent after 3 s, its VMs UNKNOWN 5 s later
    "VMKEEP_MONITOR_INTERVAL": "1",
    "VMKEEP_CLUSTER_HEARTBEAT_INTERVAL": "0.5",
    "VMKEEP_CLUSTER_SILENT_AFTER": "3",
    "VMKEEP_CLUSTER_UNKNOWN_AFTER": "5",
}


@dataclass
class Daemon:
    host: str
    proc: subprocess.Popen[str]
    client: httpx.Client
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log.read_text()


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]
    ctx: Context
    guests: dict[str, str]  # host -> its lab guest
    token: str = ""

    def run(self, *args: str, extra: dict[str, str] | None = None) -> Any:
        proc = subprocess.run(
            [sys.executable, "-m", "vmkeep.cli.main", *args, "--json"],
            capture_output=True, text=True, timeout=300,
            env=self.env | {"VMKEEP_NO_DAEMON": "1"} | (extra or {}),
        )  # fmt: skip
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return json.loads(proc.stdout)

    @contextmanager
    def daemon(
        self, host: str, extra: dict[str, str] | None = None, python: list[str] | None = None
    ) -> Iterator[Daemon]:
        """``vmkeep daemon --host HOST`` (one worker: a VM's jobs one after another), its own
        data dir; stopped with SIGTERM (exit 0) unless the test killed it. ``python``: the
        interpreter's argv (a lab host's ``nsenter`` prefix runs it inside that host)."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        data = self.root / f"data-{host}"
        data.mkdir(exist_ok=True)
        data.chmod(0o755)
        log = self.root / f"{host}-{uuid.uuid4().hex[:6]}.log"
        with open(log, "w") as err:
            proc = subprocess.Popen(
                [*(python or [sys.executable]), "-m", "vmkeep.cli.main", "-v", "daemon", "--host", host,
                 "--listen", f"127.0.0.1:{port}", "--workers", "1"],
                env=self.env | {"VMKEEP_DATA_DIR": str(data)} | (extra or {}),
                stderr=err, text=True,
            )  # fmt: skip
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            timeout=60,
            headers={"Authorization": f"Bearer {self.token}"},
        )
        d = Daemon(host, proc, client, log)
        try:
            # inside a lab host it listens on that host's loopback: the tests queue through h1's
            up = (lambda: healthy(d)) if python is None else (lambda: "listening" in d.text())
            wait_for(up, f"daemon {host} up", proc=d)
            yield d
        finally:
            client.close()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=120) == 0, d.text()
            assert "Traceback" not in d.text(), d.text()

    def vm(self, name: str) -> Vm:
        with self.ctx.catalog.session() as s:
            row = s.execute(select(Vm).where(Vm.name == name)).scalar_one()
            s.expunge(row)
            return row


def healthy(d: Daemon) -> bool:
    try:
        return d.client.get("/healthz").status_code == 200
    except httpx.TransportError:
        return False


def wait_for(
    check: Callable[[], Any], what: str, timeout: float = 120, proc: Daemon | None = None
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if proc is not None and proc.proc.poll() is not None:
            raise AssertionError(f"{what}: the daemon exited\n{proc.text()}")
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.2)


def job(d: Daemon, job_id: int) -> dict[str, Any]:
    r = d.client.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return dict(r.json())


def ended(d: Daemon, job_id: int, timeout: float = 300) -> dict[str, Any]:
    return dict(
        wait_for(
            lambda: (j := job(d, job_id))["state"] in ("DONE", "FAILED", "CANCELLED") and j,
            f"job {job_id} ended",
            timeout,
        )
    )


def queue(d: Daemon, vm: str, action: str, body: dict[str, Any] | None = None) -> int:
    r = d.client.post(f"/v1/vms/{vm}/{action}", json=body)
    assert r.status_code == 202, r.text
    return int(r.json()["job"]["id"])


@pytest.fixture(scope="module")
def hv() -> Hypervisor:
    from vmkeep.hypervisor import connect

    return connect("qemu:///system")


@pytest.fixture(scope="module")
def pg() -> Iterator[postgres.Postgres]:
    """One PostgreSQL server for the module; each test has a database of its own on it."""
    server = postgres.start()
    try:
        yield server
    finally:
        postgres.stop(server)


@pytest.fixture(scope="module")
def guests(hv: Hypervisor) -> Iterator[dict[str, Guest]]:
    """A lab guest for host h1 and one for h2 (both on this machine's libvirtd), shared by the
    module's tests (booting is the slow part); each test imports them into its own catalog."""
    lab = Lab(hv, LAB_DIR, prefix=PREFIX)
    lab.down()
    try:
        yield {h: Guest(hv, lab, lab.create(f"{PREFIX}{h}", [64 << 20])) for h in ("h1", "h2")}
    finally:
        lab.down()


@pytest.fixture
def cluster(pg: postgres.Postgres, guests: dict[str, Guest]) -> Iterator[Cluster]:
    """Each test's own catalog (a new database on the module's server) with hosts h1 and h2,
    an admin token, a ``dir`` datastore and the two guests imported by a process of their host;
    the guests as a fresh test finds them (running, thawed, none of vmkeep's checkpoints)."""
    root = LAB_DIR.parent / "fault-data" / uuid.uuid4().hex[:8]
    (root / "ds").mkdir(parents=True)
    root.chmod(0o755)
    (root / "config.toml").write_text("version = 1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMKEEP_")}
    env |= CLUSTER | {
        "VMKEEP_CATALOG_URL": postgres.create_database(pg, f"t{root.name}"),
        "VMKEEP_CONFIG": str(root / "config.toml"),
        "VMKEEP_DATA_DIR": str(root / "data"),
        "VMKEEP_AGENT_TIMEOUT": "5",
        "HOME": str(root),
    }
    ctx = Context(load_config(environ=env))
    try:
        for host in ("h1", "h2"):
            records.add(ctx, host, "qemu:///system")
        c = Cluster(root, env, ctx, {})
        c.token = c.run("token", "create", "ops", "--role", "admin")["token"]
        c.run("datastore", "add", "ds", "--driver", "dir", "--path", str(root / "ds"))
        for host, g in guests.items():
            fresh_guest(g)
            # imported by a process of that host: the VM lives there
            c.run("vm", "import", g.vm, extra={"VMKEEP_CLUSTER_HOST": host})
            c.guests[host] = g.vm
        yield c
    finally:
        ctx.catalog.engine.dispose()
        shutil.rmtree(root, ignore_errors=True)


def test_each_daemon_runs_only_its_own_host_s_jobs(cluster: Cluster) -> None:
    c = cluster
    g1, g2 = c.guests["h1"], c.guests["h2"]
    assert (c.vm(g1).host, c.vm(g2).host) == ("h1", "h2")
    with c.daemon("h1") as d1, c.daemon("h2") as d2:
        assert "running the jobs of host h1" in d1.text()
        ids = {d.host: d for d in (d1, d2)}
        # each daemon's API queues for the right host; cheap real jobs on both guests, and a
        # backup on each queued through the other host's daemon
        queued = [(queue(d, g, "reset-state"), host) for d in (d1, d2) for host, g in
                  c.guests.items()]  # fmt: skip
        queued += [(queue(d2, g1, "backup", {"datastore": "ds"}), "h1"),
                   (queue(d1, g2, "backup", {"datastore": "ds"}), "h2")]  # fmt: skip
        for job_id, host in queued:
            j = ended(d1, job_id)
            assert j["state"] == "DONE", j
            assert (j["runs_on"], j["pid"]) == (host, ids[host].pid), (j, host)
        backups = [ended(d1, job_id)["result"] for job_id, _h in queued[-2:]]
        assert [b["status"] for b in backups] == ["VALID", "VALID"], backups
        # each daemon monitors its own host and beats
        for d in (d1, d2):
            h = wait_for(
                lambda d=d: (h := records.show(c.ctx, d.host))["monitored_at"] and h,
                f"host {d.host} monitored",
            )
            assert h["state"] == "MONITORED" and h["daemon"] == "alive", h
            assert h["daemon_info"]["pid"] == d.pid
            assert h["daemon_info"]["listen"] == str(d.client.base_url).removeprefix(
                "http://"
            ).rstrip("/")
            m = h["monitor"]
            assert m["cpus"] >= 1 and 0 < m["free_memory_kib"] <= m["memory_kib"], m
            assert (m["vms"], m["running"]) == (1, 1), m
            assert m["datastores"]["ds"] > 0, m


def test_h2_killed_mid_backup_h1_goes_on_h2_recovers(cluster: Cluster, hv: Hypervisor) -> None:
    killed_mid_backup(cluster, "h2", hv)


def killed_mid_backup(
    c: Cluster, host: str, host_hv: Hypervisor, python: list[str] | None = None
) -> None:
    """``host``'s daemon SIGKILLed mid-backup: h1's daemon goes on, ``host``'s queued jobs wait
    with the reason, its guest becomes UNKNOWN; started again, it ends up with the dead job
    FAILED (the documented reason), the guest cleaned up, its queued jobs run."""
    g1, g2 = c.guests["h1"], c.guests[host]
    with c.daemon("h1") as d1:
        with c.daemon(host, {"VMKEEP_FAILPOINTS": "copy=sleep:120"}, python) as d2:
            # the guest as its daemon polled it at its start
            wait_for(lambda: c.vm(g2).lcm_state == "RUNNING", "the guest polled", proc=d2)
            dead = queue(d1, g2, "backup", {"datastore": "ds"})
            wait_for(lambda: "fail point copy" in d2.text(), "the backup copying", proc=d2)
            assert job(d1, dead)["state"] == "RUNNING" and c.vm(g2).lcm_state == "BACKUP"
            waits = queue(d1, g2, "reset-state")  # the daemon's only worker is busy: it waits
            d2.proc.kill()
            d2.proc.wait()
        killed = d2.pid
        # the guard process recovers the guest at once (thawed, backup job aborted)
        wait_for(lambda: c.vm(g2).lcm_state == "RUNNING", "the guest recovered by its guard")
        later = queue(d1, g2, "backup", {"datastore": "ds"})
        # h1 goes on running its own jobs meanwhile
        mine = [queue(d1, g1, "reset-state"), queue(d1, g1, "backup", {"datastore": "ds"})]
        for job_id in mine:
            j = ended(d1, job_id)
            assert (j["state"], j["pid"]) == ("DONE", d1.pid), j
        # the killed host's queued jobs wait, saying why; its guest becomes UNKNOWN (3 + 5 s)
        for job_id in (waits, later):
            why = wait_for(lambda job_id=job_id: job(d1, job_id)["waiting"], "a wait reason")
            assert why.startswith(f"host {host}'s daemon is silent since "), why
            assert "queued_timeout" in why and job(d1, job_id)["state"] == "QUEUED"
        wait_for(lambda: c.vm(g2).lcm_state == "UNKNOWN", "the guest UNKNOWN", 60)
        vm2 = c.vm(g2)
        assert vm2.state == "UNKNOWN" and f"host {host}'s daemon is silent" in (vm2.error or "")
        assert c.vm(g1).lcm_state == "RUNNING"  # h1's guest is polled by its live daemon
        with c.daemon(host, python=python) as d2b:
            first = ended(d1, dead)  # ended by the first daemon of this machine to look
            assert (first["state"], first["error"]["code"]) == ("FAILED", "ProcessDied"), first
            assert f"(pid {killed}) died" in first["error"]["message"], first
            for job_id in (waits, later):
                j = ended(d1, job_id)
                assert (j["state"], j["pid"], j["runs_on"]) == ("DONE", d2b.pid, host), j
            assert ended(d1, later)["result"]["status"] == "VALID"
            wait_for(lambda: c.vm(g2).lcm_state == "RUNNING", "the guest polled back")
            info = host_hv.domain(g2)
            assert info.state == "ACTIVE" and not info.paused
            assert host_hv.fs_freeze_status(g2, 10) == "thawed"
            assert records.show(c.ctx, host)["daemon"] == "alive"


def test_a_job_for_a_silent_daemon_fails_after_queued_timeout(cluster: Cluster) -> None:
    c = cluster
    with c.daemon("h2"):  # h2's daemon signs on, then off
        wait_for(lambda: records.show(c.ctx, "h2")["daemon"] == "alive", "h2 alive", 30)
    with c.daemon("h1", {"VMKEEP_CLUSTER_QUEUED_TIMEOUT": "4"}) as d1:
        gone = ("silent", "stopped")  # stopped: it signed off when it was stopped
        wait_for(lambda: records.show(c.ctx, "h2")["daemon"] in gone, "h2 gone", 30)
        job_id = queue(d1, c.guests["h2"], "reset-state")
        j = ended(d1, job_id, timeout=60)
        assert (j["state"], j["error"]["code"], j["exit_code"]) == (
            "FAILED", "HostUnavailable", 31,
        ), j  # fmt: skip
        msg = j["error"]["message"]
        assert "Host 'h2'" in msg and "vmkeep daemon --host h2" in msg, msg
        assert j["pid"] == 0, j  # no daemon ever ran it
        assert f"job {job_id} failed: its host's daemon stayed silent" in d1.text()


def test_a_host_its_daemon_cannot_reach_is_error_and_its_vms_unknown(cluster: Cluster) -> None:
    """h3's libvirt refuses its daemon (nothing listens at its URI): the host goes ERROR with
    libvirt's error, its running VM UNKNOWN after unknown_after (5 s) with the reason; its URI
    fixed and its daemon started again, the host is MONITORED."""
    c = cluster
    records.add(c.ctx, "h3", "qemu+tcp://127.0.0.1:1/system")
    with c.ctx.catalog.session() as s:
        s.add(Vm(name="h3-vm", uuid=str(uuid.uuid4()), host_uri="qemu+tcp://127.0.0.1:1/system",
                 host="h3", state="ACTIVE", lcm_state="RUNNING", backup_config={}))  # fmt: skip
    with c.daemon("h3") as d3:
        h = wait_for(lambda: (h := records.show(c.ctx, "h3"))["state"] == "ERROR" and h, "ERROR")
        assert "127.0.0.1:1" in h["error"] and h["daemon"] == "alive", h
        wait_for(lambda: c.vm("h3-vm").lcm_state == "UNKNOWN", "h3's VM UNKNOWN", 30, d3)
        assert "host h3 cannot be reached since" in (c.vm("h3-vm").error or "")
        assert "h3-vm" in d3.text()  # the daemon logs the VMs it marked
    with c.ctx.catalog.session() as s:
        s.execute(update(Host).where(Host.name == "h3").values(uri="qemu:///system"))
    with c.daemon("h3"):
        h = wait_for(lambda: (h := records.show(c.ctx, "h3"))["state"] == "MONITORED" and h, "ok")
        assert h["error"] is None and h["monitor"]["cpus"] >= 1, h


@pytest.fixture(scope="module")
def host2_guest() -> Iterator[tuple[Guest, str]]:
    """Lab host 2 (``vmkeep.lab.hosts``: its own libvirtd in its own namespaces) with a guest of
    its own, and the host's URI; the hosts are taken down afterwards unless another test module
    still holds a lease on them (``hosts.lease``)."""
    from vmkeep.hypervisor import connect
    from vmkeep.lab import hosts

    with hosts.lease(2) as up:
        host = up[1]
        hv2 = connect(host.uri)
        lab = Lab(hv2, LAB_DIR, prefix=f"{PREFIX}lab2-")
        try:
            lab.down()
            yield Guest(hv2, lab, lab.create(f"{PREFIX}lab2-vm", [64 << 20])), host.uri
        finally:
            lab.down()


@pytest.fixture
def lab_host2(cluster: Cluster, host2_guest: tuple[Guest, str]) -> Guest:
    """Lab host 2 as host ``lab2`` of this test's catalog, its guest imported there."""
    g, uri = host2_guest
    fresh_guest(g)
    records.add(cluster.ctx, "lab2", uri)
    cluster.run("vm", "import", g.vm, extra={"VMKEEP_CLUSTER_HOST": "lab2"})
    cluster.guests["lab2"] = g.vm
    return g


def test_a_backup_on_lab_host_2_by_the_daemon_inside_it(
    cluster: Cluster, lab_host2: Guest, hv: Hypervisor
) -> None:
    """h2's daemon runs inside lab host 2's namespaces (``vmkeep lab hosts exec 2``) on the
    same catalog; a backup of its guest queued through h1's daemon runs there."""
    from vmkeep.lab import hosts

    c = cluster
    guest = c.guests["lab2"]
    assert c.vm(guest).host == "lab2"
    with pytest.raises(Exception):  # noqa: B017,PT011 (any lookup error): not on host 1
        hv.domain(guest)
    inside = [*hosts.nsenter_argv(2), sys.executable]
    with c.daemon("h1") as d1, c.daemon("lab2", python=inside) as d2:
        backup = queue(d1, guest, "backup", {"datastore": "ds"})
        j = ended(d1, backup)
        assert (j["state"], j["runs_on"], j["pid"]) == ("DONE", "lab2", d2.pid), j
        point = j["result"]
        assert point["status"] == "VALID", point
        verify = d1.client.post(f"/v1/backups/{point['id']}/verify", json={})
        assert verify.status_code == 202, verify.text
        v = ended(d1, verify.json()["job"]["id"])
        assert v["state"] == "DONE" and v["runs_on"] is None, v  # a point's job: any daemon
        h = wait_for(lambda: (h := records.show(c.ctx, "lab2"))["monitored_at"] and h, "lab2")
        assert h["state"] == "MONITORED" and h["daemon_info"]["pid"] == d2.pid, h
        assert (h["monitor"]["vms"], h["monitor"]["running"]) == (1, 1), h


def test_lab_host_2_s_daemon_killed_mid_backup_recovers(cluster: Cluster, lab_host2: Guest) -> None:
    """The same, with h2's daemon (and the guard process it starts) inside lab host 2."""
    from vmkeep.lab import hosts

    killed_mid_backup(cluster, "lab2", lab_host2.hv, [*hosts.nsenter_argv(2), sys.executable])
