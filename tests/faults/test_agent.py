"""A hung guest agent (qemu-ga stopped with SIGSTOP in the guest, resumed later) must never leave the
guest frozen: a freeze that timed out runs when the agent wakes, and the guard thaws it then."""

from __future__ import annotations

import time
import uuid

from .conftest import Harness

PAUSE = 15  # seconds the agent stays stopped


def _frozen_then_thawed_by_guard(h: Harness, tag: str) -> None:
    """After the agent resumed, the guest must end (and stay) thawed, and the guard must say it
    thawed a delayed freeze (proof that the queued freeze did run in the guest)."""
    h.wait_console(f"{tag} resumed", timeout=PAUSE + 90)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        log = (h.data / "watchdog.log").read_text()
        if "thawed (confirmed)" in log or "guest-fsfreeze-status is thawed" in log:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the guard never confirmed a thaw:\n" + log[-3000:])
    for _ in range(5):  # stays thawed: asked five times over a few seconds
        assert h.freeze_status() == "thawed"
        time.sleep(1)


def test_agent_stopped_before_the_freeze(harness: Harness) -> None:
    """`vmkeep backup VM -d DS` with a hung agent: exit 1 (a warning), a CRASH-consistent VALID
    point, and the guest thawed by the guard once the agent wakes."""
    h = harness
    h.backup_and_check()
    h.write()
    (h.data / "watchdog.log").write_text("")
    tag = h.agent_pause(seconds=PAUSE)
    h.wait_console(f"{tag} stopped")
    res = h.backup(check=1)  # finished with a warning
    assert "hung" in res.err and "did not answer" in res.err, res.err
    assert "Install and start qemu-guest-agent" not in res.err  # not "missing agent"
    data = res.json()
    assert data["status"] == "VALID"
    assert data["increments"][-1]["consistency"] == "CRASH"
    h.record(res)
    _frozen_then_thawed_by_guard(h, tag)
    assert "thawed (confirmed)" in (h.data / "watchdog.log").read_text()
    h.assert_healthy()
    h.backup_and_check()


def test_agent_stopped_while_frozen(harness: Harness) -> None:
    """`vmkeep backup VM -d DS`: the agent stops after the freeze: the thaw times out; the backup is still VALID (its point
    was taken while frozen), and the queued thaw or the guard thaws the guest."""
    h = harness
    h.write()
    (h.data / "watchdog.log").write_text("")
    # In the guest: wait until /mnt/vda is frozen (a write blocks), then stop the agent.
    tag = f"vmkeep-test-agent-{uuid.uuid4().hex[:8]}"
    h.lab.sh(
        h.vm,
        "(while true; do touch /mnt/vda/.probe & p=$!; sleep 0.3; "
        "if kill -0 $p 2>/dev/null; then kill -STOP $(cat /run/qemu-ga.pid); "
        f"sleep {PAUSE}; kill -CONT $(cat /run/qemu-ga.pid); echo '{tag} resumed' >/dev/console; "
        "exit; fi; done) </dev/null >/dev/null 2>&1 &",
    )
    res = h.backup(check=1, extra={"VMKEEP_FAILPOINTS": "freeze=sleep:3"})
    assert "could not thaw" in res.err and "guard" in res.err, res.err
    data = res.json()
    assert data["status"] == "VALID"
    assert data["increments"][-1]["consistency"] == "AGENT_FROZEN"
    h.record(res)
    _frozen_then_thawed_by_guard(h, tag)
    h.assert_healthy()
    h.restore_matches(h.points[-1])
    h.backup_and_check()


def test_group_backup_with_a_hung_agent_fails_and_the_guest_ends_thawed(
    harness: Harness,
) -> None:
    """`vmkeep group create`, `vmkeep group backup` with the member's agent hung: exit 20, the
    guest thawed by the guard; the next group backup is VALID."""
    h = harness
    h.run("group", "create", "g", h.vm)
    h.write()
    (h.data / "watchdog.log").write_text("")
    tag = h.agent_pause(seconds=PAUSE)
    h.wait_console(f"{tag} stopped")
    res = h.run("group", "backup", "g", "-d", "ds", check=20)
    assert "did not answer" in res.err, res.err
    _frozen_then_thawed_by_guard(h, tag)
    h.assert_healthy()
    ok = h.run("group", "backup", "g", "-d", "ds", "--json").json()
    assert ok["status"] == "VALID"
    h.backup_and_check()
    for p in h.points:
        h.restore_matches(p)
