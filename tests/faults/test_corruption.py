"""A corrupted file in a chain is caught (verify and restore exit 17 naming it), never restored
silently; the points before it restore bit-identical; the next backup starts a new, sound chain."""

from __future__ import annotations

from .conftest import Harness


def test_corrupted_increment(harness: Harness) -> None:
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
        "--path", str(h.work / "bad.qcow2"), check=4,
    )  # fmt: skip
    assert "DAMAGED" in res.err and "restore an earlier one" in res.err, res.err
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
