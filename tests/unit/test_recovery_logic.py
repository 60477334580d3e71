"""Logic of memory-state restore and restore drills that needs no guest: the XML a save image is
resumed with, the BACKUP_CONFIG key, and how e2fsck's answer becomes a verdict."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmkeep.engine.core.backup_config import resolve, validate
from vmkeep.engine.restore.drill import _isolated_xml, e2fsck_verdict
from vmkeep.errors import InvalidValue
from vmkeep.hypervisor.domain_xml import with_disks

XML = """<domain type='qemu'><name>web</name><uuid>0b0e6f6c-1111-2222-3333-444455556666</uuid>
<devices>
 <disk type='file' device='disk'><driver name='qemu' type='raw'/>
  <source file='/old/vda.img'/><backingStore type='file'><source file='/b'/></backingStore>
  <target dev='vda' bus='virtio'/></disk>
 <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
  <source file='/old/vdb.qcow2'/><target dev='vdb' bus='virtio'/></disk>
 <interface type='user'><mac address='52:54:00:00:00:01'/></interface>
</devices></domain>"""


def test_memory_key_is_yes_or_no() -> None:
    assert validate("memory", "yes") is True and validate("memory", "off") is False
    assert resolve({"memory": "yes"}).memory and not resolve().memory
    with pytest.raises(InvalidValue, match="memory"):
        validate("memory", "maybe")


def test_resume_xml_keeps_identity_and_devices_and_moves_only_the_given_disks() -> None:
    root = ET.fromstring(with_disks(XML, {"vda": Path("/new/vda.qcow2")}, "qcow2"))
    assert root.findtext("name") == "web" and root.findtext("uuid", "").startswith("0b0e6f6c")
    vda, vdb = root.findall("./devices/disk")
    assert vda.find("source").get("file") == "/new/vda.qcow2"  # type: ignore[union-attr]
    assert vda.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    assert vda.find("backingStore") is None
    assert vdb.find("source").get("file") == "/old/vdb.qcow2"  # type: ignore[union-attr]
    assert len(root.findall("./devices/interface")) == 1  # devices stay (ABI)
    # in place: the format stays the VM's own
    same = ET.fromstring(with_disks(XML, {"vda": Path("/old/vda.img")}))
    assert same.find("./devices/disk/driver").get("type") == "raw"  # type: ignore[union-attr]


def test_drill_vm_is_isolated_renamed_and_marked(tmp_path: Path) -> None:
    xml = _isolated_xml(XML, "web-drill-3-1", {"vda": tmp_path / "vda.qcow2"}, tmp_path, 1)
    root = ET.fromstring(xml)
    assert root.findtext("name") == "web-drill-3-1" and root.find("uuid") is None
    assert root.findall("./devices/interface") == []
    assert "vmkeep restore drill" in (root.findtext("description") or "")
    assert [t.get("dev") for t in root.findall("./devices/disk/target")] == ["vda"]


def test_e2fsck_verdicts() -> None:
    assert e2fsck_verdict(0, "clean")[0]
    # as e2fsck 1.47 prints it: the question on its own line after the finding
    benign = "Pass 5\nFree blocks count wrong (100, counted=90).\nFix? no\n\nFree inodes count wrong (3, counted=2).\nFix? no\n"
    ok, why = e2fsck_verdict(4, benign)
    assert ok and "free counters" in why
    bad = "Root inode is not a directory.  Clear? no\n\nFree blocks count wrong (1, counted=2).\nFix? no\n"
    ok, why = e2fsck_verdict(4, bad)
    assert (
        not ok and "Root inode is not a directory" in why and why.startswith("e2fsck -fn exited 4")
    )
    assert not e2fsck_verdict(8, "e2fsck: Bad magic number in super-block")[0]
    assert not e2fsck_verdict(4, "no problem lines but exit 4")[0]
