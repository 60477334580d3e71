"""A tour of the API routes no other real-guest test calls, through a real ``vmkeep daemon`` with
an admin token, on ONE small lab guest shared by the module (each test imports it into its own
catalog and brings it to the state it needs). Each answer is checked against what a user would
look at: the CLI's view of the same catalog, the guest's own state (files, block devices, its
domain XML, the disk image's snapshots), the webhook's deliveries."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from vmkeep.config import IMPORTED_VMS_ACTIONS
from vmkeep.errors import DomainNotFound
from vmkeep.hypervisor import Hypervisor
from vmkeep.lab import Lab
from vmkeep.lab.lab import LabError, read_file_from_image

from .conftest import PREFIX, Webhook, running_daemon

FINAL = {"DONE", "FAILED", "CANCELLED"}
# the imported guest may also take the powered-off actions this module drives
ACTIONS = [*IMPORTED_VMS_ACTIONS, "snapshot-revert", "disk-snapshot-create", "disk-snapshot-revert",
           "disk-snapshot-delete", "resize", "disk-resize"]  # fmt: skip


def _wait(what: str, cond: Any, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)
    return got


def domstate(vm: str) -> str:
    out = subprocess.run(["virsh", "domstate", vm], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "undefined"


def bring_up(lab: Lab, vm: str) -> None:
    """The shared guest running with its agent answering, whatever a test before left."""
    state = domstate(vm)
    if state == "paused":
        subprocess.run(["virsh", "resume", vm], check=True, capture_output=True)
    elif state != "running":
        lab.start(vm)
    _wait("the guest agent", lambda: lab.hv.guest_ping(vm, 2))


def write_config(**sections: str) -> None:
    text = f"version = 1\n[vmm]\nimported_vms_actions = {json.dumps(ACTIONS)}\n"
    for name, body in sections.items():
        text += f"[{name}]\n{body}"
    Path(os.environ["VMKEEP_CONFIG"]).write_text(text)


@pytest.fixture(scope="module")
def guest(lab: Lab) -> str:
    """The module's one lab guest (a 64 MiB data disk)."""
    return lab.create(f"{PREFIX}apitour", [64 << 20])


@pytest.fixture
def vm(vmkeep, lab: Lab, hv: Hypervisor, guest: str) -> str:
    """The guest running, without checkpoints, imported into this test's catalog."""
    bring_up(lab, guest)
    for cp in hv.checkpoints(guest):
        hv.delete_checkpoint(guest, cp)
    write_config()
    vmkeep("vm", "import", guest)
    return guest


@pytest.fixture
def ds(vmkeep, qemu_reachable_data_dir: Path) -> str:
    vmkeep(
        "datastore", "add", "ds", "--driver", "dir", "--path", str(qemu_reachable_data_dir / "ds")
    )
    return "ds"


@pytest.fixture
def auth(vmkeep) -> dict[str, str]:
    token = vmkeep("token", "create", "tour", "--role", "admin", "--json").json()["token"]
    return {"Authorization": f"Bearer {token}"}


def followed(c: httpx.Client, auth: dict[str, str], job_id: int) -> dict[str, Any]:
    """Job ``job_id`` at its end (GET /v1/jobs/ID?wait=S until then)."""
    deadline = time.monotonic() + 900
    while True:
        job = c.get(f"/v1/jobs/{job_id}", params={"wait": 30}, headers=auth).json()
        if job["state"] in FINAL:
            return job
        assert time.monotonic() < deadline, job


def finished(c: httpx.Client, auth: dict[str, str], queued: httpx.Response) -> dict[str, Any]:
    """The job a 202 answer queued, followed to its end."""
    assert queued.status_code == 202, queued.text
    return followed(c, auth, queued.json()["job"]["id"])


def done(c: httpx.Client, auth: dict[str, str], queued: httpx.Response) -> dict[str, Any]:
    job = finished(c, auth, queued)
    assert job["state"] == "DONE", job
    return job


def lcm(vmkeep, vm: str) -> str:  # type: ignore[no-untyped-def]
    return vmkeep("vm", "show", vm, "--json").json()["lcm_state"]


def test_reads_and_quick_writes_match_the_cli(
    vmkeep, vm: str, ds: str, auth: dict[str, str], qemu_reachable_data_dir: Path
) -> None:
    """GET /v1/vms, GET|POST /v1/datastores, GET|POST|PATCH|DELETE /v1/pools[/{pool}],
    PATCH /v1/vms/{vm}/config, GET|POST|DELETE /v1/hosts[/{host}], POST
    /v1/hosts/{host}/disable|enable, GET /v1/groups, GET /v1/overview, GET /v1/audit,
    GET /metrics: each answer is what the CLI shows of the same catalog."""
    vmkeep("group", "create", "app", vm)
    with running_daemon() as (_proc, c):
        vms = c.get("/v1/vms", headers=auth).json()
        assert [(v["name"], v["lcm_state"]) for v in vms] == [(vm, "RUNNING")], vms
        assert [v["name"] for v in vms] == [
            v["name"] for v in vmkeep("vm", "list", "--json").json()
        ]

        path = str(qemu_reachable_data_dir / "ds2")
        made = c.post("/v1/datastores", json={"name": "ds2", "driver": "dir",
                                              "options": {"path": path}}, headers=auth)  # fmt: skip
        assert made.status_code == 201, made.text
        listed = c.get("/v1/datastores", headers=auth).json()
        cli = vmkeep("datastore", "list", "--json").json()
        assert [d["name"] for d in listed] == [d["name"] for d in cli] == [ds, "ds2"]
        assert all(d["free_bytes"] > 0 for d in listed), listed
        assert Path(path).is_dir()

        # pools: the VM inherits the pool's keys; a used pool is not deleted
        made = c.post("/v1/pools", json={"name": "web", "config": {"keep_last": 3}}, headers=auth)
        assert made.status_code == 201, made.text
        changed = c.patch("/v1/pools/web", json={"config": {"keep_last": 5, "mode": "full"}},
                          headers=auth)  # fmt: skip
        assert changed.status_code == 200, changed.text
        assert [p["name"] for p in c.get("/v1/pools", headers=auth).json()] == ["web"]
        shown = c.get("/v1/pools/web", headers=auth).json()
        assert shown["backup_config"] == {"keep_last": 5, "mode": "FULL"}, shown
        assert shown == vmkeep("pool", "show", "web", "--json").json() | {"vms": shown["vms"]}
        put = c.patch(f"/v1/vms/{vm}/config", json={"pool": "web", "fs_freeze": "agent"},
                      headers=auth)  # fmt: skip
        assert put.status_code == 200, put.text
        mine = vmkeep("vm", "show", vm, "--json").json()
        assert (mine["pool"], mine["backup_config"]["keep_last"]) == ("web", 5), mine
        assert mine["backup_config_sources"]["fs_freeze"] == "vm"
        refused = c.delete("/v1/pools/web", headers=auth)
        assert refused.status_code == 409 and vm in refused.text, refused.text
        c.patch(f"/v1/vms/{vm}/config", json={"pool": None}, headers=auth).raise_for_status()
        assert c.delete("/v1/pools/web", headers=auth).status_code == 200
        assert vmkeep("pool", "list", "--json").json() == []

        # hosts: each state change is what `host show` says
        added = c.post("/v1/hosts", json={"name": "spare", "uri": "qemu+tcp://10.99.0.9/system"},
                       headers=auth)  # fmt: skip
        assert added.status_code == 201 and added.json()["state"] == "INIT", added.text
        assert "spare" in [h["name"] for h in c.get("/v1/hosts", headers=auth).json()]
        off = c.post("/v1/hosts/spare/disable", json={"offline": True}, headers=auth)
        assert off.status_code == 200, off.text
        assert vmkeep("host", "show", "spare", "--json").json()["state"] == "OFFLINE"
        assert c.get("/v1/hosts/spare", headers=auth).json()["state"] == "OFFLINE"
        c.post("/v1/hosts/spare/enable", headers=auth).raise_for_status()
        assert vmkeep("host", "show", "spare", "--json").json()["state"] == "INIT"
        assert c.delete("/v1/hosts/spare", headers=auth).status_code == 200
        assert c.get("/v1/hosts/spare", headers=auth).status_code == 404
        assert "spare" not in vmkeep("host", "list").out

        groups = c.get("/v1/groups", headers=auth).json()
        assert [g["name"] for g in groups] == ["app"] and vm in json.dumps(groups), groups
        overview = c.get("/v1/overview", headers=auth).json()
        assert overview["vms"]["total"] == 1, overview
        assert sorted(d["name"] for d in overview["datastores"]) == [ds, "ds2"], overview

        audit = c.get("/v1/audit", headers=auth).json()
        writes = [(a["actor"], a["method"], a["path"]) for a in audit if a["method"] != "GET"]
        assert ("tour", "POST", "/v1/datastores") in writes, writes
        assert ("tour", "DELETE", "/v1/hosts/spare") in writes, writes

        metrics = c.get("/metrics", headers=auth)
        assert metrics.status_code == 200, metrics.text
        assert 'vmkeep_datastore_free_bytes{datastore="ds2"}' in metrics.text, metrics.text
        assert c.get("/v1/overview").status_code == 401  # no token, no read


def test_backup_jobs_points_events_and_notifications(
    vmkeep, lab: Lab, vm: str, ds: str, auth: dict[str, str], webhook: Webhook
) -> None:
    """POST|GET|PATCH|DELETE /v1/backupjobs[/{name}], POST /v1/backupjobs/{name}/run, GET
    /v1/events (the run's job as it goes), GET /v1/backups[/{backup}], POST|DELETE
    /v1/backups/{backup}/protect, PUT /v1/backups/{backup}/note, POST /v1/vms/{vm}/prune,
    GET /v1/notifications (each finished job delivered to the webhook)."""
    write_config(notify=f'webhook_url = "{webhook.url}"\n')
    vmkeep("vm", "config", vm, "--mode", "full")
    lab.write_random(vm, "/mnt/vda/api", 1)
    with running_daemon() as (_proc, c):
        body = {"name": "nightly", "vms": [vm], "datastore": ds, "schedule": "0 2 * * *"}
        made = c.post("/v1/backupjobs", json=body, headers=auth)
        assert made.status_code == 201, made.text
        edited = c.patch("/v1/backupjobs/nightly", json={"priority": 10}, headers=auth)
        assert edited.status_code == 200, edited.text
        assert [j["name"] for j in c.get("/v1/backupjobs", headers=auth).json()] == ["nightly"]
        shown = c.get("/v1/backupjobs/nightly", headers=auth).json()
        cli = vmkeep("backupjob", "show", "nightly", "--json").json()
        assert shown["priority"] == cli["priority"] == 10 and shown["datastore"] == ds, shown

        # the stream's first answer is the current state: the VM as the CLI shows it
        now = c.get("/v1/events", params={"max_seconds": 1}, headers=auth)
        assert f'"name": "{vm}"' in now.text and '"lcm_state": "RUNNING"' in now.text, now.text

        seen: list[tuple[str, dict[str, Any]]] = []

        def follow() -> None:
            with httpx.Client(base_url=str(c.base_url), timeout=300) as s, s.stream(
                "GET", "/v1/events", params={"max_seconds": 300}, headers=auth
            ) as r:  # fmt: skip
                kind = ""
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        kind = line.removeprefix("event: ")
                    elif line.startswith("data: "):
                        row = json.loads(line.removeprefix("data: "))
                        seen.append((kind, row))
                        if kind == "job" and row.get("kind") == "backup" and row["state"] in FINAL:
                            return

        follower = threading.Thread(target=follow)
        follower.start()
        _wait("the event stream", lambda: seen, 30)
        run = c.post("/v1/backupjobs/nightly/run", headers=auth)
        assert run.status_code == 201, run.text
        queued = _wait("the run's job", lambda: [j for j in c.get("/v1/jobs", headers=auth).json()
                                                 if j["kind"] == "backup"])  # fmt: skip
        job = followed(c, auth, queued[0]["id"])
        assert job["state"] == "DONE", job
        follower.join(120)
        states = [r["state"] for k, r in seen if k == "job" and r["id"] == job["id"]]
        assert "RUNNING" in states and states[-1] == "DONE", seen

        first = job["result"]["id"]
        points = c.get("/v1/backups", params={"vm": vm}, headers=auth).json()
        assert [b["id"] for b in points] == [first], points
        one = c.get(f"/v1/backups/{first}", headers=auth).json()
        cli = vmkeep("backups", "show", str(first), "--json").json()
        assert one["id"] == cli["id"] == first and one["status"] == cli["status"] == "VALID"
        assert one == cli and len(one["increments"]) == 1, (one, cli)
        assert all(f["url"] for f in one["increments"][0]["files"]), one

        prot = c.post(f"/v1/backups/{first}/protect", headers=auth)
        assert prot.status_code == 200 and prot.json()["protected"] is True, prot.text
        note = c.put(f"/v1/backups/{first}/note", json={"text": "before the upgrade"},
                     headers=auth)  # fmt: skip
        assert note.status_code == 200, note.text
        point = vmkeep("backups", "show", str(first), "--json").json()["increments"][0]
        assert (point["protected"], point["note"]) == (True, "before the upgrade")
        unprot = c.delete(f"/v1/backups/{first}/protect", headers=auth)
        assert unprot.status_code == 200 and unprot.json()["protected"] is False, unprot.text

        # a second full chain, then prune keeps the newest one only
        second = vmkeep("backup", vm, "-d", ds, "--json").json()["id"]
        pruned = done(c, auth, c.post(f"/v1/vms/{vm}/prune", json={"keep_last": 1},
                                      headers=auth))  # fmt: skip
        assert [b["id"] for b in vmkeep("backups", "list", "--json").json()] == [second], pruned
        assert c.get(f"/v1/backups/{first}", headers=auth).status_code == 404

        _wait("the webhook deliveries", lambda: len(webhook.delivered()) >= 3, 120)
        notes = c.get("/v1/notifications", headers=auth).json()
        sent = {(n["job"], n["target"], n["state"]) for n in notes}
        assert (job["id"], "webhook", "SENT") in sent, notes
        assert job["id"] in [p["job"] for p in webhook.delivered()]
        assert c.delete("/v1/backupjobs/nightly", headers=auth).status_code == 200
        assert c.get("/v1/backupjobs/nightly", headers=auth).status_code == 404
        assert vmkeep("backupjob", "list", "--json").json() == []


def test_actions_on_the_running_guest(vmkeep, lab: Lab, hv: Hypervisor, vm: str,
                                      auth: dict[str, str]) -> None:  # fmt: skip
    """POST /v1/vms/{vm}/actions/suspend|resume, snapshot-create|revert|delete (GET
    /v1/vms/{vm}/snapshots), disk-detach, nic-detach, disk-resize, POST
    /v1/vms/{vm}/reset-state and actions/reboot: the guest's own view after each."""
    lab.sh(vm, "echo alive > /tmp/boot-marker")
    with running_daemon() as (_proc, c):
        done(c, auth, c.post(f"/v1/vms/{vm}/actions/suspend", json={}, headers=auth))
        assert lcm(vmkeep, vm) == "SUSPENDED" and domstate(vm) != "running"
        done(c, auth, c.post(f"/v1/vms/{vm}/actions/resume", json={}, headers=auth))
        _wait("the agent", lambda: hv.guest_ping(vm, 2))
        assert lab.sh(vm, "cat /tmp/boot-marker").strip() == "alive"  # the same boot

        # a system snapshot reverted by its name: a file written after it is gone
        lab.sh(vm, "sync")
        done(c, auth, c.post(f"/v1/vms/{vm}/actions/snapshot-create", json={"name": "api-snap"},
                             headers=auth))  # fmt: skip
        snaps = c.get(f"/v1/vms/{vm}/snapshots", headers=auth).json()
        assert [s["name"] for s in snaps["snapshots"]] == ["api-snap"], snaps
        lab.sh(vm, "echo x > /mnt/vda/after-snap && sync")
        done(c, auth, c.post(f"/v1/vms/{vm}/actions/snapshot-revert",
                             json={"snapshot": "api-snap"}, headers=auth))  # fmt: skip
        _wait("the agent", lambda: hv.guest_ping(vm, 2))
        with pytest.raises(LabError):
            lab.sh(vm, "test -e /mnt/vda/after-snap")
        done(c, auth, c.post(f"/v1/vms/{vm}/actions/snapshot-delete",
                             json={"snapshot": "api-snap"}, headers=auth))  # fmt: skip
        assert c.get(f"/v1/vms/{vm}/snapshots", headers=auth).json()["snapshots"] == []
        virsh = subprocess.run(["virsh", "-q", "snapshot-list", vm, "--name"],
                               capture_output=True, text=True, check=True)  # fmt: skip
        assert virsh.stdout.split() == []

        # hot-unplug of a disk and a NIC the CLI plugged in
        vmkeep("vm", "disk", "attach", vm, "--size", "16M", "--target", "vdb")
        _wait("vdb in the guest", lambda: lab.sh(vm, "test -b /dev/vdb; echo $?").strip() == "0")
        done(c, auth, c.post(f"/v1/vms/{vm}/actions/disk-detach", json={"target": "vdb"},
                             headers=auth))  # fmt: skip
        _wait("vdb gone", lambda: lab.sh(vm, "test -e /dev/vdb; echo $?").strip() == "1", 60)
        mac = "52:54:00:f0:0f:01"
        vmkeep("vm", "nic", "attach", vm, "--mac", mac)
        assert mac in hv.domain_xml(vm)
        done(c, auth, c.post(f"/v1/vms/{vm}/actions/nic-detach", json={"mac": mac},
                             headers=auth))  # fmt: skip
        _wait("the NIC gone", lambda: mac not in hv.domain_xml(vm), 60)

        # an online grow: the guest sees the new size
        before = int(lab.sh(vm, "cat /sys/block/vda/size")) * 512
        grown = before + (16 << 20)
        done(c, auth, c.post(f"/v1/vms/{vm}/actions/disk-resize",
                             json={"disk": "vda", "size": f"{grown >> 20}M"}, headers=auth))  # fmt: skip
        _wait("the bigger vda", lambda: int(lab.sh(vm, "cat /sys/block/vda/size")) * 512 == grown)

        assert hv.fs_freeze(vm, 30) >= 1  # a freeze left behind: reset-state thaws it
        done(c, auth, c.post(f"/v1/vms/{vm}/reset-state", json={}, headers=auth))
        assert hv.fs_freeze_status(vm, 10) == "thawed" and lcm(vmkeep, vm) == "RUNNING"

        lab.serial_log(vm).write_text("")
        done(c, auth, c.post(f"/v1/vms/{vm}/actions/reboot", json={"hard": True}, headers=auth))
        lab.wait_ready(vm)
        with pytest.raises(LabError):
            lab.sh(vm, "test -e /tmp/boot-marker")  # a new boot
    hist = [h["action"] for h in vmkeep("vm", "history", vm, "--json").json()]
    assert hist[-1] == "reboot" and "snapshot-revert" in hist, hist


def test_actions_on_the_powered_off_guest(vmkeep, lab: Lab, hv: Hypervisor, vm: str,
                                          auth: dict[str, str], tmp_path: Path) -> None:  # fmt: skip
    """POST /v1/vms/{vm}/actions/poweroff, disk-snapshot-create|revert|delete (the image's
    bytes back to the snapshot's), resize, resume (a boot: the guest has the memory), stop and
    resume (the memory kept): the disk image and the guest after each."""
    disk = lab.vm_dir(vm) / "disk0.qcow2"

    def internal() -> str:
        return subprocess.run(["qemu-img", "snapshot", "-l", "-U", str(disk)],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip

    kept = lab.write_random(vm, "/mnt/vda/kept", 1)
    lab.sh(vm, "sync")
    memory = int(memory_kib(hv.domain_xml(vm, inactive=True)))
    memory_before = int(lab.sh(vm, "grep MemTotal /proc/meminfo").split()[1])
    with running_daemon() as (_proc, c):
        done(c, auth, c.post(f"/v1/vms/{vm}/actions/poweroff", json={"hard": True}, headers=auth))
        assert lcm(vmkeep, vm) == "POWEROFF" and domstate(vm) == "shut off"
        made = done(c, auth, c.post(f"/v1/vms/{vm}/actions/disk-snapshot-create",
                                    json={"name": "cold", "disk": "vda"}, headers=auth))  # fmt: skip
        assert made["result"]["hypervisor_name"] in internal(), made
        done(c, auth, c.post(f"/v1/vms/{vm}/actions/resize", json={"memory": memory // 1024 + 16},
                             headers=auth))  # fmt: skip
        assert int(memory_kib(hv.domain_xml(vm, inactive=True))) == memory + (16 << 10)

        # a change after the snapshot (512 bytes before the ext4 superblock), then reverted
        snapped = image_sha(disk, tmp_path)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 512", str(disk)],
                       check=True, capture_output=True)  # fmt: skip
        assert image_sha(disk, tmp_path) != snapped
        done(c, auth, c.post(f"/v1/vms/{vm}/actions/disk-snapshot-revert",
                             json={"snapshot": "cold"}, headers=auth))  # fmt: skip
        assert image_sha(disk, tmp_path) == snapped
        done(c, auth, c.post(f"/v1/vms/{vm}/actions/disk-snapshot-delete",
                             json={"snapshot": "cold"}, headers=auth))  # fmt: skip
        assert made["result"]["hypervisor_name"] not in internal()
        lab.serial_log(vm).write_text("")
        done(c, auth, c.post(f"/v1/vms/{vm}/actions/resume", json={}, headers=auth))
        lab.wait_ready(vm)
        assert lab.sha256(vm, "/mnt/vda/kept") == kept
        total = int(lab.sh(vm, "grep MemTotal /proc/meminfo").split()[1])
        assert total > memory_before, (total, memory_before)  # the resize, seen by the guest

        # stop (memory to a file, off the host) and resume: the same boot goes on
        lab.sh(vm, "echo alive > /tmp/boot-marker")
        done(c, auth, c.post(f"/v1/vms/{vm}/actions/stop", json={}, headers=auth))
        assert lcm(vmkeep, vm) == "STOPPED"
        with pytest.raises(DomainNotFound):
            hv.domain(vm)
        done(c, auth, c.post(f"/v1/vms/{vm}/actions/resume", json={}, headers=auth))
        _wait("the agent", lambda: hv.guest_ping(vm, 2))
        assert lab.sh(vm, "cat /tmp/boot-marker").strip() == "alive"


def image_sha(image: Path, tmp_path: Path) -> str:
    """The sha256 of a qcow2 image's guest-visible bytes (the active layer)."""
    raw = tmp_path / "image.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    raw.unlink()
    return digest


def memory_kib(xml: str) -> str:
    """The <memory> of a domain XML, in KiB."""
    import xml.etree.ElementTree as ET

    node = ET.fromstring(xml).find("memory")
    assert node is not None and node.get("unit", "KiB") == "KiB", xml
    return node.text or ""


def test_a_created_vm_hold_recover_undeploy_terminate(
    vmkeep, lab: Lab, hv: Hypervisor, auth: dict[str, str], tmp_path: Path
) -> None:
    """POST /v1/vms/{vm}/actions/hold, recover (a failed deploy back to PENDING), undeploy (the
    domain gone, the disk kept), terminate (the disk gone) on a VM the API created."""
    write_config()
    name = f"{PREFIX}apitour-new"
    lab.create(name, [32 << 20], start=False)
    xml = hv.domain_xml(name, inactive=True)
    hv.undefine(name)
    disk = lab.vm_dir(name) / "disk0.qcow2"
    try:
        with running_daemon() as (_proc, c):
            made = c.post("/v1/vms", json={"xml": xml}, headers=auth)
            assert made.status_code == 201 and made.json()["state"] == "PENDING", made.text
            done(c, auth, c.post(f"/v1/vms/{name}/actions/hold", json={}, headers=auth))
            assert lcm(vmkeep, name) == "HOLD"
            done(c, auth, c.post(f"/v1/vms/{name}/actions/release", json={}, headers=auth))

            disk.rename(tmp_path / "away.qcow2")  # the deploy fails: BOOT_FAILURE
            failed = finished(c, auth, c.post(f"/v1/vms/{name}/actions/deploy", json={},
                                              headers=auth))  # fmt: skip
            assert failed["state"] == "FAILED" and lcm(vmkeep, name) == "BOOT_FAILURE", failed
            done(c, auth, c.post(f"/v1/vms/{name}/actions/recover", json={"how": "failure"},
                                 headers=auth))  # fmt: skip
            assert lcm(vmkeep, name) == "PENDING"
            (tmp_path / "away.qcow2").rename(disk)

            done(c, auth, c.post(f"/v1/vms/{name}/actions/deploy", json={}, headers=auth))
            assert hv.domain(name).state == "ACTIVE"
            done(c, auth, c.post(f"/v1/vms/{name}/actions/undeploy", json={"hard": True},
                                 headers=auth))  # fmt: skip
            assert lcm(vmkeep, name) == "UNDEPLOYED" and disk.is_file()
            with pytest.raises(DomainNotFound):
                hv.domain(name)
            done(c, auth, c.post(f"/v1/vms/{name}/actions/terminate", json={}, headers=auth))
            assert lcm(vmkeep, name) == "DONE" and not disk.exists()
    finally:
        lab.remove(name)


def test_group_routes(vmkeep, lab: Lab, hv: Hypervisor, vm: str, ds: str, auth: dict[str, str],
                      tmp_path: Path) -> None:  # fmt: skip
    """POST /v1/groups/{group}/stop|backup|start|recover, POST
    /v1/group-backups/{group_backup}/restore|drill on a one-member group: the guest off and
    back, the restored member's disk holds the file, the drill passes, recover is refused (409)
    naming why: a catalog without hosts has nowhere to redeploy."""
    digest = lab.write_random(vm, "/mnt/vda/group", 1)
    lab.sh(vm, "sync")
    vmkeep("group", "create", "app", vm)
    copy = f"{vm}-copy"
    try:
        with running_daemon() as (_proc, c):
            done(c, auth, c.post("/v1/groups/app/stop", json={"force": True, "timeout": 0},
                                 headers=auth))  # fmt: skip
            assert lcm(vmkeep, vm) == "POWEROFF" and domstate(vm) == "shut off"
            gb = done(c, auth, c.post("/v1/groups/app/backup", json={"datastore": ds},
                                      headers=auth))["result"]  # fmt: skip
            assert gb["status"] == "VALID", gb
            gid = gb["id"]
            restored = done(c, auth, c.post(f"/v1/group-backups/{gid}/restore",
                                            json={"suffix": "-copy"}, headers=auth))["result"]  # fmt: skip
            member = restored["members"][0]
            assert member["vm"] == copy, restored
            image = Path(member["disks"]["vda"])
            data = read_file_from_image(image, "/group", tmp_path)
            assert hashlib.sha256(data).hexdigest() == digest
            assert copy in [v["name"] for v in vmkeep("vm", "list", "--json").json()]
            drill = done(c, auth, c.post(f"/v1/group-backups/{gid}/drill", json={},
                                         headers=auth))["result"]  # fmt: skip
            assert drill["result"] == "PASS", drill

            lab.serial_log(vm).write_text("")
            done(c, auth, c.post("/v1/groups/app/start", json={}, headers=auth))
            lab.wait_ready(vm)
            assert lcm(vmkeep, vm) == "RUNNING"
            assert lab.sha256(vm, "/mnt/vda/group") == digest
            again = c.post("/v1/groups/app/recover", json={}, headers=auth)
            assert again.status_code == 409, again.text  # refused before any job
            assert "no hosts" in again.text and "host add" in again.text, again.text
            assert lcm(vmkeep, vm) == "RUNNING"
    finally:
        lab.remove(copy)
    assert not [d.name for d in hv.list_domains() if "-drill-" in d.name and vm in d.name]
