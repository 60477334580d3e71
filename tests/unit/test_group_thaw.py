"""The group thaw keeps going when one member cannot be thawed (logic only; e2e covers the rest)."""

from __future__ import annotations

import pytest

from vmkeep.engine.groups.backup import MemberFailed, _thaw
from vmkeep.engine.groups.records import Timing
from vmkeep.engine.protect.member import MemberJob
from vmkeep.engine.vm import quiesce
from vmkeep.errors import HypervisorError


def _job(name: str) -> MemberJob:
    return MemberJob(vm_id=0, name=name, ds_id=0, cfg=None, disks=[], offline=False, driver=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("parallel", [False, True])
def test_a_failing_thaw_does_not_leave_the_others_frozen(
    parallel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quiesce.time, "sleep", lambda _s: None)  # retry back-off
    monkeypatch.setattr(quiesce, "spawn", lambda *_a, **_k: None)  # no guard process in a unit test
    thawed: list[str] = []

    def undo(name: str):  # type: ignore[no-untyped-def]
        def run() -> None:
            if name == "vm3":
                raise HypervisorError("agent gone")
            thawed.append(name)

        return run

    frozen = [(_job(n), undo(n)) for n in ("vm1", "vm2", "vm3")]
    timing = Timing()
    with pytest.raises(MemberFailed) as exc:
        _thaw(None, frozen, parallel, timing, report=True)  # type: ignore[arg-type]
    assert exc.value.vm == "vm3"
    assert sorted(thawed) == ["vm1", "vm2"]
    if not parallel:
        assert thawed == ["vm2", "vm1"]  # reverse order, past the failure
    assert set(timing.thawed) == {"vm1", "vm2", "vm3"}
