"""Fault-suite fixtures: real libvirtd, QEMU (TCG) and qemu-guest-agent, one shared lab VM per
module (``guest``), a catalog, datastore and settings of its own for each test (``harness``), and
the real CLI in subprocesses.

After every fault, ``Harness.assert_healthy`` checks what the issue promises: no guest frozen,
suspended or paused (asked of the agent and of libvirt), a consistent catalog (no RUNNING rows,
no locks, no busy lcm state), no orphan checkpoint, no staging leftovers, no partial or orphan
files in the datastore; ``backup_and_check`` then runs the next backup with no manual step and
restores it bit-identical. These tests never skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from vmkeep.catalog import Catalog
from vmkeep.catalog.tables import Backup, Job, Lock
from vmkeep.datastores.dir import STAGING
from vmkeep.engine.core.chains import CHECKPOINT_PREFIX, checkpoints_to_keep
from vmkeep.errors import HypervisorError, HypervisorUnreachable
from vmkeep.hypervisor import Hypervisor, connect
from vmkeep.lab import Lab
from vmkeep.lab.lab import read_file_from_image

LAB_DIR = Path(os.environ.get("VMKEEP_E2E_LAB_DIR", "/var/lib/vmkeep/lab"))
PREFIX = os.environ.get("VMKEEP_FAULT_PREFIX", "vmkeep-fault-")  # a lab per module below


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class Point:
    backup: int
    increment: int
    files: dict[str, str]  # guest path -> sha256 at backup time


@dataclass
class Harness:
    hv: Hypervisor
    lab: Lab
    vm: str
    data: Path
    ds: Path
    work: Path
    env: dict[str, str]
    points: list[Point] = field(default_factory=list)
    state: dict[str, str] = field(default_factory=dict)
    token: str = ""  # an API token, once a test created one

    # --- running vmkeep -------------------------------------------------------------------------
    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "vmkeep.cli.main", *args]

    def run(self, *args: str, check: int | None = 0, extra: dict[str, str] | None = None) -> Result:
        proc = subprocess.run(
            self.argv(*args),
            capture_output=True,
            text=True,
            timeout=600,
            env=self.env | (extra or {}),
        )
        res = Result(proc.returncode, proc.stdout, proc.stderr)
        if check is not None:
            assert res.code == check, f"vmkeep {' '.join(args)} -> {res.code}\n{res.out}\n{res.err}"
        assert "Traceback" not in res.err, res.err
        return res

    def popen(self, *args: str, extra: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """Start vmkeep in the background; its stderr goes to ``self.work / "stderr"``."""
        self.stderr_file = self.work / "stderr"
        with open(self.stderr_file, "w") as err:
            return subprocess.Popen(
                self.argv(*args),
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=self.env | (extra or {}),
            )

    def finish(self, proc: subprocess.Popen[str]) -> Result:
        out, _ = proc.communicate(timeout=600)
        err = self.stderr_file.read_text()
        assert "Traceback" not in err, err
        return Result(proc.returncode, out, err)

    @property
    def catalog(self) -> Catalog:
        return Catalog(f"sqlite:///{self.data / 'catalog.db'}")

    # --- guest data -----------------------------------------------------------------------------
    def write(self, mib: int = 2) -> None:
        n = len(self.state)
        path = f"/mnt/vda/f{n % 4}"  # overwrite files too: increments carry changed blocks
        self.state[path] = self.lab.write_random(self.vm, path, mib)

    def backup(self, *extra_args: str, check: int | None = 0, **kw: Any) -> Result:
        return self.run("backup", self.vm, "-d", "ds", "--json", *extra_args, check=check, **kw)

    def record(self, res: Result) -> Point:
        data = res.json()
        p = Point(data["id"], data["increment"], dict(self.state))
        self.points.append(p)
        return p

    def restore_matches(self, p: Point) -> None:
        out = self.work / f"r-{p.backup}-{p.increment}-{uuid.uuid4().hex[:6]}.qcow2"
        self.run(
            "restore",
            str(p.backup),
            "--increment",
            str(p.increment),
            "--disk",
            "vda",
            "--path",
            str(out),
        )
        try:
            for path, digest in p.files.items():
                got = read_file_from_image(out, path.removeprefix("/mnt/vda"), self.work)
                assert hashlib.sha256(got).hexdigest() == digest, (p, path)
        finally:
            out.unlink(missing_ok=True)

    def backup_and_check(self, *, expect: int = 0) -> Point:
        """The next backup, with no manual step: VALID, and it restores bit-identical."""
        self.write()
        res = self.backup(check=expect)
        data = res.json()
        assert data["status"] == "VALID", data
        p = self.record(res)
        self.restore_matches(p)
        return p

    # --- the promises ---------------------------------------------------------------------------
    def wait_libvirtd(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.hv.list_domains()
                return
            except HypervisorUnreachable:
                if time.monotonic() > deadline:
                    raise
                self.hv.reconnect(wait=5)

    def freeze_status(self, timeout: float = 90) -> str:
        """guest-fsfreeze-status once the agent answers (it may be hung on purpose for a while)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.hv.fs_freeze_status(self.vm, 5)
            except HypervisorError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def wait_recovered(self, timeout: float = 30) -> None:
        """The guard recovers a VM whose vmkeep process died, with no command run."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._busy():
                return
            time.sleep(0.3)
        raise AssertionError(f"not recovered within {timeout} s: {self._busy()}")

    def _busy(self) -> list[str]:
        busy = []
        with self.catalog.session() as s:
            for lk in s.execute(select(Lock)).scalars():
                busy.append(f"lock {lk.name} ({lk.reason}, pid {lk.pid})")
            for j in s.execute(select(Job).where(Job.state.in_(["QUEUED", "RUNNING"]))).scalars():
                busy.append(f"job {j.id} {j.kind} {j.state}")
            for b in s.execute(select(Backup)).scalars():
                if b.status == "RUNNING" or any(i.status == "RUNNING" for i in b.increments):
                    busy.append(f"backup {b.id} RUNNING")
                if b.active_flatten:
                    busy.append(f"backup {b.id} ACTIVE_FLATTEN")
        shown = self.run("vm", "show", self.vm, "--json").json()
        if shown["lcm_state"] != "RUNNING":
            busy.append(f"lcm_state {shown['lcm_state']}")
        return busy

    def assert_healthy(self) -> None:
        info = self.hv.domain(self.vm)
        assert info.state == "ACTIVE" and not info.paused, "VM left paused or off"
        assert self.freeze_status() == "thawed", "guest left frozen"
        assert self._busy() == []
        with self.catalog.session() as s:
            vm_id = s.execute(select(Backup.vm_id)).scalars().first()
            keep = checkpoints_to_keep(s, vm_id) if vm_id else set()
            # a DAMAGED increment's checkpoint is unused and pruned by the next backup
            keep |= {
                i.checkpoint
                for b in s.execute(select(Backup)).scalars()
                for i in b.increments
                if i.status == "DAMAGED" and i.checkpoint
            }
            valid_chains = {
                b.chain for b in s.execute(select(Backup)).scalars() if b.status == "VALID"
            }
            stored = {
                f"{b.chain}/{f['name']}"
                for b in s.execute(select(Backup)).scalars()
                if b.status == "VALID"
                for i in b.increments
                if i.status == "VALID"
                for f in i.files
            }
        ours = {c for c in self.hv.checkpoints(self.vm) if c.startswith(CHECKPOINT_PREFIX)}
        assert ours <= keep, f"orphan checkpoints {ours - keep}"
        for staging in (self.data / "staging", self.ds / STAGING):  # data dir, datastore
            assert not staging.exists() or not any(staging.iterdir()), list(staging.iterdir())
        partial = [p for p in self.ds.rglob("*.partial")]
        assert partial == [], partial
        on_disk = {
            f"{vm.name}/{b.name}"
            for vm in self.ds.iterdir()
            if vm.is_dir() and vm.name != STAGING
            for b in vm.iterdir()
        }
        assert on_disk <= valid_chains, f"orphan chains in the datastore: {on_disk - valid_chains}"
        missing = [f for f in stored if not (self.ds / f).exists()]
        assert missing == [], missing

    def agent_pause(self, seconds: float) -> str:
        """In the guest: SIGSTOP qemu-ga in a second (once it answered this very command), SIGCONT
        it ``seconds`` later. Returns a tag the guest prints on its serial console with
        " stopped" and " resumed": await them with ``wait_console``."""
        tag = f"vmkeep-test-agent-{uuid.uuid4().hex[:8]}"
        self.lab.sh(
            self.vm,
            f"(sleep 1; kill -STOP $(cat /run/qemu-ga.pid); echo '{tag} stopped' >/dev/console; "
            f"sleep {seconds}; kill -CONT $(cat /run/qemu-ga.pid); "
            f"echo '{tag} resumed' >/dev/console) </dev/null >/dev/null 2>&1 &",
        )
        return tag

    def wait_console(self, line: str, timeout: float = 90) -> None:
        """Until the guest printed ``line`` on its serial console (the agent may be stopped)."""
        log = self.lab.serial_log(self.vm)
        deadline = time.monotonic() + timeout
        while line not in (log.read_text(errors="replace") if log.exists() else ""):
            assert time.monotonic() < deadline, f"the guest never printed {line!r}"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def hv() -> Hypervisor:
    hv = connect("qemu:///system")
    try:
        hv.list_domains()
    except HypervisorUnreachable as err:
        pytest.fail(f"fault tests need a running libvirtd (start it with 'libvirtd -d'): {err}")
    return hv


@dataclass
class Guest:
    """The module's one lab VM (booting it is the slow part): shared by the module's tests."""

    hv: Hypervisor
    lab: Lab
    vm: str


@pytest.fixture(scope="module")
def guest(hv: Hypervisor, request: pytest.FixtureRequest) -> Iterator[Guest]:
    module = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    lab = Lab(hv, LAB_DIR, prefix=f"{PREFIX}{module}-")
    lab.down()
    vm = lab.create(f"{PREFIX}{module}-vm", [256 << 20])
    yield Guest(hv, lab, vm)
    lab.down()


def fresh_guest(g: Guest) -> None:
    """What an earlier test may have left on the shared guest, undone before the next one: libvirtd
    reachable, the VM running, not paused, thawed, and none of vmkeep's checkpoints (their names,
    ``vmkeep-<backup>-<n>``, would clash with the new catalog's first backups)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            info = g.hv.domain(g.vm)
            break
        except HypervisorUnreachable:
            assert time.monotonic() < deadline, "libvirtd did not come back"
            g.hv.reconnect(wait=5)
    if info.state != "ACTIVE":
        g.lab.start(g.vm)
    elif info.paused:
        g.hv.resume(g.vm)
    deadline = time.monotonic() + 90
    while True:
        try:
            if g.hv.fs_freeze_status(g.vm, 5) == "frozen":
                g.hv.fs_thaw(g.vm, 5)
            break
        except HypervisorError:  # the agent is still starting (or was stopped on purpose)
            assert time.monotonic() < deadline, "the guest agent never answered"
            time.sleep(1)
    for cp in g.hv.checkpoints(g.vm):
        if cp.startswith(CHECKPOINT_PREFIX):
            g.hv.delete_checkpoint(g.vm, cp)


@pytest.fixture
def harness(guest: Guest) -> Iterator[Harness]:
    """Each test's own catalog, datastore, settings and files, over the module's guest: a test
    needs no earlier one, and leaves nothing to the next."""
    fresh_guest(guest)
    root = LAB_DIR.parent / "fault-data" / uuid.uuid4().hex[:8]
    data, ds, work = root / "data", root / "ds", root / "work"
    for d in (data, ds, work):
        d.mkdir(parents=True)
    root.chmod(0o755)
    config = root / "config.toml"
    config.write_text("version = 1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMKEEP_")}
    env |= {
        "VMKEEP_DATA_DIR": str(data),
        "VMKEEP_CONFIG": str(config),
        "VMKEEP_AGENT_TIMEOUT": "5",
        "HOME": str(root),
    }
    h = Harness(guest.hv, guest.lab, guest.vm, data, ds, work, env)
    h.run("vm", "import", guest.vm)
    h.run("vm", "config", guest.vm, "--mode", "increment", "--fs-freeze", "agent")
    h.run("datastore", "add", "ds", "--driver", "dir", "--path", str(ds))
    yield h
    shutil.rmtree(root, ignore_errors=True)
