"""Backups off the host, on a real lab VM: restic over SFTP and rsync over SSH to a real sshd on
loopback, full + incremental restored bit-identical; copy dir -> restic; restic dedup; delete; a
lost catalog rebuilt from the datastore. One VM for the module; each test has its own catalog."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkeep.checksums import digest_file
from vmkeep.hypervisor import Hypervisor
from vmkeep.lab import Lab
from vmkeep.lab.lab import read_file_from_image
from vmkeep.lab.sshd import Sshd

from .conftest import PREFIX

VM = f"{PREFIX}offhost"
PASSWORD = "e2e-restic-" + os.urandom(8).hex()


@pytest.fixture(scope="module")
def vm(lab: Lab) -> Iterator[str]:
    lab.create(VM, [256 << 20])
    yield VM
    lab.remove(VM)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    with Sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture
def fresh(vm: str, hv: Hypervisor, vmkeep) -> str:
    """The module's VM in this test's new catalog: no checkpoint of an earlier catalog left."""
    for cp in hv.checkpoints(vm):
        hv.delete_checkpoint(vm, cp)
    vmkeep("vm", "import", vm)
    vmkeep("vm", "config", vm, "--mode", "increment")
    return vm


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    p = tmp_path / "restic-pass"
    p.write_text(PASSWORD)
    p.chmod(0o600)
    return p


def restic_sftp_opts(s: Sshd, remote: Path, password_file: Path) -> list[str]:
    return [
        "--driver",
        "restic",
        "--opt",
        f"repo=sftp:root@{s.host}:{remote}",
        "--opt",
        f"password_file={password_file}",
        "--opt",
        "init=yes",
        "--opt",
        f"port={s.port}",
        "--opt",
        f"identity={s.client_key}",
    ]


def rsync_opts(s: Sshd, remote: Path) -> list[str]:
    return [
        "--driver",
        "rsync",
        "--opt",
        f"host={s.host}",
        "--opt",
        f"port={s.port}",
        "--opt",
        f"path={remote}",
        "--opt",
        f"identity={s.client_key}",
    ]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def restored(vmkeep, tmp_path: Path, backup: int, inc: int, guest_path: str) -> str:
    out = tmp_path / f"r-{backup}-{inc}-{os.urandom(3).hex()}.qcow2"
    vmkeep("restore", str(backup), "--increment", str(inc), "--disk", "vda", "--path", str(out))
    try:
        return sha(read_file_from_image(out, guest_path.removeprefix("/mnt/vda"), tmp_path))
    finally:
        out.unlink()


def full_and_increment(vmkeep, lab: Lab, vm: str, ds: str) -> tuple[int, list[str]]:
    """A full and an incremental backup to ``ds``; the sha256 of /mnt/vda/f at each point."""
    sums = [lab.write_random(vm, "/mnt/vda/f", 4)]
    first = vmkeep("backup", vm, "-d", ds, "--reset", "--json").json()
    assert first["increment"] == 0 and first["status"] == "VALID"
    sums.append(lab.write_random(vm, "/mnt/vda/f", 2, seek_mib=1))
    second = vmkeep("backup", vm, "-d", ds, "--json").json()
    assert second["id"] == first["id"] and second["increment"] == 1
    return int(first["id"]), sums


def test_restic_over_sftp_full_and_incremental_restore_bit_identical(
    vmkeep, lab: Lab, fresh: str, sshd: Sshd, tmp_path: Path, password_file: Path
) -> None:
    add = vmkeep(
        "datastore", "add", "rs", *restic_sftp_opts(sshd, tmp_path / "repo", password_file)
    )
    assert "host key learned" in add.out and "ED25519" in add.out, add.out
    backup_id, sums = full_and_increment(vmkeep, lab, fresh, "rs")
    for inc, want in enumerate(sums):
        assert restored(vmkeep, tmp_path, backup_id, inc, "/mnt/vda/f") == want
    shown = vmkeep("backups", "show", str(backup_id), "--json").json()
    assert all(i["restored_size"] == 256 << 20 for i in shown["increments"])
    url = shown["increments"][1]["files"][0]["url"]
    assert url == f"restic://rs/{shown['chain']}/1.vda.qcow2"
    got = vmkeep("datastore", "download", url, str(tmp_path / "dl"), "--json").json()
    assert digest_file(Path(got["path"])) == shown["increments"][1]["files"][0]["digest"]
    verify = vmkeep("backups", "verify", str(backup_id), "--json").json()
    assert verify["ok"] and "restic check" in verify["store_check"]
    # the password is in no output, job row or catalog
    for args in (("jobs", "list", "--json"), ("datastore", "list", "--json")):
        assert PASSWORD not in vmkeep(*args).out
    catalog = Path(os.environ["VMKEEP_DATA_DIR"]) / "catalog.db"
    assert PASSWORD.encode() not in catalog.read_bytes()


def test_rsync_over_ssh_backup_restore_and_disaster_recovery(
    vmkeep, lab: Lab, fresh: str, sshd: Sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = tmp_path / "remote"
    vmkeep("datastore", "add", "rr", *rsync_opts(sshd, remote))
    backup_id, sums = full_and_increment(vmkeep, lab, fresh, "rr")
    chain = vmkeep("backups", "show", str(backup_id), "--json").json()["chain"]
    files = sorted(p.name for p in (remote / chain).iterdir())
    assert files == sorted(
        ["0.vda.qcow2", "0.domain.xml", "1.vda.qcow2", "1.domain.xml", "manifest.json"]
    )
    for inc, want in enumerate(sums):
        assert restored(vmkeep, tmp_path, backup_id, inc, "/mnt/vda/f") == want
    # the catalog is lost: a new host adds the datastore and imports every chain from it
    old_data = Path(os.environ["VMKEEP_DATA_DIR"])
    (old_data / "catalog.db").unlink()
    new_data = old_data.with_name(old_data.name + "-b")
    monkeypatch.setenv("VMKEEP_DATA_DIR", str(new_data))
    try:
        vmkeep("datastore", "add", "rr", *rsync_opts(sshd, remote))
        seen = vmkeep("datastore", "scan", "rr", "--json").json()
        assert [(r["chain"], r["known"]) for r in seen] == [(chain, False)]
        imported = vmkeep("datastore", "scan", "rr", "--import", "--json").json()
        new_id = imported[0]["imported"]
        assert imported[0]["increments"] == [0, 1] and new_id
        for inc, want in enumerate(sums):
            assert restored(vmkeep, tmp_path, new_id, inc, "/mnt/vda/f") == want
        again = vmkeep("datastore", "scan", "rr", "--import", "--json").json()
        assert again[0]["known"] and again[0]["imported"] is None  # idempotent
    finally:
        subprocess.run(["rm", "-rf", str(new_data)], check=False)


def test_copy_dir_to_restic_then_only_new_increments_and_delete(
    vmkeep, lab: Lab, fresh: str, tmp_path: Path, password_file: Path
) -> None:
    vmkeep("datastore", "add", "d", "--driver", "dir", "--path", str(tmp_path / "d"))
    repo = tmp_path / "repo"
    vmkeep(
        "datastore", "add", "r", "--driver", "restic", "--opt", f"repo={repo}",
        "--opt", f"password_file={password_file}", "--opt", "init=yes",
    )  # fmt: skip
    backup_id, sums = full_and_increment(vmkeep, lab, fresh, "d")
    first = vmkeep("backups", "copy", str(backup_id), "--to", "r", "--json").json()
    assert first["copied_increments"] == [0, 1] and first["verified"]
    sums.append(lab.write_random(fresh, "/mnt/vda/f", 1, seek_mib=3))
    assert vmkeep("backup", fresh, "-d", "d", "--json").json()["increment"] == 2
    second = vmkeep("backups", "copy", str(backup_id), "--to", "r", "--json").json()
    assert second["copied_increments"] == [2] and second["copy"] == first["copy"]
    copy_id = second["copy"]
    for inc, want in enumerate(sums):
        assert restored(vmkeep, tmp_path, copy_id, inc, "/mnt/vda/f") == want
    # delete: the middle increment is refused, the newest goes, then the whole chain
    mid = vmkeep("backups", "delete", str(copy_id), "--increment", "1", check=25)
    assert "increments 2 are built on it" in mid.err
    vmkeep("backups", "delete", str(copy_id), "--increment", "2")
    assert restored(vmkeep, tmp_path, copy_id, 1, "/mnt/vda/f") == sums[1]
    refused = vmkeep("datastore", "remove", "r", check=25)
    assert "holds 1 backup" in refused.err
    before = du(repo)
    vmkeep("backups", "delete", str(copy_id))
    assert du(repo) < before - (3 << 20), "deleting the chain did not free the repository"
    vmkeep("datastore", "remove", "r")
    ids = [b["id"] for b in vmkeep("backups", "list", "--json").json()]
    assert ids == [backup_id]


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_restic_second_full_of_an_unchanged_vm_adds_under_five_percent(
    vmkeep, lab: Lab, fresh: str, tmp_path: Path, password_file: Path
) -> None:
    repo = tmp_path / "repo"
    vmkeep(
        "datastore", "add", "r", "--driver", "restic", "--opt", f"repo={repo}",
        "--opt", f"password_file={password_file}", "--opt", "init=yes",
    )  # fmt: skip
    lab.write_random(fresh, "/mnt/vda/big", 32)
    empty = du(repo)
    one = vmkeep("backup", fresh, "-d", "r", "--reset", "--json").json()
    after_one = du(repo)
    two = vmkeep("backup", fresh, "-d", "r", "--reset", "--json").json()
    after_two = du(repo)
    assert one["id"] != two["id"]
    data = one["increments"][0]["size"]
    first, second = after_one - empty, after_two - after_one
    assert first > 0.5 * data, (first, data)  # restic stored it (compressed random data: ~all)
    assert second <= 0.05 * data, f"second full added {second} bytes for {data} of data"
    # a clone of the VM (restored from its backup as a new VM) shares the repository's data
    clone = f"{PREFIX}offhost-clone"
    where = Path(os.environ["VMKEEP_DATA_DIR"]) / "clone"  # QEMU must reach it
    vmkeep("restore", str(two["id"]), "--name", clone, "--path", str(where))
    try:
        vmkeep("vm", "import", clone)
        vmkeep("backup", clone, "-d", "r", "--json")  # offline: the clone is powered off
        third = du(repo) - after_two
        assert third <= 0.05 * data, f"the clone's full added {third} bytes for {data} of data"
    finally:
        subprocess.run(["virsh", "-q", "undefine", clone], capture_output=True, check=False)
