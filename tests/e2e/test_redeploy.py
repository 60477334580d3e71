"""A host failure survived, on real libvirtds of the two-host lab: a guest created and deployed
on the second host (``vm create --host``, ``vm deploy``), that host's libvirtd and the guest's
QEMU killed by their pids, and ``vm recover --redeploy`` bringing the guest up on host 1 from
its disk on the shared file system with the data written before intact (sha256 through the
guest agent); refused while the guest still runs on its old host; ``--from-backup`` from a real
backup (data of the point back, data written after it not); a ``vm deploy`` without ``--host``
placed by the scheduler on the host with fewer running VMs.

The module runs on a lab of its own (10.81.0.0/16, ``VMKEEP_LAB_HOSTS_NET``): killing its host 2
never disturbs the lab other sessions' tests share (10.77). Host 1 is this machine's libvirtd
either way (reached through the lab's relay), never touched. The hosts are monitored by the
engine's monitor (``engine/hosts/monitor.py``, what each daemon's monitor loop runs): MONITORED
with their figures, ERROR once host 2's libvirt is dead, and its sweep marks the VM UNKNOWN after
``[cluster] unknown_after`` (2 s here).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from vmkeep.config import load_config
from vmkeep.engine.core.context import Context
from vmkeep.engine.hosts import monitor as host_monitor
from vmkeep.engine.hosts import records
from vmkeep.hypervisor import Hypervisor, connect
from vmkeep.lab import Lab, hosts
from vmkeep.lab.image import build_boot_image
from vmkeep.lab.lab import domain_xml

from .conftest import LAB_DIR, PREFIX, running_daemon

NET = "81"  # this module's own lab (see the module's doc)
FAIL = 2  # the lab host killed
H1, HF = "host1", f"host{FAIL}"
UNKNOWN_AFTER = 2  # [cluster] unknown_after, s: the monitor's grace before its VMs are UNKNOWN


def virsh(uri: str, *argv: str) -> str:
    proc = subprocess.run(["virsh", "-c", uri, *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"virsh -c {uri} {' '.join(argv)}: {proc.stderr}"
    return proc.stdout


def running_on(uri: str) -> set[str]:
    return set(virsh(uri, "list", "--name").split())


@pytest.fixture(scope="module")
def lab_own() -> Iterator[dict[int, str]]:
    """Hosts 1 and 2 of this module's own lab, removed afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(hosts.NET_ENV, NET)
        with hosts.lease(FAIL) as up:
            yield {h.number: h.uri for h in up}


@pytest.fixture(autouse=True)
def own_lab(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hosts.NET_ENV, NET)  # clean_env removed it; the CLI inherits it


@pytest.fixture
def hosts_up(lab_own: dict[int, str], own_lab: None) -> dict[int, str]:
    """The module's hosts, host 2 running: every test kills it, so each one brings it back
    first (its libvirtd restarted in its namespaces; nothing to do when it runs)."""
    hosts.up(FAIL)
    return lab_own


def monitor(name: str) -> dict[str, Any]:
    """Host ``name`` monitored once by the engine, as its daemon's monitor loop does
    (``engine/hosts/monitor.py``): MONITORED with its figures, or ERROR when its libvirt does
    not answer."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VMKEEP_CLUSTER_HOST", name)
        out = host_monitor.monitor(Context(load_config()))
    assert out["host"] == name
    return out


def host_failed(ctx: Context, name: str, vms: list[str]) -> None:
    """The host's libvirt does not answer its monitor (ERROR); after ``[cluster]
    unknown_after`` the sweep any daemon runs marks its VMs UNKNOWN."""
    out = monitor(name)
    assert out["state"] == records.ERROR, out
    time.sleep(UNKNOWN_AFTER + 0.5)
    assert sorted(host_monitor.sweep(ctx)["unknown"]) == sorted(vms)


def kill_host(n: int, guest: str) -> None:
    """Host n's libvirtd and the guest's QEMU killed (SIGKILL), each by its pid."""
    libvirtd = hosts.libvirtd_pid(n)
    assert libvirtd is not None
    qemu = qemu_pid(n, guest)
    for pid in (libvirtd, qemu):
        os.kill(pid, 9)
    gone(libvirtd, qemu)


def qemu_pid(n: int, guest: str) -> int:
    """The pid of the guest's QEMU on host n (its libvirtd's pid file), checked to be it."""
    pidfile = hosts.LabHost(n).dir / "run" / "qemu" / f"{guest}.pid"
    qemu = int(pidfile.read_text().strip())
    assert f"guest={guest}" in Path(f"/proc/{qemu}/cmdline").read_text().replace("\0", " ")
    return qemu


def kill_qemu(n: int, guest: str) -> None:
    qemu = qemu_pid(n, guest)
    os.kill(qemu, 9)
    gone(qemu)


def gone(*pids: int) -> None:
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{p}").exists() and hosts.is_running(p) for p in pids):
        assert time.monotonic() < deadline, "killed processes still there"
        time.sleep(0.1)


@pytest.fixture
def on(vmkeep: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``on(HOST, *args)``: the CLI acting for that host (``[cluster] host``); None: no host."""

    def run(host: str | None, *args: str, check: int | None = 0) -> Any:
        if host is None:
            monkeypatch.delenv("VMKEEP_CLUSTER_HOST", raising=False)
        else:
            monkeypatch.setenv("VMKEEP_CLUSTER_HOST", host)
        return vmkeep(*args, check=check)

    return run


def new_guest(lab: Lab, name: str, folder: Path) -> Path:
    """A lab guest's disk and domain XML (not defined anywhere): the file for ``vm create``."""
    lab.create(name, [64 << 20], start=False)
    lab.hv.undefine(name)  # vmkeep defines it, on the host it places it on
    boot = build_boot_image(lab.cache_dir)
    disk = lab.vm_dir(name) / "disk0.qcow2"
    xml = folder / f"{name}.xml"
    xml.write_text(domain_xml(name, boot, [disk], lab.serial_log(name)))
    return xml


@pytest.fixture(autouse=True)
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMKEEP_CLUSTER_UNKNOWN_AFTER", str(UNKNOWN_AFTER))


def test_host_killed_its_vm_redeployed_and_a_deploy_placed(
    hosts_up: dict[int, str], lab: Lab, hv: Hypervisor, on: Any, tmp_path: Path, clean_env: Path
) -> None:
    ctx = Context(load_config())
    uri1, urif = hosts_up[1], hosts_up[FAIL]
    records.add(ctx, H1, uri1)
    records.add(ctx, HF, urif)
    monitor(H1)
    monitor(HF)
    hvf = connect(urif)
    lab_f = Lab(hvf, LAB_DIR, prefix=PREFIX)
    name = f"{PREFIX}redeploy"

    # created pinned to the failing host, deployed there by that host's process
    on(None, "vm", "create", "--xml", str(new_guest(lab, name, tmp_path)), "--host", HF)
    out = on(HF, "vm", "deploy", name, "--json").json()
    assert out["lcm_state"] == "RUNNING"
    assert name in running_on(urif) and name not in running_on(uri1)
    lab_f.wait_ready(name)
    before = lab_f.write_random(name, "/mnt/vda/before", 4)
    # backed up there as increments: a checkpoint on host 2, its bitmap in the qcow2
    ds = clean_env / "ds"
    on(None, "datastore", "add", "ds", "--driver", "dir", "--path", str(ds))
    on(None, "vm", "config", name, "--mode", "increment")
    first = on(HF, "backup", name, "--datastore", "ds", "--json").json()

    # the host is marked failed while it still runs the guest: refused, never two copies
    with ctx.catalog.session() as s:
        records.find_host(s, HF).state = records.ERROR
    res = on(H1, "vm", "recover", name, "--redeploy", "--host", H1, check=25)
    assert f"it still runs on host {HF}" in res.err, res.err
    assert name in running_on(urif) and name not in running_on(uri1)

    # the host dies: its libvirtd and the guest's QEMU
    kill_host(FAIL, name)
    host_failed(ctx, HF, [name])
    assert on(None, "vm", "show", name, "--json").json()["lcm_state"] == "UNKNOWN"
    t0 = time.monotonic()
    res = on(H1, "vm", "recover", name, "--redeploy", "--host", H1, "--json", check=1)
    took = time.monotonic() - t0
    out = res.json()
    assert (out["host"], out["from_host"], out["from"]) == (H1, HF, "disks"), out
    assert f"host {HF} could not be asked" in res.err and "never start it there" in res.err
    assert "next backup starts a new full chain" in res.err
    assert name in running_on(uri1)
    lab.wait_ready(name)
    assert lab.sha256(name, "/mnt/vda/before") == before  # the data written before, intact
    shown = on(None, "vm", "show", name, "--json").json()
    assert (shown["host"], shown["host_uri"], shown["lcm_state"]) == (H1, uri1, "RUNNING")
    last = on(None, "vm", "history", name, "--json").json()[-1]
    assert (last["action"], last["result"]) == ("recover", "DONE")
    assert last["options"] == {"redeploy": True, "host": H1, "from_backup": False}
    print(f"redeployed from its disk in {took:.1f} s")
    # its next backup, on host 1, with the old checkpoint's bitmap still in its qcow2: a new chain
    moved = on(H1, "backup", name, "--datastore", "ds", "--json").json()
    assert moved["id"] != first["id"], moved

    # --- the failing host up again (its libvirtd in its namespaces, the guest's old definition
    # with it) ------------------------------------------------------------------------------------
    hosts.up(FAIL)
    assert name in virsh(urif, "list", "--all", "--name").split()  # what the warning said
    assert name not in running_on(urif)
    res = on(H1, "vm", "recover", name, "--redeploy", check=25)  # it runs on a working host
    assert "Redeploy is for the VM of a failed host" in res.err, res.err

    # a deploy without --host: placed by the scheduler on the host with fewer running VMs
    # (host 1 runs the redeployed guest, host 2 nothing since its QEMU was killed)
    f1, ff = monitor(H1)["monitor"], monitor(HF)["monitor"]
    assert ff["running"] < f1["running"], (f1, ff)
    other = f"{PREFIX}placed"
    on(None, "vm", "create", "--xml", str(new_guest(lab, other, tmp_path)))
    # through host 2's daemon: the API's check places the VM and queues the job for the
    # daemon of the host it chose, which runs it (a job placed elsewhere would wait here)
    with running_daemon("--host", HF, log=tmp_path / "daemon-h2.log"):
        on(None, "vm", "deploy", other)
        job = next(j for j in on(None, "jobs", "list", "--json").json() if j["target"] == other)
        assert (job["kind"], job["state"], job["runs_on"]) == ("vm-deploy", "DONE", HF), job
    placed = {r["name"]: r for r in on(None, "vm", "list", "--json").json()}[other]
    assert placed["host"] == HF, (placed, f1, ff)
    assert other in running_on(urif) and other not in running_on(uri1)
    Lab(connect(urif), LAB_DIR, prefix=PREFIX).wait_ready(other)
    # a process of the other host refuses it (it is not that host's), saying where it lives
    res = on(H1, "vm", "poweroff", other, "--hard", check=31)
    assert f"Host '{HF}'" in res.err, res.err
    on(HF, "vm", "terminate", other, "--hard")
    assert other not in running_on(urif)
    print(f"placed on {HF}: running {H1} {f1['running']}, {HF} {ff['running']}")

    # --- from a backup: the guest back on that host, backed up there, the host killed again ---
    res = on(H1, "vm", "undeploy", name, "--hard", check=1)  # its checkpoint stays behind
    assert "checkpoints were dropped" in res.err, res.err
    on(HF, "vm", "deploy", name, "--host", HF)
    hvf = connect(urif)
    lab_f = Lab(hvf, LAB_DIR, prefix=PREFIX)
    lab_f.wait_ready(name)
    assert name in running_on(urif) and name not in running_on(uri1)
    assert lab_f.sha256(name, "/mnt/vda/before") == before
    point = on(HF, "backup", name, "--datastore", "ds", "--json").json()
    after = lab_f.write_random(name, "/mnt/vda/after", 2)  # not in the point
    assert after

    kill_host(FAIL, name)
    host_failed(ctx, HF, [name])
    monitor(H1)
    res = on(H1, "vm", "recover", name, "--redeploy", "--from-backup", "--json", check=1)
    out = res.json()
    assert (out["host"], out["from"], out["backup"]) == (H1, "backup", point["id"]), out
    assert "next backup starts a new full chain" in res.err
    lab.wait_ready(name)
    assert lab.sha256(name, "/mnt/vda/before") == before
    assert lab.sh(name, "test -e /mnt/vda/after && echo there || echo absent").strip() == "absent"
    assert on(None, "vm", "show", name, "--json").json()["host"] == H1
    # its next backup, on its new host: a new full chain (the old one's checkpoint is gone)
    again = on(H1, "backup", name, "--datastore", "ds", "--json").json()
    assert again["id"] != point["id"], again
    on(H1, "vm", "terminate", name, "--hard")  # few guests at a time on this machine


def test_group_recovers_in_its_start_order(
    hosts_up: dict[int, str], lab: Lab, on: Any, tmp_path: Path
) -> None:
    """Two members on host 2, host 2 killed: ``group recover --redeploy`` (placed: host 1)
    brings them up in the group's start order, each with its data."""
    ctx = Context(load_config())
    uri1, urif = hosts_up[1], hosts_up[FAIL]
    records.add(ctx, H1, uri1)
    records.add(ctx, HF, urif)
    monitor(H1)
    monitor(HF)
    lab_f = Lab(connect(urif), LAB_DIR, prefix=PREFIX)
    db, app = f"{PREFIX}g-db", f"{PREFIX}g-app"
    sums = {}
    for name in (db, app):
        on(None, "vm", "create", "--xml", str(new_guest(lab, name, tmp_path)), "--host", HF)
        on(HF, "vm", "deploy", name)
    for name in (db, app):
        lab_f.wait_ready(name)
        sums[name] = lab_f.write_random(name, "/mnt/vda/data", 2)
    on(None, "group", "create", "shop", db, app)  # start order: db, then app

    kill_host(FAIL, db)
    kill_qemu(FAIL, app)
    host_failed(ctx, HF, [db, app])
    monitor(H1)
    # through host 1's daemon: the API's check places the group (host 1) and queues the job for
    # that host's daemon (runs_on), which runs it
    with running_daemon("--host", H1, log=tmp_path / "daemon.log"):
        res = on(None, "group", "recover", "shop", "--redeploy", "--json", check=1)
        jobs = on(None, "jobs", "list", "--json").json()
    job = next(j for j in jobs if j["kind"] == "group-recover")
    assert (job["state"], job["runs_on"]) == ("DONE", H1), job
    out = res.json()
    assert out["host"] == H1
    assert [(m["vm"], m["action"], m["from_host"]) for m in out["members"]] == [
        (db, "redeployed", HF),
        (app, "redeployed", HF),
    ]
    started = {
        n: datetime.fromisoformat(on(None, "vm", "history", n, "--json").json()[-1]["end"])
        for n in (db, app)
    }
    assert started[db] <= started[app]
    assert {db, app} <= running_on(uri1)
    for name in (db, app):
        lab.wait_ready(name)
        assert lab.sha256(name, "/mnt/vda/data") == sums[name]
    # both on a working host now: nothing left to recover
    res = on(H1, "group", "recover", "shop", "--redeploy", check=25)
    assert "none of its members is on a failed host" in res.err
    for name in (db, app):
        on(H1, "vm", "terminate", name, "--hard")
