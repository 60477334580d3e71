"""vmkeep vm ... on real lab guests: import, list, quiesce/unquiesce with the agent's own word."""

from __future__ import annotations

import hashlib
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from vmkeep.hypervisor import Hypervisor
from vmkeep.lab import Lab


def test_import_and_list_shows_running(vmkeep, agent_vm: str) -> None:
    vmkeep("vm", "import", agent_vm)
    rows = vmkeep("vm", "list", "--json").json()
    row = next(r for r in rows if r["name"] == agent_vm)
    assert row["state"] == "ACTIVE" and row["lcm_state"] == "RUNNING"
    shown = vmkeep("vm", "show", agent_vm, "--json").json()
    assert shown["disks"][0]["target"] == "vda" and shown["disks"][0]["format"] == "qcow2"
    assert shown["agent_channel"] is True


def test_quiesce_freezes_guest_and_unquiesce_thaws(vmkeep, agent_vm: str, hv: Hypervisor) -> None:
    vmkeep("vm", "import", agent_vm)
    assert hv.fs_freeze_status(agent_vm, 10) == "thawed"
    try:
        res = vmkeep("vm", "quiesce", agent_vm, "--json").json()
        assert res["filesystems"] == 1
        assert hv.fs_freeze_status(agent_vm, 10) == "frozen"  # the guest agent says so
        assert vmkeep("vm", "show", agent_vm, "--json").json()["lcm_state"] == "QUIESCED"
        # wrong state: a second quiesce is refused with the documented exit code
        again = vmkeep("vm", "quiesce", agent_vm, check=4)
        assert "QUIESCED" in again.err and "needs RUNNING" in again.err
    finally:
        vmkeep("vm", "unquiesce", agent_vm, check=None)
    assert hv.fs_freeze_status(agent_vm, 10) == "thawed"
    assert vmkeep("vm", "show", agent_vm, "--json").json()["lcm_state"] == "RUNNING"
    refused = vmkeep("vm", "unquiesce", agent_vm, check=4)
    assert "needs QUIESCED" in refused.err


def test_quiesce_without_agent_is_a_clear_error_and_vm_keeps_running(
    vmkeep, noagent_vm: str, hv: Hypervisor
) -> None:
    vmkeep("vm", "import", noagent_vm)
    res = vmkeep("vm", "quiesce", noagent_vm, check=12)
    assert "guest agent" in res.err and "qemu-guest-agent" in res.err
    info = hv.domain(noagent_vm)
    assert info.state == "ACTIVE" and not info.paused
    assert vmkeep("vm", "show", noagent_vm, "--json").json()["lcm_state"] == "RUNNING"


def test_write_in_guest_is_readable_through_guest_exec(vmkeep, lab: Lab, agent_vm: str) -> None:
    payload = "vmkeep lab payload 42\n"
    lab.sh(agent_vm, f"printf '{payload.strip()}\\n' > /mnt/vda/hello && sync")
    res = vmkeep("lab", "exec", agent_vm, "--", "sha256sum", "/mnt/vda/hello")
    assert res.out.split()[0] == hashlib.sha256(payload.encode()).hexdigest()
    # random data: the checksum the guest reports is stable across reads
    digest = lab.write_random(agent_vm, "/mnt/vda/rand", 2)
    assert lab.sha256(agent_vm, "/mnt/vda/rand") == digest


def test_unknown_vm_exit_code_and_message(vmkeep) -> None:
    res = vmkeep("vm", "show", "no-such-vm", check=6)
    assert "no-such-vm" in res.err and "vmkeep vm import" in res.err


def test_abandoned_quiesce_is_thawed_by_the_timeout(
    vmkeep, agent_vm: str, hv: Hypervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMKEEP_QUIESCE_MAX_SECONDS", "3")
    vmkeep("vm", "import", agent_vm)
    log = Path(os.environ["VMKEEP_DATA_DIR"]) / "watchdog.log"
    try:
        res = vmkeep("vm", "quiesce", agent_vm, "--json").json()
        at = datetime.fromisoformat(res["auto_unquiesce_at"])
        assert hv.fs_freeze_status(agent_vm, 10) == "frozen"
        assert datetime.now(UTC) < at, "frozen seen only after the deadline: proved nothing"
        # the caller "crashed": nobody calls unquiesce; the guard thaws the guest, never before
        # the deadline it reported (a generous wait: the guard may be slow on a loaded host)
        deadline = time.monotonic() + 60
        while hv.fs_freeze_status(agent_vm, 10) == "frozen":
            assert time.monotonic() < deadline, "not thawed 60 s after quiesce.max_seconds"
            time.sleep(0.2)
        assert datetime.now(UTC) >= at, "thawed before auto_unquiesce_at"
        assert f"auto-unquiesced VM {agent_vm} after quiesce.max_seconds=3" in log.read_text()
        assert vmkeep("vm", "show", agent_vm, "--json").json()["lcm_state"] == "RUNNING"
        # an unquiesce that comes too late is a wrong-state call
        assert "needs QUIESCED" in vmkeep("vm", "unquiesce", agent_vm, check=4).err
    finally:
        vmkeep("vm", "reset-state", agent_vm, check=None)


def test_unquiesce_in_time_keeps_the_watchdog_away(
    vmkeep, agent_vm: str, hv: Hypervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`vmkeep vm quiesce`, `vmkeep vm unquiesce` in time: the first quiesce's guard does not
    thaw the second quiesce at the first deadline."""
    vmkeep("vm", "import", agent_vm)
    log = Path(os.environ["VMKEEP_DATA_DIR"]) / "watchdog.log"
    monkeypatch.setenv("VMKEEP_QUIESCE_MAX_SECONDS", "3")
    first = vmkeep("vm", "quiesce", agent_vm, "--json").json()
    vmkeep("vm", "unquiesce", agent_vm)
    monkeypatch.setenv("VMKEEP_QUIESCE_MAX_SECONDS", "60")
    vmkeep("vm", "quiesce", agent_vm)  # a new quiesce has its own, later deadline
    try:
        # past the first quiesce's deadline, by a few of its guard's polls (0.25 s each)
        past = datetime.fromisoformat(first["auto_unquiesce_at"]) + timedelta(seconds=1.5)
        while datetime.now(UTC) < past:
            time.sleep(0.1)
        assert hv.fs_freeze_status(agent_vm, 10) == "frozen"
        assert vmkeep("vm", "show", agent_vm, "--json").json()["lcm_state"] == "QUIESCED"
        assert "auto-unquiesced" not in (log.read_text() if log.exists() else "")
    finally:
        vmkeep("vm", "unquiesce", agent_vm, check=None)
    assert hv.fs_freeze_status(agent_vm, 10) == "thawed"
