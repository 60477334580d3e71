"""Where a backup is staged (real folders and modes; no VM): in a ``dir`` datastore that QEMU, an
unprivileged user, can reach (storing is then a rename), else in vmkeep's data dir."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from vmkeep.datastores.dir import STAGING, DirDriver
from vmkeep.engine.protect.staging import prepare_staging
from vmkeep.engine.vm.recovery import staging_dirs
from vmkeep.hypervisor.reach import can_search, qemu_ids

PLAN = SimpleNamespace(backup_id=7, seq=2)


@pytest.fixture
def base() -> Iterator[Path]:
    # not under /tmp/pytest-of-root (0700): QEMU's reach is what is tested
    d = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="vmkeep-staging-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def _ctx(base: Path) -> SimpleNamespace:
    # no hypervisor: QEMU's user and group come from qemu.conf (hypervisor/reach.py)
    return SimpleNamespace(config=SimpleNamespace(data_dir=base / "data"), hv=None)


def test_staged_in_the_datastore_when_qemu_reaches_it(base: Path) -> None:
    driver = DirDriver("ds", {"path": str(base / "ds")})
    staging = prepare_staging(_ctx(base), driver, PLAN)  # type: ignore[arg-type]
    assert staging == base / "ds" / STAGING / "7-2"
    ids = qemu_ids()
    assert ids is not None and can_search(staging, ids) and can_search(staging.parent, ids)
    assert driver.chains() == []  # the staging folder is no chain


def test_under_umask_077_staging_is_opened_to_qemus_group_alone(base: Path) -> None:
    """vmkeep's folders are 0700 (umask 077): the staging folders and the datastore's own folder
    get QEMU's group and its search bit, never a world bit; the folder above is left alone."""
    ids = qemu_ids()
    assert ids is not None
    old = os.umask(0o077)
    try:
        driver = DirDriver("ds", {"path": str(base / "ds")})
        driver.check()  # vmkeep makes the datastore's folder: 0700
        assert stat_mode(base / "ds") == 0o700
        staging = prepare_staging(_ctx(base), driver, PLAN)  # type: ignore[arg-type]
    finally:
        os.umask(old)
    assert staging == base / "ds" / STAGING / "7-2"
    for folder in (staging, staging.parent, base / "ds"):
        st = folder.stat()
        assert (stat_mode(folder), st.st_gid) == (0o710, ids.gid), folder
    assert stat_mode(base) == 0o755 and base.stat().st_gid == 0  # above the datastore: as it was


def test_staged_in_the_data_dir_when_the_datastore_is_closed_to_qemu(base: Path) -> None:
    closed = base / "closed"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    driver = DirDriver("ds", {"path": str(closed / "ds")})
    staging = prepare_staging(_ctx(base), driver, PLAN)  # type: ignore[arg-type]
    assert staging == base / "data" / "staging" / "7-2"
    assert not (closed / "ds" / STAGING).exists()  # tried, then removed
    assert stat_mode(closed) == 0o700  # vmkeep opens no folder of the user's


def test_stage_in_data_dir_option(base: Path) -> None:
    driver = DirDriver("ds", {"path": str(base / "ds"), "stage_in_data_dir": "true"})
    staging = prepare_staging(_ctx(base), driver, PLAN)  # type: ignore[arg-type]
    assert staging == base / "data" / "staging" / "7-2"
    assert staging_dirs(_ctx(base), driver, 7, 2) == [staging]  # type: ignore[arg-type]


def stat_mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


def test_a_datastore_inside_the_data_dir_stages_in_itself(base: Path) -> None:
    """The demo's layout (``<data dir>/datastores/demo``): every folder from the data dir down is
    vmkeep's, so all are opened to QEMU's group and storing stays a rename."""
    ids = qemu_ids()
    assert ids is not None
    old = os.umask(0o077)
    try:
        driver = DirDriver("ds", {"path": str(base / "data" / "datastores" / "demo")})
        driver.check()
        staging = prepare_staging(_ctx(base), driver, PLAN)  # type: ignore[arg-type]
    finally:
        os.umask(old)
    assert staging == base / "data" / "datastores" / "demo" / STAGING / "7-2"
    for folder in (base / "data", base / "data" / "datastores"):
        assert (stat_mode(folder), folder.stat().st_gid) == (0o710, ids.gid), folder
