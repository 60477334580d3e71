"""The group cut's order (logic only; tests/e2e/test_group.py runs it on real guests): each
member's backupBegin starts as soon as that member is frozen, and no member thaws before every
member is frozen and every backupBegin has returned."""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext
from types import SimpleNamespace

import pytest

from vmkeep.engine.groups import backup as group_backup
from vmkeep.engine.groups.backup import MemberFailed, _cut
from vmkeep.engine.groups.records import Timing
from vmkeep.engine.protect.member import MemberJob
from vmkeep.errors import AgentUnavailable
from vmkeep.model import Consistency, FsFreeze, Warnings

VMS = ("vm1", "vm2", "vm3")
STEP = 0.05  # seconds a freeze or a backupBegin takes here


def _job(name: str) -> MemberJob:
    cfg = SimpleNamespace(fs_freeze=FsFreeze.AGENT)
    return MemberJob(VMS.index(name), name, 0, cfg, [], offline=False, driver=None)  # type: ignore[arg-type]


class Recorder:
    def __init__(self, failing_freeze: str | None = None) -> None:
        self.events: list[tuple[float, str, str]] = []
        self.lock = threading.Lock()
        self.failing_freeze = failing_freeze

    def log(self, what: str, vm: str) -> None:
        with self.lock:
            self.events.append((time.monotonic(), what, vm))

    def at(self, what: str, vm: str) -> float:
        return next(t for t, w, v in self.events if (w, v) == (what, vm))

    def all(self, what: str) -> list[tuple[float, str]]:
        return [(t, v) for t, w, v in self.events if w == what]

    def freeze_guest(self, _ctx, _vm_id, name, _mode):  # type: ignore[no-untyped-def]
        self.log("freeze", name)
        time.sleep(STEP)
        if name == self.failing_freeze:
            raise AgentUnavailable(name)
        self.log("frozen", name)
        return Consistency.AGENT_FROZEN, lambda: self.log("thaw", name)

    def begin_job(self, _ctx, job, _mode, _warnings):  # type: ignore[no-untyped-def]
        self.log("begin", job.name)
        time.sleep(STEP)
        self.log("begun", job.name)


@pytest.fixture
def rec(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Recorder:
    r = Recorder(getattr(request, "param", None))
    monkeypatch.setattr(group_backup, "freeze_guest", r.freeze_guest)
    monkeypatch.setattr(group_backup, "begin_job", r.begin_job)
    monkeypatch.setattr(group_backup, "freeze_intent", lambda _ctx, _ids: nullcontext())
    return r


@pytest.mark.parametrize("parallel", [False, True])
def test_no_member_thaws_before_all_are_frozen_and_begun(rec: Recorder, parallel: bool) -> None:
    _cut(None, [_job(v) for v in VMS], parallel, Timing(), Warnings())  # type: ignore[arg-type]
    first_thaw = min(t for t, _ in rec.all("thaw"))
    assert all(t <= first_thaw for t, _ in rec.all("frozen") + rec.all("begun"))
    assert {v for _, v in rec.all("thaw")} == set(VMS)
    for vm in VMS:  # a member's cut is taken while it is frozen
        assert rec.at("frozen", vm) <= rec.at("begin", vm)
    if parallel:  # all freezes under way at once
        assert max(t for t, _ in rec.all("freeze")) < min(t for t, _ in rec.all("frozen"))
    else:
        assert [v for _, v in rec.all("freeze")] == list(VMS)
        assert [v for _, v in rec.all("thaw")] == list(reversed(VMS))
        # the first member's backupBegin runs while the next member freezes
        assert rec.at("begin", "vm1") < rec.at("frozen", "vm2")


@pytest.mark.parametrize("rec", ["vm2"], indirect=True)
def test_a_member_that_cannot_freeze_stops_the_cut_and_thaws_the_frozen(rec: Recorder) -> None:
    with pytest.raises(MemberFailed) as exc:
        _cut(None, [_job(v) for v in VMS], False, Timing(), Warnings())  # type: ignore[arg-type]
    assert exc.value.vm == "vm2"
    assert [v for _, v in rec.all("freeze")] == ["vm1", "vm2"]  # vm3 never frozen
    assert [v for _, v in rec.all("thaw")] == ["vm1"]
    assert rec.at("begun", "vm1") <= rec.at("thaw", "vm1")  # its backupBegin had returned
