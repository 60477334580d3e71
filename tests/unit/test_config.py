from pathlib import Path

import pytest

from vmkeep.config import load_config
from vmkeep.errors import ConfigError


def test_defaults_without_any_file(tmp_path: Path) -> None:
    cfg = load_config(environ={"VMKEEP_DATA_DIR": str(tmp_path)})
    assert cfg.libvirt.uri == "qemu:///system"
    assert cfg.catalog_url == f"sqlite:///{tmp_path / 'catalog.db'}"


def test_file_and_env_override(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('version = 1\n[libvirt]\nuri = "qemu:///session"\n[agent]\ntimeout = 5\n')
    cfg = load_config(f, environ={"VMKEEP_AGENT_TIMEOUT": "7"})
    assert cfg.libvirt.uri == "qemu:///session"
    assert cfg.agent.timeout == 7


def test_bad_key_is_named(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[agent]\ntimeout = -1\n")
    with pytest.raises(ConfigError, match=r"agent\.timeout"):
        load_config(f, environ={})


def test_unknown_key_is_named(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[libvirt]\nurl = 'x'\n")
    with pytest.raises(ConfigError, match=r"libvirt\.url"):
        load_config(f, environ={})


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})


def test_wrong_version(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("version = 9\n")
    with pytest.raises(ConfigError, match="version"):
        load_config(f, environ={})


def test_a_heartbeat_slower_than_silence_is_refused_with_the_fix(tmp_path: Path) -> None:
    """A daemon that beats every 60 s looks silent after 30: refused at load, naming both."""
    env = {"VMKEEP_DATA_DIR": str(tmp_path), "VMKEEP_CLUSTER_HEARTBEAT_INTERVAL": "60"}
    with pytest.raises(ConfigError, match=r"cluster.*below silent_after \(30 s\).*lower"):
        load_config(environ=env)
    cfg = load_config(environ=env | {"VMKEEP_CLUSTER_SILENT_AFTER": "90"})
    assert (cfg.cluster.heartbeat_interval, cfg.cluster.silent_after) == (60, 90)
