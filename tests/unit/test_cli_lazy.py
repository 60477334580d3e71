"""``vmkeep vm`` loads its lifecycle commands (and with them the VMM drivers) only when one is
used or listed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from vmkeep.cli import lifecycle_cmd, vm_cmd
from vmkeep.cli.main import cli


def test_vm_lists_every_lifecycle_command() -> None:
    assert sorted(vm_cmd.LIFECYCLE) == sorted(lifecycle_cmd.COMMANDS)
    out = CliRunner().invoke(cli, ["vm", "--help"]).output
    listed = {line.split()[0] for line in out.split("Commands:")[1].splitlines() if line.strip()}
    assert set(lifecycle_cmd.COMMANDS) | {"list", "show", "import", "config"} <= listed


def test_vm_commands_do_not_import_the_lifecycle() -> None:
    code = (
        "import sys; import vmkeep.cli.vm_cmd; "
        "print(sorted(m for m in sys.modules if 'lifecycle' in m or m == 'libvirt'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _modules_loaded(argv: list[str], env_dir: str) -> tuple[set[str], str]:
    """The modules a whole ``vmkeep ARGV`` process imported (printed at exit), and its stdout."""
    code = (
        "import atexit, sys; "
        "atexit.register(lambda: print(*sorted(sys.modules), sep='\\n', file=sys.stderr)); "
        f"from vmkeep.cli.main import main; main({argv!r})"
    )
    Path(env_dir, "c.toml").write_text("version = 1\n")
    env = {
        "PATH": "/usr/bin:/bin",
        "VMKEEP_DATA_DIR": env_dir,
        "VMKEEP_CONFIG": f"{env_dir}/c.toml",
        **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"},
    }
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stderr.split()), proc.stdout


def test_version_loads_no_config_catalog_or_libraries(tmp_path) -> None:  # type: ignore[no-untyped-def]
    mods, out = _modules_loaded(["--version"], str(tmp_path))
    assert out.startswith("vmkeep, version ")
    heavy = {"sqlalchemy", "pydantic", "rich", "libvirt", "vmkeep.config", "importlib.metadata"}
    heavy |= {"vmkeep.cli.complete", "click.shell_completion"}  # shell completion: only on Tab
    assert not heavy & mods


def test_backups_list_loads_only_what_listing_needs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    mods, out = _modules_loaded(["backups", "list", "--json"], str(tmp_path))
    assert out.strip() == "[]"
    assert "sqlalchemy" in mods  # it does read the catalog
    unneeded = {
        "rich",
        "libvirt",
        "fastapi",
        "vmkeep.engine.restore.point",
        "vmkeep.engine.points.copy",
        "vmkeep.engine.points.delete",
        "vmkeep.engine.points.scan",
        "vmkeep.engine.core.refs",
        "click.shell_completion",
    }
    assert not unneeded & mods, unneeded & mods


def test_completion_callbacks_import_nothing_a_command_does_not_already() -> None:
    """Every command module imports ``cli/complete.py`` for its ``shell_complete=`` callbacks:
    that may cost no module beyond itself (what they need is imported on Tab only)."""
    code = (
        "import sys; import vmkeep.cli.output; before = set(sys.modules); "
        "import vmkeep.cli.complete; print(*sorted(set(sys.modules) - before))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["vmkeep.cli.complete"]
