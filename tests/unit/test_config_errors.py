"""Config errors name the file or the environment variable that holds the bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmkeep.catalog import Catalog
from vmkeep.config import load_config
from vmkeep.errors import CatalogError, ConfigError


def test_bad_env_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(environ={"VMKEEP_AGENT_TIMEOUT": "abc", "VMKEEP_DATA_DIR": str(tmp_path)})
    assert "environment variable VMKEEP_AGENT_TIMEOUT" in str(exc.value)
    assert "'abc'" in str(exc.value)


def test_bad_file_value_names_the_file_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("version = 1\n[agent]\ntimeout = 'abc'\n")
    with pytest.raises(ConfigError, match=r"c.toml: agent.timeout"):
        load_config(cfg, environ={"VMKEEP_DATA_DIR": str(tmp_path)})


def test_config_that_is_not_utf8(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_bytes(b"version = 1\n\xff\xfe = 1\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(cfg, environ={})


def test_data_dir_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    for data_dir in (f, f / "sub"):
        with pytest.raises(ConfigError, match="is a file"):
            load_config(environ={"VMKEEP_DATA_DIR": str(data_dir)})


def test_data_dir_under_proc(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="kernel file system"):
        load_config(environ={"VMKEEP_DATA_DIR": "/proc/vmkeep"})


@pytest.mark.parametrize("where", ["file", "proc"])
def test_catalog_under_a_file_or_proc(tmp_path: Path, where: str) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    path = f / "c.db" if where == "file" else Path("/proc/vmkeep/c.db")
    with pytest.raises(CatalogError, match="set \\[catalog\\] url"):
        Catalog(f"sqlite:///{path}")
