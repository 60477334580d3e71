"""``vmkeep vm migrate`` on the two-host lab (``lab_hosts``: this machine's libvirtd and a second one
in its own namespaces), on real guests: a running guest moves to host 2 and back live while a
counter in its RAM keeps counting and its agent answers on each side, with libvirt's downtime in
the VM's history; a backup after the move is an increment of the chain started on host 1 (its
checkpoints followed it); a cancelled migration leaves the VM running where it was; with
``--copy-storage`` a disk in host-local storage is copied to host 2's own and the chain goes on.

Each command acts for the VM's host (``VMKEEP_CLUSTER_HOST``), as that host's daemon would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkeep.config import load_config
from vmkeep.engine.core.context import Context
from vmkeep.engine.hosts import records
from vmkeep.hypervisor import Hypervisor, connect
from vmkeep.lab import Lab
from vmkeep.lab.hosts import HOSTLOCAL
from vmkeep.lab.image import build_boot_image
from vmkeep.lab.lab import domain_xml, make_ext4_qcow2

from .conftest import LAB_DIR, PREFIX

COUNTER = (
    "(i=0; while :; do i=$((i+1)); echo $i > /run/counter; sleep 0.2; done)"
    " >/dev/null 2>&1 </dev/null &"
)


@pytest.fixture
def cluster(lab_hosts, vmkeep, monkeypatch: pytest.MonkeyPatch) -> dict[int, Hypervisor]:
    """Hosts host1 and host2 in the test's catalog; commands act for host1 unless a test says
    otherwise; imported lab VMs may migrate (the config lists it)."""
    config = Path(os.environ["VMKEEP_CONFIG"])
    with config.open("a") as f:
        f.write('[vmm]\nimported_vms_actions = ["migrate", "poweroff", "recover"]\n')
    ctx = Context(load_config())
    for n in (1, 2):
        records.add(ctx, f"host{n}", lab_hosts.uris[n])
    monkeypatch.setenv("VMKEEP_CLUSTER_HOST", "host1")
    return {n: connect(uri) for n, uri in lab_hosts.uris.items()}


def act_for(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setenv("VMKEEP_CLUSTER_HOST", f"host{n}")


def where(hvs: dict[int, Hypervisor], name: str) -> set[int]:
    return {n for n, hv in hvs.items() if name in {d.name for d in hv.list_domains()}}


def remove_everywhere(hvs: dict[int, Hypervisor], lab: Lab, name: str) -> None:
    for hv in hvs.values():
        hv.destroy(name)
        hv.undefine(name)
    shutil.rmtree(lab.vm_dir(name), ignore_errors=True)


@pytest.fixture
def guest(
    lab: Lab, cluster: dict[int, Hypervisor], request: pytest.FixtureRequest
) -> Iterator[str]:
    name = f"{PREFIX}mig-{request.node.name[5:20].replace('_', '-')}"
    lab.create(name, [64 << 20])
    yield name
    remove_everywhere(cluster, lab, name)


def counter(hv: Hypervisor, name: str) -> int:
    return int(Lab(hv, LAB_DIR, prefix=PREFIX).sh(name, "cat /run/counter").strip())


def counting(hv: Hypervisor, name: str) -> int:
    """The counter's value, after checking it still goes up."""
    first = counter(hv, name)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = counter(hv, name)
        if now > first:
            return now
    raise AssertionError(f"the counter in {name}'s RAM stopped at {first}")


def test_live_migration_there_and_back_the_guest_keeps_counting(
    vmkeep, lab: Lab, cluster: dict[int, Hypervisor], guest: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    vmkeep("vm", "import", guest)
    lab.sh(guest, COUNTER)
    before = counting(cluster[1], guest)

    res = vmkeep("vm", "migrate", guest, "host2", "--live", "--json").json()
    assert res["host"] == "host2" and res["lcm_state"] == "RUNNING", res
    assert where(cluster, guest) == {2}
    there = counting(cluster[2], guest)  # the agent answers on host 2, the RAM came along
    assert there > before
    m = res["migration"]
    assert m["source"] == "host1" and m["destination"] == "host2" and m["live"]
    assert 0 < m["downtime_ms"] < 5000 and m["total_ms"] > m["downtime_ms"], m
    assert m["data_bytes"] > 32 << 20  # most of the guest's 192 MiB RAM went over the wire
    shown = vmkeep("vm", "show", guest, "--json").json()
    assert shown["host"] == "host2" and shown["host_uri"] == cluster[2].uri

    # on host 1 the VM is host 2's now: its daemon would refuse, naming where it lives
    refused = vmkeep("vm", "migrate", guest, "host1", "--live", check=31)
    assert "host2" in refused.err

    act_for(monkeypatch, 2)
    back = vmkeep("vm", "migrate", guest, "host1", "--live", "--json").json()
    assert back["host"] == "host1" and where(cluster, guest) == {1}
    assert counting(cluster[1], guest) > there
    history = [
        h for h in vmkeep("vm", "history", guest, "--json").json() if h["action"] == "migrate"
    ]
    assert [(h["result"], h["migration"]["destination"]) for h in history[-2:]] == [
        ("DONE", "host2"), ("DONE", "host1")
    ]  # fmt: skip
    downtimes = [h["migration"]["downtime_ms"] for h in history[-2:]]
    print(f"downtime there {downtimes[0]} ms, back {downtimes[1]} ms")


def test_backup_after_migration_is_an_increment(
    vmkeep,
    lab: Lab,
    cluster: dict[int, Hypervisor],
    guest: str,
    qemu_reachable_data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = qemu_reachable_data_dir.with_name(qemu_reachable_data_dir.name + "-ds")
    vmkeep("datastore", "add", "ds", "--driver", "dir", "--path", str(store))
    try:
        vmkeep("vm", "import", guest)
        vmkeep("vm", "config", guest, "--mode", "increment")
        full = vmkeep("backup", guest, "-d", "ds", "--json").json()
        assert full["increment"] == 0
        lab.write_random(guest, "/mnt/vda/before", 2)
        res = vmkeep("vm", "migrate", guest, "host2", "--live", "--json").json()
        assert res["migration"]["checkpoints"] == [full["increments"][0]["checkpoint"]]
        assert res["migration"]["chain_break"] == ""
        act_for(monkeypatch, 2)
        Lab(cluster[2], LAB_DIR, prefix=PREFIX).write_random(guest, "/mnt/vda/after", 2)
        inc = vmkeep("backup", guest, "-d", "ds", "--json")
        assert "warning" not in inc.err, inc.err
        point = inc.json()
        assert point["id"] == full["id"] and point["increment"] == 1, point
        size = point["increments"][1]["size"]
        assert (4 << 20) <= size < (12 << 20), size  # what was written on both sides, no more
        vmkeep("backups", "verify", str(point["id"]))
    finally:
        shutil.rmtree(store, ignore_errors=True)


def test_cancelled_migration_leaves_the_vm_running_where_it_was(
    vmkeep, lab: Lab, cluster: dict[int, Hypervisor], guest: str
) -> None:
    vmkeep("vm", "import", guest)
    lab.sh(guest, COUNTER)
    argv = [sys.executable, "-m", "vmkeep.cli.main", "vm", "migrate", guest, "host2", "--live"]
    proc = subprocess.Popen(  # 1 MiB/s: the 192 MiB guest takes minutes
        [*argv, "--bandwidth", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        job = None
        while job is None and time.monotonic() < deadline:
            rows = vmkeep("jobs", "list", "--json").json()
            job = next((j for j in rows if j["kind"] == "vm-migrate" and j["done_bytes"]), None)
            time.sleep(0.5)
        assert job is not None, "the migration job never reported progress"
        assert vmkeep("vm", "show", guest, "--json").json()["lcm_state"] == "MIGRATE"
        vmkeep("jobs", "cancel", str(job["id"]))
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, err
    shown = vmkeep("vm", "show", guest, "--json").json()
    assert shown["host"] == "host1" and shown["lcm_state"] == "RUNNING", shown
    assert where(cluster, guest) == {1} and cluster[1].domain(guest).state == "ACTIVE"
    counting(cluster[1], guest)
    done = next(j for j in vmkeep("jobs", "list", "--json").json() if j["id"] == job["id"])
    assert done["state"] == "CANCELLED", done


def test_copy_storage_moves_a_host_local_disk_and_its_bitmaps(
    vmkeep,
    lab: Lab,
    lab_hosts,
    cluster: dict[int, Hypervisor],
    qemu_reachable_data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A disk in host 1's local storage (``/var/lib/vmkeep/hostlocal``, a folder of its own on
    each lab host) is copied to host 2's, with its checkpoint: the next backup is an increment."""
    name = f"{PREFIX}mig-local"
    disk = HOSTLOCAL / f"{name}.qcow2"
    store = qemu_reachable_data_dir.with_name(qemu_reachable_data_dir.name + "-ds")
    try:
        make_ext4_qcow2(disk, 64 << 20)
        lab.vm_dir(name).mkdir(parents=True, exist_ok=True)
        boot = build_boot_image(lab.cache_dir)
        cluster[1].define(domain_xml(name, boot, [disk], lab.serial_log(name)))
        lab.start(name)
        vmkeep("datastore", "add", "ds", "--driver", "dir", "--path", str(store))
        vmkeep("vm", "import", name)
        vmkeep("vm", "config", name, "--mode", "increment")
        full = vmkeep("backup", name, "-d", "ds", "--json").json()
        lab.write_random(name, "/mnt/vda/before", 2)
        res = vmkeep("vm", "migrate", name, "host2", "--live", "--copy-storage", "--json").json()
        assert res["migration"]["checkpoints"] and res["migration"]["chain_break"] == ""
        assert where(cluster, name) == {2}
        # the running QEMU on host 2 has the checkpoint's bitmap, persistent (stored in the
        # image when it closes it); libvirt's REDEFINE checked it too
        blocks = json.loads(
            subprocess.run(
                ["virsh", "-c", lab_hosts.uris[2], "qemu-monitor-command", name,
                 '{"execute":"query-block"}'],
                capture_output=True, text=True, check=True,
            ).stdout
        )["return"]  # fmt: skip
        bitmaps = [b for blk in blocks for b in blk.get("inserted", {}).get("dirty-bitmaps", [])]
        cp = full["increments"][0]["checkpoint"]
        assert [(b["name"], b["persistent"]) for b in bitmaps] == [(cp, True)], bitmaps
        assert bitmaps[0]["count"] >= 2 << 20  # the 2 MiB written on host 1 before the move
        assert disk.exists()  # host 1's copy stays where it was
        act_for(monkeypatch, 2)
        point = vmkeep("backup", name, "-d", "ds", "--json").json()
        assert point["id"] == full["id"] and point["increment"] == 1, point
        assert point["increments"][1]["size"] < (8 << 20)
        cluster[2].destroy(name)  # QEMU stores its persistent bitmaps in host 2's image
        info = lab_hosts.run(2, "qemu-img", "info", str(disk)).stdout
        assert f"name: {point['increments'][1]['checkpoint']}" in info, info  # the chain's newest
    finally:
        remove_everywhere(cluster, lab, name)
        disk.unlink(missing_ok=True)
        lab_hosts.run(2, "rm", "-f", str(disk))
        shutil.rmtree(store, ignore_errors=True)


def test_exec_driver_migrates_with_virsh_and_the_checkpoint_follows(
    vmkeep,
    lab: Lab,
    cluster: dict[int, Hypervisor],
    guest: str,
    qemu_reachable_data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Host 1 drives its VMs through the exec driver's shipped scripts (``drivers/exec/virsh``;
    ``-l migrate``: run here, where virsh's default connection is host 1's libvirtd)."""
    drivers = Path(__file__).resolve().parents[2] / "drivers" / "exec" / "virsh"
    ctx = Context(load_config())
    with ctx.catalog.session() as s:
        row = records.find_host(s, "host1")
        row.vmm, row.vmm_dir, row.vmm_args = "exec", str(drivers), "-l migrate"
    store = qemu_reachable_data_dir.with_name(qemu_reachable_data_dir.name + "-ds")
    vmkeep("datastore", "add", "ds", "--driver", "dir", "--path", str(store))
    try:
        vmkeep("vm", "import", guest)
        vmkeep("vm", "config", guest, "--mode", "increment")
        full = vmkeep("backup", guest, "-d", "ds", "--json").json()
        lab.sh(guest, COUNTER)
        res = vmkeep("vm", "migrate", guest, "host2", "--live", "--json").json()
        cp = full["increments"][0]["checkpoint"]
        assert res["migration"]["checkpoints"] == [cp] and res["migration"]["chain_break"] == ""
        assert where(cluster, guest) == {2} and cluster[2].checkpoints(guest) == [cp]
        counting(cluster[2], guest)
        history = vmkeep("vm", "history", guest, "--json").json()
        assert history[-1]["action"] == "migrate" and history[-1]["result"] == "DONE"
        act_for(monkeypatch, 2)
        point = vmkeep("backup", guest, "-d", "ds", "--json").json()
        assert point["id"] == full["id"] and point["increment"] == 1, point
    finally:
        shutil.rmtree(store, ignore_errors=True)
