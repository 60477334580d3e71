"""The lifecycle's table, the docs generated from it, and the exec driver's argument and poll
parsing (no hypervisor needed)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from vmkeep.engine.core import states
from vmkeep.errors import InvalidValue
from vmkeep.hypervisor.vmm import ACTIONS, DiskSpec, parse_poll
from vmkeep.hypervisor.vmm_exec import drv_action, parse_args
from vmkeep.model import LcmState

ROOT = Path(__file__).parents[2]


def test_docs_table_matches_the_rules() -> None:
    doc = (ROOT / "docs" / "lifecycle.md").read_text()
    assert states.table_markdown() in doc, "regenerate: python scripts/regen_lifecycle.py"


def test_rules_name_real_states_and_cover_the_dispatch_manager_actions() -> None:
    wanted = {"create", "deploy", "hold", "release", "poweroff", "reboot", "suspend", "resume",
              "stop", "undeploy", "terminate", "snapshot-create", "snapshot-revert",
              "snapshot-delete", "disk-snapshot-create", "disk-snapshot-revert",
              "disk-snapshot-delete", "disk-attach", "disk-detach", "nic-attach", "nic-detach",
              "resize", "disk-resize", "recover", "migrate"}  # fmt: skip
    assert wanted <= set(states.RULES)
    assert states.RULES["migrate"].supported
    for name, rule in states.RULES.items():
        assert all(isinstance(s, LcmState) for s in rule.needs), name
        assert rule.through is None or rule.through in states.TRANSIENT | {
            LcmState.BACKUP, LcmState.QUIESCING, LcmState.UNQUIESCING, LcmState.RESTORE
        }, name  # fmt: skip
    # nothing but backup cancel may act on a VM while a backup or quiesce holds it
    busy = {LcmState.BACKUP, LcmState.BACKUP_POWEROFF, LcmState.QUIESCED, LcmState.RESTORE}
    assert all(not (rule.needs & busy) for a, rule in states.RULES.items() if a != "unquiesce")
    # every driver-level name in the table is an action of the exec protocol
    for rule in states.RULES.values():
        for vmm in filter(None, (p.strip() for p in rule.vmm.split("|"))):
            assert vmm in ACTIONS, vmm


def test_exec_driver_arguments() -> None:
    a = parse_args("-r 2 -t 3 -l poll,deploy=deploy_flaky")
    assert (a.retries, a.threads) == (2, 3)
    assert a.local == {"poll": "poll", "deploy": "deploy_flaky"}
    assert parse_args("") == parse_args("-r 0 -t 15")
    for bad in ("-r x", "-t 0", "-l nosuch", "-q 1", "-r"):
        with pytest.raises(InvalidValue):
            parse_args(bad)


def test_poll_output_and_drv_action() -> None:
    rec = parse_poll("STATE=a CPU=12.5 MEMORY=554632 DISK_SIZE=[ ID=0, SIZE=24 ] NETRX=10")
    assert rec["STATE"] == "a" and rec["CPU"] == "12.5" and rec["NETRX"] == "10"
    assert rec["DISK_SIZE"].startswith("[") and "SIZE=24" in rec["DISK_SIZE"]
    xml = base64.b64decode(drv_action(DiskSpec("/i/d.qcow2", "vdb", 1, "qcow2"))).decode()
    assert "<ATTACH>YES</ATTACH>" in xml and "<DRIVER>qcow2</DRIVER>" in xml
    assert "<SOURCE>/i/d.qcow2</SOURCE>" in xml and xml.startswith("<VMM_DRIVER_ACTION_DATA>")


def test_shipped_virsh_driver_has_every_action() -> None:
    folder = ROOT / "drivers" / "exec" / "virsh"
    for action in ACTIONS:
        script = folder / action
        assert script.is_file() and script.stat().st_mode & 0o111, action
