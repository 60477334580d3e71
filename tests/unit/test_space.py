"""The free-space pre-check names the place that is short: staging area or datastore."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from vmkeep.engine.core import space
from vmkeep.errors import DatastoreError, InsufficientSpace


class FakeDriver:
    capabilities: frozenset[str] = frozenset()

    def __init__(
        self, root: Path | None, free: int, fail: bool = False, staging: Path | None = None
    ) -> None:
        self.name, self.root, self.free, self.fail = "ds", root, free, fail
        self.staging = staging

    def staging_root(self) -> Path | None:
        return self.staging

    def monitor(self) -> tuple[int, int]:
        if self.fail:
            raise DatastoreError(self.name, "unreachable")
        return 10 * self.free, self.free


def _statvfs(free: int) -> Any:
    class St:
        f_bavail, f_frsize = free, 1

    return lambda _p: St()


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    d = tmp_path / "data" / "staging" / "1-0"
    d.mkdir(parents=True)
    return d


def test_staging_short(staging: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(space.os, "statvfs", _statvfs(100))
    with pytest.raises(InsufficientSpace, match="staging area .* not the datastore") as exc:
        space.check(None, FakeDriver(None, 10**9), staging, 1000)  # type: ignore[arg-type]
    assert exc.value.exit_code == 21


def test_datastore_short_on_another_file_system(
    staging: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(space.os, "statvfs", _statvfs(10**9))
    with pytest.raises(InsufficientSpace, match="datastore 'ds'"):
        space.check(None, FakeDriver(None, 100), staging, 1000)  # type: ignore[arg-type]


def test_same_file_system_needs_the_space_once(
    staging: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(space.os, "statvfs", _statvfs(1500))
    root = tmp_path / "ds"
    root.mkdir()
    assert os.stat(root).st_dev == os.stat(staging).st_dev
    space.check(None, FakeDriver(root, 1500), staging, 1000)  # type: ignore[arg-type]


def test_unknown_estimate_or_unreachable_datastore_is_not_refused(
    staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(space.os, "statvfs", _statvfs(10**9))
    space.check(None, FakeDriver(None, 0), staging, None)  # type: ignore[arg-type]
    space.check(None, FakeDriver(None, 0, fail=True), staging, 1000)  # type: ignore[arg-type]


def test_human_sizes() -> None:
    assert space.human(512) == "512 B"
    assert space.human(3 << 30) == "3.0 GiB"


def test_a_deduplicating_datastore_is_not_refused_on_raw_size(
    staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(space.os, "statvfs", _statvfs(10**9))
    drv = FakeDriver(None, 100)
    with pytest.raises(InsufficientSpace):
        space.check(None, drv, staging, 1000)  # type: ignore[arg-type]
    drv.capabilities = frozenset({"dedup"})  # restic stores only what it has not seen
    space.check(None, drv, staging, 1000)  # type: ignore[arg-type]


def test_staged_in_the_datastore_a_shortage_is_the_datastore_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "ds"
    staging = root / ".vmkeep-staging" / "1-0"
    staging.mkdir(parents=True)
    monkeypatch.setattr(space.os, "statvfs", _statvfs(100))
    driver = FakeDriver(root, 100, staging=staging.parent)
    with pytest.raises(InsufficientSpace, match="datastore 'ds'") as exc:
        space.check(None, driver, staging, 1000)  # type: ignore[arg-type]
    assert "staging" not in str(exc.value)
    monkeypatch.setattr(space.os, "statvfs", _statvfs(1500))
    space.check(None, driver, staging, 1000)  # type: ignore[arg-type]  # needed once: fits
