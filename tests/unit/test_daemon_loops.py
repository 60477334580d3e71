"""The daemon's loops never die: a step that raises an unexpected error is logged with its
traceback and the loop goes on (the monitor thread once died on a VM migrated away while it was
polled, and the VMs of a fallen host then never became UNKNOWN); the native driver's poll of a
domain that goes away between its two samples says it is gone."""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace
from typing import Any

import libvirt
import pytest

from vmkeep.api import daemon
from vmkeep.hypervisor.vmm_native import NativeVmm


def test_the_monitor_loop_logs_a_failing_step_and_runs_the_others_and_the_next_round(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []
    stop = threading.Event()

    def boom(ctx: Any) -> None:
        calls.append("poll")
        raise IndexError("list index out of range")

    def sweep(ctx: Any) -> None:
        calls.append("sweep")
        if calls.count("sweep") == 2:
            stop.set()

    monkeypatch.setattr(daemon, "_hosts", lambda ctx: calls.append("hosts"))
    monkeypatch.setattr(daemon, "_poll", boom)
    monkeypatch.setattr(daemon, "_sweep", sweep)
    monkeypatch.setattr(daemon, "Context", lambda config: SimpleNamespace())
    config = SimpleNamespace(monitor=SimpleNamespace(interval=0))
    with caplog.at_level(logging.ERROR):
        daemon._monitor(config, stop)  # type: ignore[arg-type]
    assert calls == ["hosts", "poll", "sweep"] * 2
    failed = [r for r in caplog.records if "monitor loop: poll failed" in r.getMessage()]
    assert len(failed) == 2 and failed[0].exc_info is not None


class _Dom:
    def state(self) -> tuple[int, int]:
        return libvirt.VIR_DOMAIN_RUNNING, 1


class _Conn:
    def __init__(self, samples: list[list[Any]]) -> None:
        self.samples = samples

    def lookupByName(self, name: str) -> _Dom:  # noqa: N802 - libvirt's name
        return _Dom()

    def domainListGetStats(self, doms: list[_Dom], stats: int, flags: int) -> list[Any]:  # noqa: N802
        return self.samples.pop(0)


def test_a_domain_gone_between_the_two_samples_polls_as_gone() -> None:
    dom = _Dom()
    conn = _Conn([[(dom, {"cpu.time": 10})], []])
    vmm = NativeVmm(SimpleNamespace(conn=conn))  # type: ignore[arg-type]
    assert vmm.poll("moved") == {"STATE": "d"}


def test_a_running_domain_polls_its_figures() -> None:
    dom = _Dom()
    conn = _Conn([[(dom, {"cpu.time": 0})], [(dom, {"cpu.time": 10**8, "balloon.rss": 5})]])
    vmm = NativeVmm(SimpleNamespace(conn=conn))  # type: ignore[arg-type]
    got = vmm.poll("here")
    assert got["STATE"] == "a" and got["MEMORY"] == "5" and float(got["CPU"]) > 0
