"""One door: with a daemon serving the catalog, every long command is the daemon's job. The CLI
process hands it over the daemon's socket and never connects to libvirt itself (strace sees
every connect(2) of the command and its children); ``jobs list`` shows each job; the output is
the same as when the command runs the action itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmkeep.hypervisor import Hypervisor

from .conftest import Result, running_daemon


def traced(trace: Path, *args: str, check: int = 0) -> tuple[Result, str]:
    """Run the CLI under ``strace -f -e trace=connect``: its result and every connect it made."""
    proc = subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=connect", "-o", str(trace),
         sys.executable, "-m", "vmkeep.cli.main", *args],
        capture_output=True, text=True, timeout=900, env=dict(os.environ),
    )  # fmt: skip
    res = Result(proc.returncode, proc.stdout, proc.stderr)
    assert res.code == check, f"vmkeep {' '.join(args)} -> {res.code}\n{res.out}\n{res.err}"
    assert "Traceback" not in res.err, res.err
    return res, trace.read_text()


@pytest.fixture
def point(vmkeep, hv: Hypervisor, agent_vm: str, qemu_reachable_data_dir: Path) -> tuple[str, str]:
    """The agent VM imported, a dir datastore, and a first backup: (VM, backup id)."""
    vm = agent_vm
    for cp in hv.checkpoints(vm):
        hv.delete_checkpoint(vm, cp)
    vmkeep("vm", "import", vm)
    vmkeep(
        "datastore", "add", "ds", "--driver", "dir", "--path", str(qemu_reachable_data_dir / "ds")
    )
    return vm, str(vmkeep("backup", vm, "-d", "ds", "--json").json()["id"])


def test_long_commands_are_the_daemons_jobs(
    vmkeep, hv: Hypervisor, point: tuple[str, str], tmp_path: Path
) -> None:
    vm, bid = point
    here = vmkeep("backups", "verify", bid, "--json").json()  # no daemon: in this process

    commands = [
        ("vm", "quiesce", vm),
        ("vm", "unquiesce", vm),
        ("vm", "suspend", vm),
        ("vm", "resume", vm),
        ("backups", "verify", bid),
        ("drill", bid, "--timeout", "600"),
    ]
    with running_daemon() as (_proc, api):
        outputs = {}
        for n, cmd in enumerate(commands):
            res, connects = traced(tmp_path / f"trace{n}", *cmd, "--json")
            assert "libvirt-sock" not in connects, (cmd, connects)
            assert "vmkeep.sock" in connects, (cmd, connects)  # it asked the daemon
            outputs[cmd[:2]] = res.json()
        token = vmkeep("token", "create", "t", "--role", "viewer", "--json").json()["token"]
        listed = api.get("/v1/jobs", headers={"Authorization": f"Bearer {token}"}).json()

    ran = [(j["kind"], j["who"], j["state"]) for j in reversed(listed) if j["origin"] == "api"]
    assert ran == [
        ("quiesce", "@local", "DONE"),
        ("unquiesce", "@local", "DONE"),
        ("vm-suspend", "@local", "DONE"),
        ("vm-resume", "@local", "DONE"),
        ("verify", "@local", "DONE"),
        ("drill", "@local", "DONE"),
    ], listed
    # the same answer whichever process ran it
    assert outputs[("backups", "verify")] == here
    assert outputs[("vm", "resume")]["lcm_state"] == "RUNNING"
    assert outputs[("drill", bid)]["result"] == "PASS"
    # and without the daemon the same commands run here, recorded as jobs of the CLI
    vmkeep("vm", "suspend", vm)
    vmkeep("vm", "resume", vm)
    cli_jobs = [j for j in vmkeep("jobs", "list", "--json").json() if j["origin"] == "cli"]
    assert {"vm-suspend", "vm-resume", "verify", "backup"} <= {j["kind"] for j in cli_jobs}


def test_ctrl_c_cancels_a_drill_the_daemon_runs(
    vmkeep, hv: Hypervisor, point: tuple[str, str]
) -> None:
    """A drill reports no progress while its guest boots: Ctrl-C on the command still stops the
    daemon's job at once (the cancel is raised in the job's thread), and the drill's throw-away
    VM is gone."""
    vm, bid = point
    with running_daemon() as (_proc, _api):
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmkeep.cli.main", "drill", bid, "--timeout", "600"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ),
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not any(d.name.startswith(f"{vm}-drill-") for d in hv.list_domains()):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 130 and "cancelling job" in err, err
        job = vmkeep("jobs", "list", "--json").json()[0]
        assert (job["kind"], job["state"], job["exit_code"]) == ("drill", "CANCELLED", 130), job
    assert not [d.name for d in hv.list_domains() if d.name.startswith(f"{vm}-drill-")]
