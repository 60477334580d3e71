"""Data at rest is vmkeep's alone (issue 23, item 4): umask 077 in the CLI and the daemon, a
0700 data dir, a 0600 catalog, 0700 chains of 0600 images, 0600 copies; what QEMU must reach is
opened to QEMU's group alone (``hypervisor/reach.py``), never to every user."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkeep.api import daemon
from vmkeep.catalog.db import Catalog
from vmkeep.config import Config
from vmkeep.datastores.dir import DirDriver
from vmkeep.errors import InvalidValue
from vmkeep.hypervisor.reach import QemuIds, can_search, open_to_qemu, qemu_ids
from vmkeep.paths import private_umask


def mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


@pytest.fixture
def base() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="vmkeep-private-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)  # what the CLI and daemon inherit from a shell
    yield
    os.umask(old)


def test_private_umask() -> None:
    old = os.umask(0o022)
    try:
        private_umask()
        assert os.umask(0o022) == 0o077
    finally:
        os.umask(old)


def test_cli_makes_data_dir_catalog_and_datastore_private(base: Path) -> None:
    """A real CLI run from a shell's umask 022: everything it creates is 0700 / 0600."""
    data, ds = base / "data", base / "ds"
    env = {**os.environ, "VMKEEP_DATA_DIR": str(data), "VMKEEP_CONFIG": str(base / "none.toml")}
    (base / "none.toml").write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "vmkeep.cli.main", "datastore", "add", "ds", "--driver", "dir"]
        + ["--path", str(ds)],
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.umask(0o022),
    )
    assert proc.returncode == 0, proc.stderr
    assert mode(data) == 0o700
    assert mode(data / "catalog.db") == 0o600
    assert mode(ds) == 0o700


def test_daemon_serve_sets_the_umask(umask_022: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve`` sets it itself (the daemon may be started without the CLI's main)."""
    with pytest.raises(InvalidValue):
        daemon.serve(Config(data_dir=Path("/nonexistent")), listen="no port")
    assert os.umask(0o022) == 0o077


def test_catalog_created_0600_and_an_older_one_tightened(base: Path, umask_022: None) -> None:
    Catalog(f"sqlite:///{base / 'new' / 'catalog.db'}")
    assert mode(base / "new") == 0o700 and mode(base / "new" / "catalog.db") == 0o600
    old = base / "old.db"
    Catalog(f"sqlite:///{old}")
    old.chmod(0o644)  # made by an earlier vmkeep
    Catalog(f"sqlite:///{old}")
    assert mode(old) == 0o600


def test_dir_datastore_chain_0700_images_0600(base: Path, umask_022: None) -> None:
    drv = DirDriver("ds", {"path": str(base / "ds")})
    staged = base / "stage"
    staged.mkdir()
    img = staged / "0.vda.qcow2"
    img.write_bytes(b"x")
    img.chmod(0o644)
    drv.backup("vm1/1", [img])
    assert mode(base / "ds" / "vm1") == 0o700 and mode(base / "ds" / "vm1" / "1") == 0o700
    assert mode(base / "ds" / "vm1" / "1" / "0.vda.qcow2") == 0o600


# --- QEMU's way in ---------------------------------------------------------------------------------
@pytest.fixture
def ids() -> QemuIds:
    found = qemu_ids()
    assert found is not None and found.uid != 0, "libvirt's QEMU user (qemu.conf) on this host"
    return found


def test_open_to_qemu_gives_its_group_search_only(base: Path, ids: QemuIds) -> None:
    own = base / "data"
    folder = own / "restores" / "vm"
    old = os.umask(0o077)
    try:
        folder.mkdir(parents=True)
    finally:
        os.umask(old)
    assert not can_search(folder, ids)
    assert open_to_qemu(folder, own, None) is None
    for p in (folder, folder.parent, own):
        assert (mode(p), p.stat().st_gid) == (0o710, ids.gid), p
        assert can_search(p, ids)
    assert mode(base) == 0o755 and base.stat().st_gid == 0  # above vmkeep's folder: untouched


def test_open_to_qemu_reports_a_closed_folder_above_and_leaves_it(base: Path, ids: QemuIds) -> None:
    closed = base / "closed"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    folder = closed / "data" / "x"
    folder.mkdir(parents=True, mode=0o700)
    assert open_to_qemu(folder, closed / "data", None) == closed
    assert mode(closed) == 0o700 and closed.stat().st_gid == 0


def test_open_to_qemu_never_takes_another_groups_folder(base: Path, ids: QemuIds) -> None:
    folder = base / "shared"
    folder.mkdir()
    os.chown(folder, -1, 100)  # e.g. "users", with rights on the folder
    folder.chmod(0o750)
    assert open_to_qemu(folder, folder, None) == folder
    assert (mode(folder), folder.stat().st_gid) == (0o750, 100)


# --- vmkeep mount (item 5) -------------------------------------------------------------------------
def test_mount_options_keep_setuid_devices_and_programs_inert() -> None:
    from vmkeep.engine.restore.export import MOUNT_OPTIONS

    assert set(MOUNT_OPTIONS.split(",")) >= {"ro", "nosuid", "nodev", "noexec"}


def test_a_file_system_type_outside_the_list_is_refused_naming_the_setting() -> None:
    from vmkeep.engine.restore.export import check_fs_type
    from vmkeep.errors import NotPermitted

    assert check_fs_type("ext4", ["ext4", "xfs"]) == "ext4"
    with pytest.raises(NotPermitted, match=r"\[mount\] fs_types") as err:
        check_fs_type("squashfs", ["ext4", "xfs"])
    assert "squashfs" in str(err.value) and err.value.http_status == 403
    with pytest.raises(NotPermitted, match="unrecognised"):
        check_fs_type(None, ["ext4"])


def test_mount_point_0700_inside_a_folder_closed_to_other_users(base: Path) -> None:
    from vmkeep.engine.restore.files import private_mountpoint

    with pytest.raises(InvalidValue, match="other users can reach it"):
        private_mountpoint(base / "mp")  # /var/tmp/x is open to everyone
    assert not (base / "mp").exists()
    closed = base / "closed"
    closed.mkdir(mode=0o700)
    existing = closed / "mp"
    existing.mkdir(mode=0o755)
    existing.chmod(0o755)
    private_mountpoint(existing)
    assert mode(existing) == 0o700
    private_mountpoint(base / "new" / "mp")  # made: 0700 folders
    assert mode(base / "new") == 0o700 and mode(base / "new" / "mp") == 0o700


def test_files_get_copies_are_private(base: Path) -> None:
    from vmkeep.engine.restore.files import _private_copy

    tree = base / "got" / "etc"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub").chmod(0o755)
    (tree / "passwd").write_text("x")
    (tree / "passwd").chmod(0o644)
    (tree / "run.sh").write_text("x")
    (tree / "run.sh").chmod(0o755)
    (tree / "link").symlink_to("/etc/shadow")
    _private_copy(tree)
    assert [mode(tree / n) for n in ("", "sub", "passwd", "run.sh")] == [0o700, 0o700, 0o600, 0o700]
    assert os.readlink(tree / "link") == "/etc/shadow"
