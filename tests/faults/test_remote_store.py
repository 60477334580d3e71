"""A remote datastore failing in the middle of a backup, on a real guest: rsync over SSH whose
sshd is killed (by pid) while the increment's file is on the wire, and a restic SFTP repository
made unreachable the same way. The backup ends with the documented exit code 24 (unreachable
after the retries) naming the datastore; then nothing is left behind (no checkpoint of the failed
point, no RUNNING row, no valid-looking half point in the catalog or the store, the guest neither
paused nor frozen), and once the host is back the next backup is an increment of the same chain
that restores bit-identical."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from e2e.test_offhost import restic_sftp_opts, rsync_opts
from vmkeep.catalog.tables import Vm
from vmkeep.engine.core.chains import CHECKPOINT_PREFIX, checkpoints_to_keep
from vmkeep.lab.sshd import Sshd

from .conftest import Harness, Point

BWLIMIT = "2048"  # KiB/s: the increment's 8 MiB take seconds on the wire, time to kill sshd


@pytest.fixture
def sshd(harness: Harness, tmp_path: Path) -> Iterator[Sshd]:
    """This test's sshd (each test kills its own)."""
    server = Sshd(tmp_path / "sshd").start()
    yield server
    server.stop()


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while listed
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def kill_sshd(server: Sshd) -> None:
    """SIGKILL sshd and every session it forked (each by its pid): the transfer breaks, new
    connections are refused."""
    assert server.proc is not None and server.proc.poll() is None, "sshd is not running"
    pids = descendants(server.proc.pid)
    for pid in reversed(pids):
        with contextlib.suppress(ProcessLookupError):  # a session that ended meanwhile
            os.kill(pid, signal.SIGKILL)
    server.proc.wait(10)
    server.proc = None


def wait_for(what: str, cond: Callable[[], object], proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 120
    while not cond():
        assert proc.poll() is None, f"the backup ended ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within 120 s"
        time.sleep(0.05)


def partial_bytes(remote: Path) -> int:
    """Bytes rsync has written into the store's hidden .partial-* folders."""
    return sum(
        p.stat().st_size
        for p in remote.rglob("*")
        if p.is_file() and any(part.startswith(".partial-") for part in p.parts)
    )


def data_bytes(repo: Path) -> int:
    """Bytes of restic's pack files (its SFTP backend writes them as they come)."""
    return sum(p.stat().st_size for p in (repo / "data").rglob("*") if p.is_file())


def fail_mid_store(h: Harness, ds: str, server: Sshd, sent: Callable[[], int]) -> tuple[int, str]:
    """A full to ``ds``, then an increment whose sshd dies once ``sent()`` grew by 1 MiB: exit
    24, and the checks every failure must pass; (backup id, chain)."""
    h.write(1)
    first = h.run("backup", h.vm, "-d", ds, "--reset", "--json").json()
    assert first["increment"] == 0 and first["status"] == "VALID", first
    h.points.append(Point(first["id"], 0, dict(h.state)))
    before = set(h.hv.checkpoints(h.vm))
    h.write(8)
    base = sent()
    proc = h.popen("backup", h.vm, "-d", ds, "--json")
    wait_for("1 MiB on the wire", lambda: sent() - base >= 1 << 20, proc)
    kill_sshd(server)
    res = h.finish(proc)
    assert res.code == 24, (res.code, res.out, res.err)
    assert f"Datastore '{ds}' is unreachable" in res.err and "retried" in res.err, res.err
    assert_clean(h)
    assert set(h.hv.checkpoints(h.vm)) == before, "the failed point's checkpoint is left"
    shown = h.run("backups", "show", str(first["id"]), "--json").json()
    assert shown["status"] == "VALID", shown
    valid = [i["id"] for i in shown["increments"] if i["status"] == "VALID"]
    others = {i["status"] for i in shown["increments"] if i["id"] != 0}
    assert valid == [0] and others <= {"FAILED"}, shown["increments"]
    return first["id"], str(shown["chain"])


def assert_clean(h: Harness) -> None:
    """What ``Harness.assert_healthy`` checks that is not about its dir datastore: the guest
    running and thawed, no lock, job or row left RUNNING, no orphan checkpoint, no staging."""
    info = h.hv.domain(h.vm)
    assert info.state == "ACTIVE" and not info.paused, "VM left paused or off"
    assert h.freeze_status() == "thawed", "guest left frozen"
    assert h._busy() == []
    with h.catalog.session() as s:
        vm_id = s.execute(select(Vm.id).where(Vm.name == h.vm)).scalar_one()
        keep = checkpoints_to_keep(s, vm_id)
    ours = {c for c in h.hv.checkpoints(h.vm) if c.startswith(CHECKPOINT_PREFIX)}
    assert ours <= keep, f"orphan checkpoints {ours - keep}"
    staging = h.data / "staging"
    assert not staging.exists() or not any(staging.iterdir()), list(staging.iterdir())


def next_backup_extends_the_chain(h: Harness, ds: str, backup_id: int) -> None:
    h.write(1)
    res = h.run("backup", h.vm, "-d", ds, "--json").json()
    assert res["id"] == backup_id and res["status"] == "VALID" and res["increment"] >= 1, res
    p = Point(backup_id, res["increment"], dict(h.state))
    h.points.append(p)
    h.restore_matches(p)  # through the full the broken store's chain began with
    assert_clean(h)
    ours = [c for c in h.hv.checkpoints(h.vm) if c.startswith(CHECKPOINT_PREFIX)]
    assert ours, "the next increment has no checkpoint to build on"


def test_rsync_sshd_killed_mid_transfer_exit_24_and_clean(
    harness: Harness, sshd: Sshd, tmp_path: Path
) -> None:
    """`backup VM --datastore` to rsync over SSH, sshd killed mid-transfer: exit 24, no half
    point; `datastore add` once the host is back, the next `backup` works."""
    h = harness
    ds = f"rr{uuid.uuid4().hex[:6]}"
    remote = tmp_path / "remote"
    h.run("datastore", "add", ds, *rsync_opts(sshd, remote), "--opt", f"bwlimit={BWLIMIT}")
    backup_id, chain = fail_mid_store(h, ds, sshd, lambda: partial_bytes(remote))
    # a killed transfer leaves no file that looks complete: only the full's files stand
    stored = sorted(p.name for p in (remote / chain).iterdir() if not p.name.startswith("."))
    assert stored == ["0.domain.xml", "0.vda.qcow2", "manifest.json"], stored

    sshd.start()  # the same host back: same keys, same port
    next_backup_extends_the_chain(h, ds, backup_id)
    leftovers = [p.name for p in (remote / chain).iterdir() if p.name.startswith(".partial-")]
    assert leftovers == [], f"the broken transfer's folder is left: {leftovers}"


def test_restic_sftp_unreachable_mid_store_exit_24_and_clean(
    harness: Harness, sshd: Sshd, tmp_path: Path
) -> None:
    """`backup VM --datastore` to a restic SFTP repository whose host dies mid-store: exit 24,
    no snapshot of the failed point; the next `backup` works and restic's repository checks."""
    h = harness
    ds = f"rs{uuid.uuid4().hex[:6]}"
    repo = tmp_path / "repo"
    password = tmp_path / "pass"
    password.write_text("e2e-restic-" + os.urandom(8).hex())
    password.chmod(0o600)
    h.run("datastore", "add", ds, *restic_sftp_opts(sshd, repo, password),
          "--opt", f"bwlimit={BWLIMIT}")  # fmt: skip
    backup_id, chain = fail_mid_store(h, ds, sshd, lambda: data_bytes(repo))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESTIC_")}
    env["RESTIC_PASSWORD_FILE"] = str(password)

    def restic(*args: str) -> str:
        proc = subprocess.run(["restic", "--repo", str(repo), *args], capture_output=True,
                              text=True, env=env, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    tags = restic("snapshots", "--json", "--tag", f"chain={chain}")
    assert "increment=0" in tags and "increment=1" not in tags, tags

    sshd.start()
    next_backup_extends_the_chain(h, ds, backup_id)
    restic("check")
