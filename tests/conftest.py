"""Shared fixtures: every test runs with isolated VMKEEP_* variables, HOME and catalog (borg clean_env)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


@pytest.fixture(autouse=True)
def keep_umask() -> Iterator[None]:
    """A test that calls the CLI's ``main()`` in-process sets the umask to 077 (as vmkeep does):
    give the worker its own back, so the next test's fixtures make folders as before."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


@pytest.fixture
def updated_rows() -> Callable[[Any], list[Any]]:
    """``updated_rows(engine)``: a list that from now on gets one entry (its parameters) per row
    an UPDATE statement on ``engine`` writes, for tests that a read writes nothing."""

    def watch(engine: Any) -> list[Any]:
        from sqlalchemy import event

        rows: list[Any] = []

        def noted(_c: Any, _cur: Any, sql: str, params: Any, _ctx: Any, many: bool) -> None:
            if sql.startswith("UPDATE"):
                rows.extend(params if many else [params])

        event.listen(engine, "before_cursor_execute", noted)
        return rows

    return watch
