"""The README's restore-drill promises on a real lab VM: a failing ``--probe`` FAILs with exit 26
and its evidence recorded; ``--timeout`` bounds the boot; ``--increment N`` drills that point; a
drill killed mid-way leaves a marked VM and files that the next drill of the point removes; the
``POST /v1/backups/{id}/drill`` route through a real daemon answers what the CLI shows. After
each: no drill VM, overlay, export, loop device or mount is left. One guest for the module; each
test has its own catalog and datastore."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkeep.engine.restore import drill
from vmkeep.hypervisor import Hypervisor
from vmkeep.lab import Lab

from .conftest import PREFIX, running_daemon

VM = f"{PREFIX}dp"


@pytest.fixture(scope="module")
def vm(lab: Lab) -> Iterator[str]:
    lab.create(VM, [64 << 20])
    yield VM
    lab.remove(VM)


@pytest.fixture
def point(vm: str, hv: Hypervisor, lab: Lab, vmkeep, qemu_reachable_data_dir: Path) -> int:
    """The module's VM in this test's new catalog, with a datastore QEMU reaches (a drill's
    overlays are backed by its files) and one full backup; returns the backup id."""
    if hv.domain(vm).state != "ACTIVE":
        lab.start(vm)
    for cp in hv.checkpoints(vm):
        hv.delete_checkpoint(vm, cp)
    vmkeep("vm", "import", vm)
    vmkeep("vm", "config", vm, "--mode", "increment", "--fs-freeze", "agent")
    vmkeep(
        "datastore", "add", "ds", "--driver", "dir", "--path", str(qemu_reachable_data_dir / "ds")
    )
    lab.write_random(vm, "/mnt/vda/f", 2)
    return int(vmkeep("backup", vm, "-d", "ds", "--json").json()["id"])


def drill_domains(hv: Hypervisor, vm: str) -> list[str]:
    return [d.name for d in hv.list_domains() if d.name.startswith(f"{vm}-drill-")]


def assert_nothing_left(hv: Hypervisor, vm: str, data: Path) -> None:
    assert drill_domains(hv, vm) == []
    drills = data / "drills"
    assert not drills.exists() or not any(drills.iterdir()), list(drills.iterdir())
    assert drill.exports_under(data) == []
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(drills) not in loops, loops
    assert str(drills) not in Path("/proc/mounts").read_text()


def test_a_failing_probe_fails_the_drill_with_its_evidence_recorded(
    vmkeep, hv: Hypervisor, vm: str, point: int, qemu_reachable_data_dir: Path
) -> None:
    """``vmkeep drill ID --probe CMD``: a probe exiting non-zero is a FAIL (exit 26, a FAILED
    job) whose evidence (each step, the probe's output) is printed; the verdict and reason are
    recorded on the point (``backups show``'s last drill)."""
    probe = "echo looking; test -e /mnt/vda/never-written"
    res = vmkeep("drill", str(point), "--probe", probe, check=26)
    lines = res.out.splitlines()
    assert [line.split(":")[0] for line in lines[:4]] == [
        "ok   checksums",
        "ok   fsck vda",
        "ok   boot",
        "FAIL probe",
    ], res.out
    assert f"FAIL probe: {probe!r} exited 1" in res.out and "looking" in res.out
    assert lines[-1].startswith("drill ") and lines[-1].endswith(f"of backup {point} point 0: FAIL")
    assert f"of backup {point} point 0 FAILED at probe: {probe!r} exited 1" in res.err
    last = vmkeep("backups", "show", str(point), "--json").json()["increments"][0]["last_drill"]
    assert last["result"] == "FAIL", last
    assert last["reason"].startswith(f"probe: {probe!r} exited 1") and "looking" in last["reason"]
    jobs = [j for j in vmkeep("jobs", "list", "--json").json() if j["kind"] == "drill"]
    assert [(j["state"], j["exit_code"]) for j in jobs] == [("FAILED", 26)], jobs
    assert_nothing_left(hv, vm, qemu_reachable_data_dir)


def test_timeout_bounds_the_boot_and_cleans_up(
    vmkeep, hv: Hypervisor, vm: str, point: int, qemu_reachable_data_dir: Path
) -> None:
    """``vmkeep drill ID --timeout S``: a guest whose agent does not answer within S seconds of
    its start FAILs at the boot step (no probe runs) and its drill VM is removed."""
    t0 = time.monotonic()
    res = vmkeep("drill", str(point), "--timeout", "1", "--probe", "true", "--json", check=26)
    took = time.monotonic() - t0
    out = res.json()
    assert out["reason"] == "boot: the guest agent did not answer within 1 s of start", out
    assert [c["step"] for c in out["checks"]] == ["checksums", "fsck vda", "boot"]
    assert "FAILED at boot" in res.err
    assert took < 120, took  # it did not wait for the default 300 s
    assert_nothing_left(hv, vm, qemu_reachable_data_dir)
    bad = vmkeep("drill", str(point), "--timeout", "0", check=2)
    assert "--timeout" in bad.err


def test_increment_drills_that_point(
    vmkeep, lab: Lab, hv: Hypervisor, vm: str, point: int, qemu_reachable_data_dir: Path
) -> None:
    """``vmkeep drill ID --increment N``: the drill boots point N (its data, not the newest's)
    and records the result on that point alone."""
    at_full = lab.sha256(vm, "/mnt/vda/f")
    lab.write_random(vm, "/mnt/vda/f", 1, seek_mib=1)
    second = vmkeep("backup", vm, "-d", "ds", "--json").json()
    assert second["id"] == point and second["increment"] == 1
    probe = f"sha256sum /mnt/vda/f | grep -q {at_full}"
    # the newest point holds other bytes (this probe would FAIL there)
    assert lab.sha256(vm, "/mnt/vda/f") != at_full
    out = vmkeep("drill", str(point), "--increment", "0", "--probe", probe, "--json").json()
    assert out["result"] == "PASS" and out["increment"] == 0, out
    shown = vmkeep("backups", "show", str(point), "--json").json()
    assert shown["increments"][0]["last_drill"]["drill"] == out["drill"]
    assert shown["increments"][1]["last_drill"] is None
    missing = vmkeep("drill", str(point), "--increment", "7", check=6)
    assert "has no increment 7" in missing.err
    assert_nothing_left(hv, vm, qemu_reachable_data_dir)


def kill_when(cmd: list[str], ready, what: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI, SIGKILL it once ``ready()`` holds; the finished process."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmkeep.cli.main", *cmd],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ),
    )  # fmt: skip
    deadline = time.monotonic() + 180
    try:
        while not ready():
            assert proc.poll() is None, (what, proc.communicate())
            assert time.monotonic() < deadline, f"never reached: {what}"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, err)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_a_killed_drill_is_cleaned_up_by_the_next_drill_of_the_point(
    vmkeep, hv: Hypervisor, vm: str, point: int, qemu_reachable_data_dir: Path
) -> None:
    """``vmkeep drill ID`` SIGKILLed while its VM boots, then while its file systems are checked:
    its marked drill VM, overlays and exports stay behind, and the next drill of that point
    removes them (README: "a leftover of a killed drill is recognised by its description and
    removed by the next drill of that point") and PASSes; the killed drill's job is FAILED.
    A second drill of the point while one runs is refused (exit 8), leaving the running one's VM
    alone."""
    data = qemu_reachable_data_dir
    name = f"{vm}-drill-{point}-0"
    work = data / "drills" / name

    def booting() -> bool:
        return name in drill_domains(hv, vm) and hv.domain(name).state == "ACTIVE"

    def booting_alone() -> bool:
        if not booting():
            return False
        second = vmkeep("drill", str(point), check=8)
        assert f"backup {point} point 0 is busy: drill by pid" in second.err, second.err
        assert booting(), "the refused drill touched the running one's VM"
        return True

    kill_when(["drill", str(point), "--timeout", "600"], booting_alone, "the drill VM running")
    assert "vmkeep restore drill" in hv.domain_xml(name)  # marked as a drill's
    assert (work / "vda.qcow2").exists()

    # the next drill, killed in its file-system check (the fault hook), first removed that VM;
    # it leaves its export (FUSE mount, qemu-storage-daemon) and loop device behind
    env = dict(os.environ, VMKEEP_FAILPOINTS="drill-fsck=kill")
    killed = subprocess.run(
        [sys.executable, "-m", "vmkeep.cli.main", "drill", str(point)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert drill_domains(hv, vm) == []
    assert drill.exports_under(work), "the killed drill's export is not left"
    assert str(work) in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(work) in Path("/proc/mounts").read_text()

    out = vmkeep("drill", str(point), "--json").json()
    assert out["result"] == "PASS", out
    assert_nothing_left(hv, vm, data)
    jobs = [j for j in vmkeep("jobs", "list", "--json").json() if j["kind"] == "drill"]
    states = [(j["state"], (j["error"] or {}).get("code")) for j in jobs]
    assert states == [("DONE", None), ("FAILED", "ProcessDied"), ("FAILED", "Locked"),
                      ("FAILED", "ProcessDied")], jobs  # fmt: skip


def test_the_drill_route_through_a_daemon_answers_as_the_cli(
    vmkeep, hv: Hypervisor, vm: str, point: int, qemu_reachable_data_dir: Path
) -> None:
    """``POST /v1/backups/{id}/drill`` (operator token) on a real daemon: 202 and a job whose
    result is the drill the CLI shows (``backups show``'s last drill, ``jobs list``); a viewer
    is refused 403, an unknown backup 404, a bad body 422, none of them queued."""
    operator = vmkeep("token", "create", "op", "--role", "operator", "--json").json()["token"]
    viewer = vmkeep("token", "create", "ro", "--role", "viewer", "--json").json()["token"]
    as_op = {"Authorization": f"Bearer {operator}"}
    with running_daemon() as (_proc, api):
        body = {"probe": "test -s /mnt/vda/f", "timeout": 600}
        denied = api.post(
            f"/v1/backups/{point}/drill", json=body, headers={"Authorization": f"Bearer {viewer}"}
        )
        assert denied.status_code == 403, denied.text
        started = api.post(f"/v1/backups/{point}/drill", json=body, headers=as_op)
        assert started.status_code == 202, started.text
        where = started.headers["Location"]
        job = wait_job(api, where, as_op)
        assert job["state"] == "DONE" and job["kind"] == "drill", job
        result = job["result"]
        assert result["result"] == "PASS" and result["probe"] == body["probe"], result
        unknown = api.post("/v1/backups/999/drill", json=body, headers=as_op)
        assert unknown.status_code == 404, unknown.text
        assert unknown.json()["error"]["code"] == "BackupNotFound"
        bad = api.post(f"/v1/backups/{point}/drill", json={"timeout": 0}, headers=as_op)
        assert bad.status_code == 422, bad.text
    shown = vmkeep("backups", "show", str(point), "--json").json()
    last = shown["increments"][0]["last_drill"]
    # the CLI shows the drill the API ran, with the same evidence
    assert (last["drill"], last["result"], last["reason"]) == (result["drill"], "PASS", None)
    assert [c["step"] for c in result["checks"]] == ["checksums", "fsck vda", "boot", "probe"]
    jobs = vmkeep("jobs", "list", "--json").json()
    drills = [(j["origin"], j["state"]) for j in jobs if j["kind"] == "drill"]
    assert drills == [("api", "DONE")], jobs
    assert_nothing_left(hv, vm, qemu_reachable_data_dir)


def wait_job(api, where: str, headers: dict[str, str]) -> dict:
    deadline = time.monotonic() + 300
    while True:
        job = api.get(f"{where}?wait=30", headers=headers).json()
        if job["state"] in ("DONE", "FAILED", "CANCELLED"):
            return job
        assert time.monotonic() < deadline, job
