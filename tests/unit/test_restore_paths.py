"""Where a restore writes: checked before any data moves; never silently overwrites."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmkeep.datastores.dir import DirDriver
from vmkeep.engine.restore.point import disk_destination, vm_folder
from vmkeep.errors import AlreadyExists, InvalidValue


def test_disk_to_a_new_file(tmp_path: Path) -> None:
    assert disk_destination(str(tmp_path / "a.qcow2"), tmp_path / "d.qcow2", False) == (
        tmp_path / "a.qcow2"
    )


def test_disk_to_an_existing_file_needs_force(tmp_path: Path) -> None:
    f = tmp_path / "a.qcow2"
    f.write_text("keep me")
    with pytest.raises(AlreadyExists, match="--force"):
        disk_destination(str(f), tmp_path / "d.qcow2", False)
    assert disk_destination(str(f), tmp_path / "d.qcow2", True) == f
    assert f.read_text() == "keep me"  # checking writes nothing


def test_trailing_slash_or_existing_folder_means_inside(tmp_path: Path) -> None:
    default = tmp_path / "restores" / "vm-1-0.vda.qcow2"
    assert disk_destination(f"{tmp_path}/newdir/", default, False) == (
        tmp_path / "newdir" / default.name
    )
    assert not (tmp_path / "newdir").exists()  # created only when data is written
    assert disk_destination(str(tmp_path), default, False) == tmp_path / default.name


def test_parent_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InvalidValue, match="is a file, not a folder"):
        disk_destination(str(f / "x.qcow2"), tmp_path / "d.qcow2", False)


def test_relative_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert disk_destination("out.qcow2", tmp_path / "d.qcow2", False) == tmp_path / "out.qcow2"


def test_vm_folder_rules(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InvalidValue, match="is a file"):
        vm_folder(str(f), tmp_path / "default", False)
    full = tmp_path / "full"
    full.mkdir()
    (full / "other").write_text("x")
    with pytest.raises(AlreadyExists, match="not empty"):
        vm_folder(str(full), tmp_path / "default", False)
    assert vm_folder(str(full), tmp_path / "default", True) == full
    assert vm_folder(None, tmp_path / "default", False) == tmp_path / "default"


@pytest.mark.parametrize("bad", ["", "/", "  "])
def test_datastore_path_refused(bad: str) -> None:
    with pytest.raises(InvalidValue):
        DirDriver("ds", {"path": bad})


def test_datastore_path_stored_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert DirDriver("ds", {"path": "rel/backups"}).options.path == tmp_path / "rel" / "backups"
