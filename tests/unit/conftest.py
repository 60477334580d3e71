"""Unit-test fixtures shared by modules."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from vmkeep.config import load_config
from vmkeep.engine.core.context import Context
from vmkeep.hypervisor.fake import FakeHypervisor


@pytest.fixture
def fake_ctx(clean_env: Path) -> Context:
    """An engine Context on a fresh catalog with the FakeHypervisor in place of libvirt."""
    return Context(load_config(), _hv=FakeHypervisor())


CliRun = Callable[..., tuple[int, str]]


@pytest.fixture
def cli_on(monkeypatch: pytest.MonkeyPatch) -> Callable[..., CliRun]:
    """``cli_on(ctx, *modules)``: a function running ``vmkeep ARGS`` in-process on ``ctx`` (the
    command modules given and ``cli/output`` take it for their ``ctx_of``; no daemon asked);
    each call returns (exit code, output and error text)."""
    from click.testing import CliRunner

    from vmkeep.cli import output
    from vmkeep.cli.main import cli

    def on(ctx: Context, *modules: ModuleType) -> CliRun:
        monkeypatch.setenv("VMKEEP_NO_DAEMON", "1")
        for module in (output, *modules):
            monkeypatch.setattr(module, "ctx_of", lambda _c: ctx)

        def run(*args: str) -> tuple[int, str]:
            result = CliRunner().invoke(cli, list(args))
            if result.exception and not isinstance(result.exception, SystemExit):
                code = getattr(result.exception, "exit_code", 99)
                return code, f"{result.output}{result.exception}"
            return result.exit_code, result.output

        return run

    return on
