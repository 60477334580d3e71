"""Generated libvirt XML against golden files (virt-manager style). Regenerate with REGOLDEN=1 (the
regenerating run fails; the next one checks)."""

import os
from pathlib import Path

from vmkeep.hypervisor.backup_xml import backup_xml, checkpoint_xml

DATA = Path(__file__).parent / "data"


def golden(name: str, text: str) -> None:
    """``text`` equals the golden file. With REGOLDEN=1 the file is rewritten and the test fails
    (it proved nothing): review the diff, then run again without REGOLDEN."""
    path = DATA / name
    if os.environ.get("REGOLDEN"):
        path.write_text(text)
        raise AssertionError(f"{path} regenerated: review 'git diff', then run without REGOLDEN")
    assert text == path.read_text()


def test_full_backup_xml() -> None:
    golden("backup-full.xml", backup_xml({"vda": "/s/0.vda.qcow2", "vdb": "/s/0.vdb.qcow2"}))


def test_incremental_backup_xml() -> None:
    golden("backup-inc.xml", backup_xml({"vda": "/s/3.vda.qcow2"}, incremental="vmkeep-1-2"))


def test_backup_xml_takes_a_full_disk_beside_incremental_ones() -> None:
    golden(
        "backup-inc-joined.xml",
        backup_xml(
            {"vda": "/s/4.vda.qcow2", "vdb": "/s/4.vdb.qcow2"},
            incremental="vmkeep-1-3",
            full=["vdb"],
        ),
    )
    # without an incremental base every disk is a full already: no per-disk mode
    assert "backupmode" not in backup_xml({"vdb": "/s/0.vdb.qcow2"}, full=["vdb"])


def test_checkpoint_xml_skips_raw_disks() -> None:
    golden("checkpoint.xml", checkpoint_xml("vmkeep-1-3", ["vda"], ["vdb"]))


def test_attribute_values_are_escaped() -> None:
    import xml.etree.ElementTree as ET

    root = ET.fromstring(backup_xml({"vda": "/s/it's <odd>.qcow2"}))
    target = root.find("./disks/disk/target")
    assert target is not None and target.get("file") == "/s/it's <odd>.qcow2"
