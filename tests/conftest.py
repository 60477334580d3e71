"""Shared fixtures: every test runs with isolated VMKEEP_* variables, HOME and catalog (borg clean_env)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in list(os.environ):
        if key.startswith("VMKEEP_"):
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local/share"))
    data = tmp_path / "data"
    monkeypatch.setenv("VMKEEP_DATA_DIR", str(data))
    # root's default config is /etc/vmkeep/config.toml: never read the machine's own config
    config = home / "config.toml"
    config.write_text("version = 1\n")
    monkeypatch.setenv("VMKEEP_CONFIG", str(config))
    return data
