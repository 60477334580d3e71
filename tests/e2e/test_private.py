"""Issue 23, items 4 and 5 on a real lab VM: what vmkeep writes is its user's alone (0700 / 0600),
QEMU still reaches what it needs through its group (0710 folders) and libvirt's dynamic ownership
(a restored VM boots and its agent answers), and ``vmkeep mount`` keeps the guest's setuid files,
device nodes and programs inert, only mounts the file-system types an admin allows and refuses a
mount point other users could reach."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkeep.hypervisor.reach import QemuIds, qemu_ids
from vmkeep.lab import Lab

from .conftest import PREFIX

VM = f"{PREFIX}private"
SECRET = "guest secret\n"


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture(scope="module")
def qemu() -> QemuIds:
    ids = qemu_ids()
    assert ids is not None and ids.uid != 0
    return ids


@pytest.fixture(scope="module")
def vm(lab: Lab) -> Iterator[str]:
    lab.create(VM, [64 << 20])
    # a setuid-root program and a world-writable device node in the guest's file system
    lab.sh(
        VM,
        f"printf '{SECRET}' > /mnt/vda/secret && chmod 644 /mnt/vda/secret && "
        "cp /bin/busybox /mnt/vda/suid && chmod 4755 /mnt/vda/suid && "
        "mknod /mnt/vda/null c 1 3 && chmod 666 /mnt/vda/null && sync",
    )
    yield VM
    lab.remove(VM)


@pytest.fixture
def private(qemu_reachable_data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A data dir vmkeep itself makes (the fixture's own is made by pytest, umask 022), and the
    folder for a dir datastore next to it."""
    data = qemu_reachable_data_dir / "vk"
    monkeypatch.setenv("VMKEEP_DATA_DIR", str(data))
    ds = qemu_reachable_data_dir.with_name(qemu_reachable_data_dir.name + "-ds")
    yield data
    shutil.rmtree(ds, ignore_errors=True)


def assert_private(top: Path, qemu: QemuIds) -> None:
    """No world bit anywhere under ``top``; group bits only QEMU's search bit on a folder of
    QEMU's group; files 0600 (owned by vmkeep's user, or by QEMU's while libvirt lends them)."""
    for folder, _dirs, files in os.walk(top):
        d = Path(folder)
        st = d.stat()
        assert mode(d) == 0o700 or (mode(d), st.st_gid) == (0o710, qemu.gid), (d, oct(mode(d)))
        for name in files:
            f = d / name
            if f.is_symlink():
                continue
            st = f.stat()
            assert mode(f) == 0o600, (f, oct(mode(f)))
            assert st.st_uid in (0, qemu.uid), f


def test_backup_restores_and_download_are_private_and_qemu_still_boots_the_restore(
    vmkeep, lab: Lab, vm: str, private: Path, qemu: QemuIds, tmp_path: Path
) -> None:
    data = private
    ds = data.parent.with_name(data.parent.name + "-ds")
    vmkeep("vm", "import", vm)
    vmkeep("datastore", "add", "ds", "--driver", "dir", "--path", str(ds))
    b = vmkeep("backup", vm, "-d", "ds", "--json").json()
    bid = b["id"]
    # staged in the datastore (QEMU wrote the targets there through its group), stored private
    chain = ds / vm / str(bid)
    assert not (data / "staging").exists()
    assert mode(data / "catalog.db") == 0o600 and data.stat().st_uid == 0
    assert mode(data) in (0o700, 0o710)
    assert mode(chain) == 0o700 and mode(chain.parent) == 0o700
    images = sorted(chain.glob("*.qcow2"))
    assert images and all(mode(f) == 0o600 and f.stat().st_uid == 0 for f in images)
    assert_private(data, qemu)
    assert_private(ds, qemu)

    # one disk: 0600 in a private folder
    one = vmkeep("restore", str(bid), "--disk", "vda", "--json").json()
    assert mode(Path(one["path"])) == 0o600
    assert_private(data, qemu)
    # attached to a running VM from <data dir>/restores: QEMU reaches it (its group, libvirt's
    # dynamic ownership) and the guest reads the restored file system
    added = vmkeep("vm", "disk", "attach", vm, "--source", one["path"], "--json").json()
    try:
        deadline = time.monotonic() + 30
        while "vdb" not in lab.sh(vm, "ls /sys/block"):
            assert time.monotonic() < deadline, "the guest did not see the attached disk"
            time.sleep(0.5)
        got = lab.sh(vm, "mkdir -p /r && mount -o ro /dev/vdb /r && cat /r/secret; umount /r")
        assert got == SECRET
        assert mode(Path(one["path"])) == 0o600 and mode(Path(one["path"]).parent) == 0o710
    finally:
        vmkeep("vm", "disk", "detach", vm, "--target", added["target"])
        # libvirt may return before the guest gave the disk back: the module's VM goes to the
        # next test with its one disk, whatever the order
        deadline = time.monotonic() + 30
        while added["target"] in {d.target for d in lab.hv.domain(vm).disks}:
            assert time.monotonic() < deadline, f"{added['target']} was not unplugged"
            time.sleep(0.5)
    assert_private(data, qemu)

    # a whole new VM: its folder is open to QEMU's group alone, and QEMU boots it
    name = f"{vm}-r"
    r = vmkeep("restore", str(bid), "--name", name, "--start", "--no-ip", "--json").json()
    try:
        folder = Path(r["path"])
        assert (mode(folder), folder.stat().st_gid) == (0o710, qemu.gid)
        assert (mode(data), data.stat().st_gid) == (0o710, qemu.gid)
        assert all(mode(Path(p)) == 0o600 for p in r["disks"].values())
        deadline = time.monotonic() + 120
        while not lab.hv.guest_ping(name, 2):
            assert time.monotonic() < deadline, "the restored VM did not come up"
            time.sleep(0.5)
        assert lab.sh(name, "cat /mnt/vda/secret") == SECRET
        # while it runs libvirt lends the disks to QEMU's user; they stay 0600
        assert all(Path(p).stat().st_uid == qemu.uid for p in r["disks"].values())
        assert_private(data, qemu)
    finally:
        lab.hv.destroy(name)
        lab.hv.undefine(name)

    # a download of a stored file: 0600
    shown = vmkeep("backups", "show", str(bid), "--json").json()
    url = next(f["url"] for f in shown["increments"][0]["files"] if f["name"].endswith(".qcow2"))
    got = vmkeep("datastore", "download", url, str(tmp_path / "dl"), "--json").json()
    assert mode(Path(got["path"])) == 0o600

    # files get: the guest's 0644 file arrives 0600, its folder 0700
    out = tmp_path / "got"
    vmkeep("files", "get", str(bid), "/secret", "--to", str(out))
    assert (out / "secret").read_text() == SECRET and mode(out / "secret") == 0o600
    assert mode(out) == 0o700


def test_mount_is_nosuid_nodev_noexec_typed_and_private(
    vmkeep, vm: str, private: Path, tmp_path: Path, clean_env: Path
) -> None:
    ds = private.parent.with_name(private.parent.name + "-ds")
    vmkeep("vm", "import", vm)
    vmkeep("datastore", "add", "ds", "--driver", "dir", "--path", str(ds))
    bid = vmkeep("backup", vm, "-d", "ds", "--json").json()["id"]
    # a mount point other users could reach is refused: the guest's root folder mode (0755)
    # shows at a mount point, whatever the mount point's own
    open_mp = private.parent / "mp"
    refused = vmkeep("mount", str(bid), str(open_mp), check=None)
    if refused.code == 0:  # mounted after all: unmount before failing, leave no loop device
        vmkeep("umount", str(open_mp), check=None)
    assert refused.code == 9, refused
    assert "other users can reach it" in refused.err and not open_mp.exists()
    mp = tmp_path / "mnt" / "mp"
    vmkeep("mount", str(bid), str(mp))
    try:
        line = next(ln for ln in Path("/proc/mounts").read_text().splitlines() if f" {mp} " in ln)
        fstype, opts = line.split()[2], set(line.split()[3].split(","))
        assert fstype == "ext4"
        assert {"ro", "nosuid", "nodev", "noexec"} <= opts, line
        assert mode(mp.parent) == 0o700
        suid = mp / "suid"
        assert suid.stat().st_mode & stat.S_ISUID  # the guest's setuid-root program is there...
        with pytest.raises(PermissionError):  # ...but nothing of the guest's runs (noexec)
            subprocess.run([str(suid), "true"], check=False)
        node = mp / "null"
        assert stat.S_ISCHR(node.lstat().st_mode) and mode(node) == 0o666
        with pytest.raises(PermissionError):  # nodev: the guest's device node opens nothing
            node.open("rb")
        assert (
            hashlib.sha256((mp / "secret").read_bytes()).hexdigest()
            == hashlib.sha256(SECRET.encode()).hexdigest()
        )
    finally:
        vmkeep("umount", str(mp))
    # only the types an admin allows: ext4 is not in this list
    config = Path(os.environ["VMKEEP_CONFIG"])
    config.write_text('version = 1\n[mount]\nfs_types = ["xfs"]\n')
    refused = vmkeep("mount", str(bid), str(mp), check=23)
    assert "[mount] fs_types" in refused.err and "ext4" in refused.err
    assert f" {mp} " not in Path("/proc/mounts").read_text()
    ls = vmkeep("files", "ls", str(bid), "/", check=23)
    assert "[mount] fs_types" in ls.err
