"""The pure XML functions of ``hypervisor/domain_xml.py``: what a restored, drilled, resumed or
resized domain's XML holds, and the device XML the drivers hotplug."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmkeep.engine.restore.point import warn_left_out
from vmkeep.hypervisor import domain_xml as dx
from vmkeep.hypervisor.vmm import DiskSpec, NicSpec
from vmkeep.model import Warnings

SRC = """<domain type='qemu'>
  <name>web</name>
  <uuid>11111111-2222-3333-4444-555555555555</uuid>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/images/web.qcow2'/>
      <backingStore type='file'><format type='qcow2'/><source file='/b.qcow2'/></backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/images/scratch.raw'/>
      <target dev='vdb' bus='virtio'/>
      <transient/>
    </disk>
    <disk type='file' device='cdrom'><target dev='hdc' bus='ide'/></disk>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cc'/>
      <source network='default'/>
      <ip address='192.0.2.10' prefix='24'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'><source path='/var/log/web/serial.log'/><target port='0'/></serial>
  </devices>
</domain>"""


def _rewrite(**kw: bool) -> tuple[str, Warnings]:
    w = Warnings()
    out, left_out = dx.new_domain_xml(
        SRC,
        "web-r",
        {"vda": Path("/r/vda.qcow2")},
        Path("/r"),
        no_nic=kw.get("no_nic", False),
        no_ip=kw.get("no_ip", False),
    )
    assert left_out == ["vdb"]
    warn_left_out(w, left_out)
    return out, w


def test_new_identity_disks_and_chardevs() -> None:
    out, w = _rewrite()
    assert "<name>web-r</name>" in out and "<uuid>" not in out
    assert "/r/vda.qcow2" in out and "/var/lib/images/web.qcow2" not in out
    assert "backingStore" not in out
    assert "scratch.raw" not in out and any("vdb" in m for m in w.items)
    assert 'device="cdrom"' in out  # non-disk devices stay
    assert "/r/serial.log" in out
    assert "52:54:00:aa:bb:cc" in out and "192.0.2.10" in out  # NICs kept by default


def test_no_ip_keeps_nic_drops_mac_and_address() -> None:
    out, _ = _rewrite(no_ip=True)
    assert "<interface" in out and "default" in out
    assert "52:54:00:aa:bb:cc" not in out and "192.0.2.10" not in out


def test_no_nic_drops_interfaces() -> None:
    out, _ = _rewrite(no_nic=True)
    assert "<interface" not in out


def test_no_devices_is_renamed_only() -> None:
    out, left_out = dx.new_domain_xml(
        "<domain><name>a</name><uuid>u</uuid><metadata><x/></metadata></domain>",
        "b",
        {"vda": Path("/r/vda.qcow2")},
        Path("/r"),
        no_nic=True,
        no_ip=True,
    )
    assert out == "<domain><name>b</name></domain>" and left_out == []


def test_chardev_files_and_logs_move_into_the_folder_other_sources_stay() -> None:
    xml = """<domain><name>a</name><devices>
      <console type='file'><source path='/var/log/a/console.log'/><log file='/x/c.log'/></console>
      <channel type='unix'><source mode='bind' path='/run/a.sock'/><log/></channel>
    </devices></domain>"""
    out, _ = dx.new_domain_xml(xml, "b", {}, Path("/f"), no_nic=False, no_ip=False)
    root = ET.fromstring(out)
    assert root.find("./devices/console/source").get("path") == "/f/console.log"  # type: ignore[union-attr]
    assert [e.get("file") for e in root.iter("log")] == ["/f/c.log", "/f/log"]
    assert root.find("./devices/channel/source").get("path") == "/run/a.sock"  # type: ignore[union-attr]


def test_set_disk_sources_makes_a_plain_file_disk() -> None:
    root = ET.fromstring(SRC)
    dx.set_disk_sources(root, {"vdb": Path("/n/vdb.qcow2")}, "qcow2")
    vda, vdb, _cd = root.findall("./devices/disk")
    assert vdb.find("source").attrib == {"file": "/n/vdb.qcow2"}  # type: ignore[union-attr]
    assert vdb.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    assert vda.find("backingStore") is not None  # not named: untouched
    cdrom = ET.fromstring("<domain><devices><disk type='block' device='cdrom'>"
                          "<target dev='hdc'/></disk></devices></domain>")  # fmt: skip
    dx.set_disk_sources(cdrom, {"hdc": Path("/iso")})
    assert ET.tostring(cdrom, encoding="unicode") == (
        '<domain><devices><disk type="file" device="cdrom"><target dev="hdc" />'
        '<source file="/iso" /></disk></devices></domain>'
    )


def test_reading_disks_agent_channel_name_description_and_macs() -> None:
    disks = dx.parse_disks(SRC)
    assert [(d.target, d.path, d.fmt, d.device, d.transient) for d in disks] == [
        ("vda", "/var/lib/images/web.qcow2", "qcow2", "disk", False),
        ("vdb", "/var/lib/images/scratch.raw", "raw", "disk", True),
        ("hdc", "", "raw", "cdrom", False),
    ]
    assert not dx.has_agent_channel(SRC)
    agent = "<domain><devices><channel type='unix'><target type='virtio' " \
            "name='org.qemu.guest_agent.0'/></channel></devices></domain>"  # fmt: skip
    assert dx.has_agent_channel(agent)
    assert dx.domain_name(SRC) == "web" and dx.domain_name("<domain/>") == ""
    assert dx.description(SRC) == ""
    marked = dx.with_description(dx.with_description(SRC, "one"), "two")
    assert dx.description(marked) == "two" and marked.count("<description>") == 1
    assert ET.fromstring(marked)[1].tag == "description"  # right after <name>
    assert dx.mac_addresses(SRC) == ["52:54:00:aa:bb:cc"]


@pytest.mark.parametrize(
    ("vcpus", "memory", "want"),
    [
        (2, None, "<vcpu>2</vcpu><memory unit='KiB'>1048576</memory>"),
        (None, 512, "<vcpu current='1'>4</vcpu><memory unit='MiB'>512</memory>"),
        ("3", "256", "<vcpu>3</vcpu><memory unit='MiB'>256</memory>"),
    ],
)
def test_with_cpu_memory(vcpus: int | None, memory: int | None, want: str) -> None:
    xml = "<domain><vcpu current='1'>4</vcpu><memory unit='KiB'>1048576</memory></domain>"
    root = ET.fromstring(dx.with_cpu_memory(xml, vcpus, memory))
    expected = ET.fromstring(f"<domain>{want}</domain>")
    assert root.find("vcpu").attrib == expected.find("vcpu").attrib  # type: ignore[union-attr]
    assert root.findtext("vcpu") == expected.findtext("vcpu")
    assert root.find("memory").attrib == expected.find("memory").attrib  # type: ignore[union-attr]
    assert root.findtext("memory") == expected.findtext("memory")
    current = root.find("currentMemory")
    assert (current is not None) == (memory is not None)  # added with the memory only


def test_device_xml_quotes_what_it_is_given() -> None:
    disk = dx.disk_device_xml(DiskSpec(source="/i/a'b.qcow2", target="vdb", index=1, readonly=True))
    el = ET.fromstring(disk)
    assert el.find("source").get("file") == "/i/a'b.qcow2"  # type: ignore[union-attr]
    assert el.find("driver").attrib == {"name": "qemu", "type": "qcow2", "cache": "none"}  # type: ignore[union-attr]
    assert el.find("readonly") is not None and el.find("target").get("bus") == "virtio"  # type: ignore[union-attr]
    user = ET.fromstring(dx.nic_device_xml(NicSpec(mac="52:54:00:00:00:09")))
    assert user.get("type") == "user" and user.find("source") is None
    bridged = ET.fromstring(dx.nic_device_xml(NicSpec(mac="m", bridge="br0", target="vnet7")))
    assert bridged.get("type") == "bridge"
    assert bridged.find("source").get("bridge") == "br0"  # type: ignore[union-attr]
    assert bridged.find("target").get("dev") == "vnet7"  # type: ignore[union-attr]
    detach = ET.fromstring(dx.nic_detach_xml('a"b'))
    assert detach.find("mac").get("address") == 'a"b'  # type: ignore[union-attr]


def test_devices_added_and_removed() -> None:
    spec = DiskSpec(source="/i/new.qcow2", target="vdc", index=2)
    added = dx.with_device(SRC, dx.disk_device_xml(spec))
    assert [d.target for d in dx.parse_disks(added)] == ["vda", "vdb", "hdc", "vdc"]
    assert [d.target for d in dx.parse_disks(dx.without_disk(added, "vdb"))] == [
        "vda", "hdc", "vdc"
    ]  # fmt: skip
    nic = dx.with_device("<domain/>", dx.nic_device_xml(NicSpec(mac="52:54:00:00:00:02")))
    assert dx.mac_addresses(nic) == ["52:54:00:00:00:02"]
    assert dx.mac_addresses(dx.without_nic(nic, "52:54:00:00:00:02")) == []
    assert dx.mac_addresses(dx.without_nic(nic, "52:54:00:00:00:03")) == ["52:54:00:00:00:02"]


def test_snapshot_xml() -> None:
    mem = ET.fromstring(dx.memory_snapshot_xml("/s/web.mem", ["vda", "vdb"]))
    assert mem.find("memory").attrib == {"snapshot": "external", "file": "/s/web.mem"}  # type: ignore[union-attr]
    assert [(d.get("name"), d.get("snapshot")) for d in mem.iter("disk")] == [
        ("vda", "no"), ("vdb", "no")
    ]  # fmt: skip
    assert ET.fromstring(dx.system_snapshot_xml("snap-3")).findtext("name") == "snap-3"
    hostile = "a</name><memory snapshot='external' file='/etc/x'/><name>&b"
    parsed = ET.fromstring(dx.system_snapshot_xml(hostile))
    assert parsed.findtext("name") == hostile and parsed.find("memory") is None
