"""The operator's places on a real daemon, a real catalog and a real lab VM's backup
(docs/security.md): a restore onto a host file, a foreign file replaced with --force and a
disk-attach of a host file are refused with 403 and change nothing; restores inside the places
run, and vmkeep replaces only what it created. terminate deletes only disks vmkeep created."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from vmkeep.engine.core.trust import created_by_vmkeep
from vmkeep.lab import Lab

from .conftest import PREFIX, running_daemon

VM = f"{PREFIX}trust"


def job_end(c: httpx.Client, headers: dict[str, str], answer: httpx.Response) -> dict[str, Any]:
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["job"]["id"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job: dict[str, Any] = c.get(
            f"/v1/jobs/{job_id}", params={"wait": 5}, headers=headers
        ).json()
        if job["state"] not in ("QUEUED", "RUNNING"):
            return job
    raise AssertionError(f"job {job_id} did not end")


@pytest.fixture
def backed_up(vmkeep, lab: Lab, qemu_reachable_data_dir: Path) -> Any:
    """A powered-off lab VM (64 MiB data disk) with one full backup in a dir datastore."""
    ds = qemu_reachable_data_dir.with_name(qemu_reachable_data_dir.name + "-ds")
    try:
        lab.create(VM, [64 << 20], start=False)
        vmkeep("datastore", "add", "ds", "--driver", "dir", "--path", str(ds))
        vmkeep("vm", "import", VM)
        yield vmkeep("backup", VM, "--datastore", "ds", "--json").json()["id"]
    finally:
        lab.remove(VM)
        shutil.rmtree(ds, ignore_errors=True)


def test_operator_restores_only_inside_the_places(
    vmkeep, backed_up: int, qemu_reachable_data_dir: Path, tmp_path: Path
) -> None:
    bid = backed_up
    token = vmkeep("token", "create", "ops", "--role", "operator", "--json").json()["token"]
    op = {"Authorization": f"Bearer {token}"}
    host_file = tmp_path / "authorized_keys"  # stands for /root/.ssh/authorized_keys
    host_file.write_text("ssh-ed25519 AAAA admin\n")
    host_file.chmod(0o600)
    before = hashlib.sha256(host_file.read_bytes()).hexdigest()
    restores = qemu_reachable_data_dir / "restores"
    with running_daemon() as (_proc, c):
        # the reported hole: a restore of one disk onto any host file, with --force
        r = c.post(f"/v1/backups/{bid}/restore", headers=op,
                   json={"disk": "vda", "path": str(host_file), "force": True})  # fmt: skip
        assert r.status_code == 403, r.text
        assert "[restore] allowed_paths" in r.json()["error"]["message"]
        # a link inside the place that leads to the host file is outside too
        restores.mkdir(parents=True, exist_ok=True)
        (restores / "link.qcow2").symlink_to(host_file)
        r = c.post(f"/v1/backups/{bid}/restore", headers=op,
                   json={"disk": "vda", "path": str(restores / "link.qcow2"), "force": True})  # fmt: skip
        assert r.status_code == 403, r.text
        assert hashlib.sha256(host_file.read_bytes()).hexdigest() == before
        assert host_file.stat().st_mode & 0o777 == 0o600

        # inside the place: runs, and the file is vmkeep's (an operator may replace it)
        dest = restores / "vda.qcow2"
        body = {"disk": "vda", "path": str(dest)}
        assert (
            job_end(c, op, c.post(f"/v1/backups/{bid}/restore", headers=op, json=body))["state"]
            == "DONE"
        )
        assert dest.is_file() and created_by_vmkeep(dest)
        body["force"] = True
        job = job_end(c, op, c.post(f"/v1/backups/{bid}/restore", headers=op, json=body))
        assert job["state"] == "DONE", job

        # a file vmkeep did not write, inside the place: --force is the admin's
        foreign = restores / "foreign.qcow2"
        foreign.write_text("not vmkeep's")
        r = c.post(f"/v1/backups/{bid}/restore", headers=op,
                   json={"disk": "vda", "path": str(foreign), "force": True})  # fmt: skip
        assert r.status_code == 403 and "admin restores with --force" in r.text, r.text
        assert foreign.read_text() == "not vmkeep's"

        # the reported hole: disk-attach of a host file
        r = c.post(f"/v1/vms/{VM}/actions/disk-attach", headers=op,
                   json={"source": str(host_file), "format": "raw"})  # fmt: skip
        assert r.status_code == 403 and "[vmm] image_paths" in r.text, r.text
        r = c.post(f"/v1/vms/{VM}/actions/nic-attach", headers=op, json={"bridge": "virbr9"})
        assert r.status_code == 403 and "[vmm] bridges" in r.text, r.text
    # the admin (the CLI, root) may replace the foreign file
    vmkeep("restore", str(bid), "--disk", "vda", "--path", str(foreign), "--force")
    assert foreign.stat().st_size > len("not vmkeep's")


def test_terminate_keeps_disks_vmkeep_did_not_create(
    vmkeep, lab: Lab, qemu_reachable_data_dir: Path
) -> None:
    name = f"{PREFIX}trust-term"
    lab.create(name, [64 << 20], start=False)
    try:
        xml = lab.hv.domain_xml(name, inactive=True)
        lab.hv.undefine(name)
        lab_disk = lab.vm_dir(name) / "disk0.qcow2"  # the lab (vmkeep) made it
        foreign = qemu_reachable_data_dir / "foreign.qcow2"
        shutil.copy(lab_disk, foreign)  # a copy vmkeep did not make
        xml = xml.replace(
            "</devices>",
            f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file='{foreign}'/><target dev='vdz' bus='virtio'/></disk></devices>",
        )
        (qemu_reachable_data_dir / "dom.xml").write_text(xml)
        vmkeep("vm", "create", "--xml", str(qemu_reachable_data_dir / "dom.xml"))
        out = vmkeep("vm", "terminate", name, "--json", check=1).json()
        assert out["deleted_disks"] == [str(lab_disk)]
        assert out["not_created_by_vmkeep"] == [str(foreign)]
        assert foreign.is_file() and not lab_disk.exists()
    finally:
        lab.remove(name)
