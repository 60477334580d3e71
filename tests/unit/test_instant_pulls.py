"""An instant restore copies its disks into their overlays one at a time: QEMU 7.2 crashed when
the block pulls of two disks ran and ended close together (tests/e2e/test_restore_promises.py,
instant restore from a remote store). The progress adds up over the disks."""

from __future__ import annotations

from types import SimpleNamespace

from vmkeep.engine.restore import instant


class Pulls:
    """libvirt's block pull as the engine sees it: each disk's job runs for two polls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.polls: dict[str, int] = {}

    def block_pull(self, name: str, target: str, bandwidth_mib: int = 0) -> None:
        assert not [d for d, n in self.polls.items() if n < 2], "a pull is still running"
        self.calls.append(("pull", target))
        self.polls[target] = 0

    def block_job(self, name: str, target: str) -> tuple[int, int] | None:
        self.calls.append(("job", target))
        if target not in self.polls or self.polls[target] >= 2:
            return None
        self.polls[target] += 1
        return self.polls[target] * 50, 100


def test_disks_are_pulled_one_after_the_other(monkeypatch) -> None:
    monkeypatch.setattr(instant, "POLL", 0)
    hv = Pulls()
    seen: list[tuple[int, int]] = []
    last = instant.pull_disks(
        SimpleNamespace(hv=hv), "vm", ["vda", "vdb"], 0, lambda d, t: seen.append((d, t))
    )
    assert [c for c in hv.calls if c[0] == "pull"] == [("pull", "vda"), ("pull", "vdb")]
    first_vdb = hv.calls.index(("pull", "vdb"))
    assert all(t == "vda" for _k, t in hv.calls[:first_vdb])  # vda's job had ended before
    assert last == {"vda": (100, 100), "vdb": (100, 100)}
    assert seen[-1] == (200, 200) and seen == sorted(seen)  # over both disks, never backwards
