"""SIGKILL of vmkeep at each phase of a backup: the guard recovers the VM at once, with no command
run; every earlier point still restores bit-identical; the next backup is VALID."""

from __future__ import annotations

import signal

import pytest

from .conftest import Harness

PHASES = ["plan", "freeze", "begin", "copy", "store"]


def test_baseline_chain(harness: Harness) -> None:
    for _ in range(2):
        harness.backup_and_check()
    harness.assert_healthy()


def _kill_at(h: Harness, phase: str) -> None:
    h.write()
    res = h.backup(check=None, extra={"VMKEEP_FAILPOINTS": f"{phase}=kill"})
    assert res.code == -signal.SIGKILL, (res.code, res.err)
    h.wait_recovered()  # by the guard process alone: no vmkeep command in between
    h.assert_healthy()
    h.backup_and_check()
    h.assert_healthy()


@pytest.mark.parametrize("phase", PHASES)
def test_sigkill_at_phase(harness: Harness, phase: str) -> None:
    _kill_at(harness, phase)


def test_every_earlier_point_restores_bit_identical(harness: Harness) -> None:
    assert len(harness.points) >= 7
    for p in harness.points:
        harness.restore_matches(p)


def test_sigkill_while_suspended_resumes_the_vm(harness: Harness) -> None:
    h = harness
    h.run("vm", "config", h.vm, "--fs-freeze", "suspend")
    try:
        h.write()
        res = h.backup(check=None, extra={"VMKEEP_FAILPOINTS": "freeze=kill"})
        assert res.code == -signal.SIGKILL
        h.wait_recovered()
        h.assert_healthy()  # not paused
    finally:
        h.run("vm", "config", h.vm, "--fs-freeze", "agent")
    h.backup_and_check()


def test_sigkill_during_retention_merge(harness: Harness) -> None:
    """Killed while merging old increments: the merge is rolled back, the chain stays whole."""
    harness.run("vm", "config", harness.vm, "--keep-last", "2")
    _kill_at(harness, "retention")
    shown = {
        b["id"]: {i["id"] for i in b["increments"] if i["status"] == "VALID"}
        for b in harness.run("backups", "list", "--json").json()
    }
    assert sorted(len(v) for v in shown.values())[-1] == 2  # KEEP_LAST=2 applied after all
    # (the killed run's own point is VALID too but was never printed, so it is not recorded)
    kept = [p for p in harness.points if p.increment in shown.get(p.backup, set())]
    assert len(kept) == 1
    for p in kept:
        harness.restore_matches(p)
