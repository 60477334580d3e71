"""``vmkeep vm`` loads its lifecycle commands (and with them the VMM drivers) only when one is
used or listed."""

from __future__ import annotations

import subprocess
import sys

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
