"""File-level restore on a real lab VM, without booting the backup: ls/get/mount on the ext4
data disk and on a GPT disk with an ext4 and an xfs partition; symlinks never lead to the host.
(vfat is supported the same way, but this machine's kernel has no vfat driver to test it with.)"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkeep.hypervisor import Hypervisor
from vmkeep.lab import Lab

from .conftest import LAB_DIR, PREFIX, running_daemon

VM = f"{PREFIX}files"


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def gpt_image(folder: Path) -> tuple[Path, dict[str, bytes]]:
    """A qcow2 with a GPT: partition 1 ext4 holding /one/p1.bin, partition 2 xfs holding p2.txt."""
    raw = folder / "gpt.raw"
    sh("truncate", "-s", "400M", str(raw))
    subprocess.run(
        ["sfdisk", "-q", str(raw)],
        input="label: gpt\nsize=40M, type=linux\nsize=320M, type=linux\n",
        text=True,
        check=True,
    )
    content = {"p1": os.urandom(300_000), "p2": b"xfs partition file\n"}
    mnt = folder / "mnt"
    mnt.mkdir()
    for start, size, mkfs, write in (
        (2048, 40, ["mkfs.ext4", "-q"], lambda: _put(mnt / "one", "p1.bin", content["p1"])),
        (
            2048 + 40 * 2048,
            320,
            ["mkfs.xfs", "-q", "-f"],
            lambda: _put(mnt, "p2.txt", content["p2"]),
        ),
    ):
        loop = sh(
            "losetup",
            "-f",
            "--show",
            "-o",
            str(start * 512),
            "--sizelimit",
            str(size << 20),
            str(raw),
        ).strip()
        try:
            sh(*mkfs, loop)
            sh("mount", loop, str(mnt))
            write()
            sh("umount", str(mnt))
        finally:
            subprocess.run(["losetup", "-d", loop], check=False)
    qcow = folder / "gpt.qcow2"
    sh("qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow))
    raw.unlink()
    return qcow, content


def _put(folder: Path, name: str, data: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


@pytest.fixture(scope="module")
def vm(lab: Lab) -> Iterator[str]:
    lab.create(VM, [256 << 20])
    yield VM
    lab.remove(VM)


@pytest.fixture(scope="module")
def gpt_disk(vm: str) -> Iterator[dict[str, bytes]]:
    folder = LAB_DIR.parent / "e2e-data" / "files-gpt"
    subprocess.run(["rm", "-rf", str(folder)], check=False)
    folder.mkdir(parents=True)
    qcow, content = gpt_image(folder)
    sh("virsh", "attach-disk", vm, str(qcow), "vdb", "--driver", "qemu", "--subdriver", "qcow2",
       "--targetbus", "virtio", "--live", "--config")  # fmt: skip
    yield content
    subprocess.run(["rm", "-rf", str(folder)], check=False)


@pytest.fixture
def backed_up(
    vm: str, gpt_disk: dict[str, bytes], hv: Hypervisor, lab: Lab, vmkeep, tmp_path: Path
):
    for cp in hv.checkpoints(vm):
        hv.delete_checkpoint(vm, cp)
    lab.sh(vm, "mkdir -p /mnt/vda/sub && echo hello > /mnt/vda/sub/hello.txt && "
               "ln -sf /etc/shadow /mnt/vda/evil && ln -sf sub/hello.txt /mnt/vda/good && sync")  # fmt: skip
    want = {"big": lab.write_random(vm, "/mnt/vda/sub/big.bin", 3)}
    vmkeep("vm", "import", vm)
    vmkeep("datastore", "add", "ds", "--driver", "dir", "--path", str(tmp_path / "ds"))
    b = vmkeep("backup", vm, "-d", "ds", "--json").json()
    return b["id"], want


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_ls_and_get_on_the_ext4_disk(vmkeep, backed_up, tmp_path: Path) -> None:
    bid, want = backed_up
    top = vmkeep("files", "ls", str(bid), "/", "--json").json()
    names = {e["path"]: e for e in top["entries"]}
    assert names["/sub"]["type"] == "dir" and names["/evil"]["type"] == "link"
    assert names["/evil"]["target"] == "/etc/shadow"
    sub = vmkeep("files", "ls", str(bid), "/sub", "--json").json()
    assert {e["path"] for e in sub["entries"]} == {"/sub/big.bin", "/sub/hello.txt"}
    out = tmp_path / "got"
    vmkeep("files", "get", str(bid), "/sub/big.bin", "/sub", "/evil", "--to", str(out))
    assert sha(out / "big.bin") == want["big"]
    assert (out / "sub" / "hello.txt").read_text() == "hello\n"
    assert os.readlink(out / "evil") == "/etc/shadow"  # the link itself, never the host's file
    again = vmkeep("files", "get", str(bid), "/sub/big.bin", "--to", str(out), check=7)
    assert "--force" in again.err
    # a symlink never leads out of the backup's file system to the host
    esc = vmkeep("files", "ls", str(bid), "/evil", check=9)
    assert "leads out" in esc.err
    assert vmkeep("files", "ls", str(bid), "/good", "--json").json()["entries"][0]["size"] == 6
    missing = vmkeep("files", "ls", str(bid), "/nope", check=9)
    assert "no such file" in missing.err


def test_mount_is_read_only_and_umount_leaves_nothing(vmkeep, backed_up, tmp_path: Path) -> None:
    bid, want = backed_up
    mp = tmp_path / "mp"
    mp.mkdir()
    vmkeep("mount", str(bid), str(mp))
    try:
        assert sha(mp / "sub" / "big.bin") == want["big"]
        with pytest.raises(OSError):
            (mp / "new.txt").write_text("x")
    finally:
        vmkeep("umount", str(mp))
    assert not any(mp.iterdir())
    assert "disk.raw" not in sh("losetup", "-a")
    assert str(mp) not in Path("/proc/mounts").read_text()
    vmkeep("umount", str(mp), check=9)


def test_gpt_disk_with_two_partitions(vmkeep, backed_up, gpt_disk, tmp_path: Path) -> None:
    bid, _ = backed_up
    listed = vmkeep("files", "ls", str(bid), "--disk", "vdb", "--json").json()
    parts = {p["number"]: p["fstype"] for p in listed["partitions"]}
    assert parts == {1: "ext4", 2: "xfs"}
    ambiguous = vmkeep(
        "files", "get", str(bid), "/x", "--disk", "vdb", "--to", str(tmp_path), check=9
    )
    assert "several partitions" in ambiguous.err and "xfs" in ambiguous.err
    p2 = vmkeep("files", "ls", str(bid), "--disk", "vdb", "--partition", "2", "--json").json()
    assert [e["path"] for e in p2["entries"]] == ["/p2.txt"]
    out = tmp_path / "p"
    vmkeep(
        "files",
        "get",
        str(bid),
        "/one/p1.bin",
        "--disk",
        "vdb",
        "--partition",
        "1",
        "--to",
        str(out),
    )
    assert (out / "p1.bin").read_bytes() == gpt_disk["p1"]
    vmkeep(
        "files", "get", str(bid), "/p2.txt", "--disk", "vdb", "--partition", "2", "--to", str(out)
    )
    assert (out / "p2.txt").read_bytes() == gpt_disk["p2"]


def test_files_through_the_api(vmkeep, backed_up) -> None:
    """A real daemon on loopback: list a folder and download a file of a restore point."""
    bid, want = backed_up
    viewer = vmkeep("token", "create", "v", "--role", "viewer", "--json").json()["token"]
    operator = vmkeep("token", "create", "o", "--role", "operator", "--json").json()["token"]
    with running_daemon() as (_proc, c):
        op = {"Authorization": f"Bearer {operator}"}
        listed = c.get(f"/v1/backups/{bid}/files", params={"path": "/sub"}, headers=op)
        assert listed.status_code == 200, listed.text
        assert {e["path"] for e in listed.json()["entries"]} == {
            "/sub/big.bin",
            "/sub/hello.txt",
        }
        got = c.get(f"/v1/backups/{bid}/files/content", params={"path": "/sub/big.bin"}, headers=op)
        assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == want["big"]
        bad = c.get(f"/v1/backups/{bid}/files/content", params={"path": "/evil"}, headers=op)
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "InvalidValue"
        seen = c.get(
            f"/v1/backups/{bid}/files",
            headers={"Authorization": f"Bearer {viewer}"},
        )
        assert seen.status_code == 403  # a guest's files need more than a viewer
    assert "disk.raw" not in sh("losetup", "-a")
