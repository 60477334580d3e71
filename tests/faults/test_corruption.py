"""A corrupted file in a chain is caught (verify and restore exit 17 naming it), never restored
silently; the points before it restore bit-identical; the next backup starts a new, sound chain."""

from __future__ import annotations

import os
from pathlib import Path

from .conftest import Harness


def test_corrupted_increment(harness: Harness) -> None:
    """`vmkeep restore` and `vmkeep backups verify` of a chain with a flipped byte: exit 17."""
    h = harness
    for _ in range(3):
        h.backup_and_check()
    good, bad = h.points[:-1], h.points[-1]
    victim = h.ds / h.vm / str(bad.backup) / f"{bad.increment}.vda.qcow2"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the image
    victim.write_bytes(bytes(data))

    res = h.run(
        "restore", str(bad.backup), "--increment", str(bad.increment), "--disk", "vda",
        "--path", str(h.work / "bad.qcow2"), check=17,
    )  # fmt: skip
    assert victim.name in res.err and not (h.work / "bad.qcow2").exists()
    shown = h.run("backups", "show", str(bad.backup), "--json").json()
    assert shown["increments"][bad.increment]["status"] == "DAMAGED"
    res = h.run("backups", "verify", str(bad.backup), check=17)
    assert victim.name in res.err, res.err
    res = h.run(
        "restore", str(bad.backup), "--increment", str(bad.increment), "--disk", "vda",
        "--path", str(h.work / "bad.qcow2"), check=17,
    )  # fmt: skip
    assert "DAMAGED" in res.err and victim.name in res.err, res.err
    for p in good:
        h.restore_matches(p)
    h.assert_healthy()
    res = h.backup(check=1)  # a new full chain, with a warning: never extend a damaged chain
    assert "new full backup chain" in res.err, res.err
    p = h.record(res)
    assert p.increment == 0 and p.backup != bad.backup
    h.restore_matches(p)
    h.backup_and_check()
    h.points.remove(bad)


def libvirt_folders() -> set[str]:
    """libvirt's own folders (channel, save, snapshot, ...); the per-domain runtime folders come
    and go with the VMs other tests run at the same time."""
    return {e for e in os.listdir("/var/lib/libvirt/qemu") if not e.startswith("domain-")}


def test_restore_refuses_bad_targets_before_any_work(harness: Harness) -> None:
    """Names and paths are checked before a byte is copied; nothing is left behind; libvirt's
        own folders are never touched (``--name ..`` once made libvirt delete one). `vmkeep restore`
    with ``--name``, ``--path``, ``--force``."""
    h = harness
    p = h.backup_and_check()
    restores = h.data / "restores"
    before = set(restores.iterdir()) if restores.exists() else set()
    snapshot_dir = libvirt_folders()
    for bad in ("..", ".", "a/b", "x" * 300, "123"):
        res = h.run("restore", str(p.backup), "--name", bad, check=9)
        assert "--name" in res.err
    res = h.run("restore", str(p.backup), "--name", h.vm, check=7)  # taken by the VM itself
    assert "choose another --name" in res.err
    existing = h.work / "existing.qcow2"
    existing.write_text("precious")
    res = h.run("restore", str(p.backup), "--path", str(existing), "--name", "newvm", check=9)
    res = h.run("restore", str(p.backup), "--disk", "vda", "--path", str(existing), check=7)
    assert "--force" in res.err and existing.read_text() == "precious"
    res = h.run("restore", str(p.backup), "--disk", "vda", "--path", f"{existing}/x.qcow2", check=9)
    assert "is a file, not a folder" in res.err
    assert (set(restores.iterdir()) if restores.exists() else set()) == before
    assert libvirt_folders() == snapshot_dir
    # a trailing '/' means "into this folder"
    out = h.run(
        "restore", str(p.backup), "--disk", "vda", "--path", f"{h.work}/newdir/", "--json"
    ).json()
    assert Path(out["path"]).parent == h.work / "newdir" and Path(out["path"]).is_file()
    # --force overwrites
    h.run("restore", str(p.backup), "--disk", "vda", "--path", str(existing), "--force")
    assert existing.read_bytes()[:4] == b"QFI\xfb"
