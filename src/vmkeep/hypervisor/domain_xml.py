"""Domain XML in one place: the readings and edits of a libvirt domain's XML, and the device and
snapshot XML the drivers hand to libvirt, as pure functions (text or ElementTree in, text or
ElementTree out; no I/O, no libvirt, no catalog). The hypervisor implementations, the VMM
drivers and the engine (restore, drill, lifecycle) call these and pass in what they need. Backup
and checkpoint XML: ``backup_xml.py``; what the trust rules refuse in an XML: the engine's
``core/trust.py``.

Output is what ``ET.tostring(root, encoding="unicode")`` writes (attributes in double quotes).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from pathlib import Path
from xml.sax.saxutils import quoteattr

from vmkeep.hypervisor.vmm import DiskSpec, NicSpec
from vmkeep.model import DiskInfo

AGENT_CHANNEL = "org.qemu.guest_agent.0"
_CHARDEVS = ("serial", "console", "channel", "parallel")


def _text(root: ET.Element) -> str:
    return ET.tostring(root, encoding="unicode")


def _target_of(disk: ET.Element) -> str:
    target = disk.find("target")
    return target.get("dev", "") if target is not None else ""


# --- reading ------------------------------------------------------------------------------------
def parse_disks(xml: str) -> tuple[DiskInfo, ...]:
    """Disks of a domain XML, in target order as libvirt lists them (a disk without a target is
    left out; a disk without a source has an empty path)."""
    root = ET.fromstring(xml)
    disks: list[DiskInfo] = []
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        source = disk.find("source")
        driver = disk.find("driver")
        if target is None:
            continue
        path = ""
        if source is not None:
            path = source.get("file") or source.get("dev") or source.get("name") or ""
        disks.append(
            DiskInfo(
                target=target.get("dev", ""),
                path=path,
                fmt=(driver.get("type", "raw") if driver is not None else "raw"),
                device=disk.get("device", "disk"),
                readonly=disk.find("readonly") is not None,
                transient=disk.find("transient") is not None,
            )
        )
    return tuple(disks)


def has_agent_channel(xml: str) -> bool:
    """Whether the domain has the QEMU guest agent's virtio-serial channel."""
    root = ET.fromstring(xml)
    return any(t.get("name") == AGENT_CHANNEL for t in root.findall("./devices/channel/target"))


def domain_name(xml: str) -> str:
    """The ``<name>`` of a domain XML (empty when it has none)."""
    return ET.fromstring(xml).findtext("name", "")


def domain_uuid(xml: str) -> str:
    """The ``<uuid>`` of a domain XML (empty when it has none)."""
    return (ET.fromstring(xml).findtext("uuid") or "").strip()


def description(xml: str) -> str:
    """The ``<description>`` of a domain XML (empty when it has none)."""
    return ET.fromstring(xml).findtext("description") or ""


_KIB = {"b": 1 / 1024, "bytes": 1 / 1024, "k": 1, "kib": 1, "kb": 1000 / 1024, "m": 1024,
        "mib": 1024, "mb": 1e6 / 1024, "g": 1 << 20, "gib": 1 << 20, "gb": 1e9 / 1024,
        "t": 1 << 30, "tib": 1 << 30, "tb": 1e12 / 1024}  # fmt: skip


def cpu_memory(xml: str) -> tuple[int, int]:
    """The vCPUs (``<vcpu>``, 1 when absent) and the memory in KiB (``<memory>`` in its unit,
    libvirt's default KiB; 0 when absent) a domain XML asks for."""
    root = ET.fromstring(xml)
    vcpus = int((root.findtext("vcpu") or "1").strip() or 1)
    mem = root.find("memory")
    if mem is None or not (mem.text or "").strip():
        return vcpus, 0
    factor = _KIB.get(mem.get("unit", "KiB").lower(), 1)
    return vcpus, int(int((mem.text or "").strip()) * factor)


def mac_addresses(xml: str) -> list[str | None]:
    """The address of every ``<mac>`` element (a NIC's MAC), in document order."""
    return [m.get("address") for m in ET.fromstring(xml).iter("mac")]


# --- edits of a backed-up domain (restore, drill, memory state) ---------------------------------
def set_disk_sources(root: ET.Element, disks: Mapping[str, Path], fmt: str | None = None) -> None:
    """Point each disk whose target is in ``disks`` at its new image (a plain file, no backing
    store); ``fmt`` also sets the driver's format (a restored image is qcow2)."""
    for disk in root.findall("./devices/disk"):
        dev = _target_of(disk)
        if dev not in disks:
            continue
        source = disk.find("source")
        if source is None:
            source = ET.SubElement(disk, "source")
        source.attrib.clear()
        source.set("file", str(disks[dev]))
        disk.set("type", "file")
        driver = disk.find("driver")
        if fmt is not None and driver is not None:
            driver.set("type", fmt)
        for bs in disk.findall("backingStore"):
            disk.remove(bs)


def with_disks(xml: str, disks: Mapping[str, Path], fmt: str | None = None) -> str:
    """``xml`` with the sources of the disks in ``disks`` (target -> image) replaced; name, UUID
    and every device stay, as libvirt requires to resume a save image."""
    root = ET.fromstring(xml)
    set_disk_sources(root, disks, fmt)
    return _text(root)


def new_domain_xml(
    xml: str,
    name: str,
    disks: Mapping[str, Path],
    files_dir: Path,
    *,
    no_nic: bool,
    no_ip: bool,
) -> tuple[str, list[str]]:
    """The backed-up domain XML as a new domain: new name, no UUID nor metadata, the disks in
    ``disks`` (target -> restored qcow2 image), chardev files moved into ``files_dir``;
    ``no_nic`` drops the NICs, ``no_ip`` keeps them but drops MAC, fixed addresses and routes.

    A disk not in ``disks`` is left out (never share the original's file); a cdrom's or floppy's
    medium is ejected. Returns the new XML and the targets of the disks left out."""
    root = ET.fromstring(xml)
    name_el = root.find("name")
    if name_el is None:
        name_el = ET.SubElement(root, "name")
    name_el.text = name
    for tag in ("uuid", "metadata"):
        for el in root.findall(tag):
            root.remove(el)
    left_out: list[str] = []
    devices = root.find("devices")
    if devices is None:
        return _text(root), left_out
    set_disk_sources(root, disks, "qcow2")
    for disk in list(devices.findall("disk")):
        dev = _target_of(disk)
        if dev not in disks and disk.get("device", "disk") == "disk":
            devices.remove(disk)  # not in the backup (volatile)
            left_out.append(dev)
        elif dev not in disks:  # a cdrom's or floppy's medium: ejected, never the host's file
            for medium in disk.findall("source"):
                disk.remove(medium)
    for iface in list(devices.findall("interface")):
        if no_nic:
            devices.remove(iface)
        elif no_ip:
            for tag in ("mac", "ip", "target", "route"):
                for el in iface.findall(tag):
                    iface.remove(el)
    for chardev in [el for tag in _CHARDEVS for el in devices.findall(tag)]:
        src = chardev.find("source")
        if chardev.get("type") == "file" and src is not None and src.get("path"):
            src.set("path", str(files_dir / Path(src.get("path", "")).name))
        for log in chardev.findall("log"):
            log.set("file", str(files_dir / Path(log.get("file", "log")).name))
    return _text(root), left_out


def on_network(xml: str, network: str) -> tuple[str, list[str | None]]:
    """``xml`` with every NIC moved onto the libvirt network ``network``, each keeping its MAC
    address, model and guest-side PCI address (the guest sees the same NIC and its own network
    config works as before); the host side (bridge, target, fixed addresses, routes, filters,
    VLANs) is dropped. Returns the new XML and the NICs' MAC addresses (None: libvirt picks)."""
    root = ET.fromstring(xml)
    keep = ("mac", "model", "address", "driver", "mtu")
    macs: list[str | None] = []
    for iface in root.findall("./devices/interface"):
        iface.attrib.clear()
        iface.set("type", "network")
        for el in list(iface):
            if el.tag not in keep:
                iface.remove(el)
        ET.SubElement(iface, "source", network=network)
        mac = iface.find("mac")
        macs.append(mac.get("address") if mac is not None else None)
    return _text(root), macs


NETWORK_NS = "urn:vmkeep:isolated-network"


def isolated_network_xml(name: str, mark: str) -> str:
    """A libvirt network with no route anywhere: no ``<forward>`` (nothing leaves the bridge),
    no ``<ip>`` (the host has no address on it, so no DHCP, DNS nor IPv6 of the host either).
    ``mark`` goes into its ``<metadata>`` (``network_mark``): how a leftover is recognised."""
    root = ET.Element("network")
    ET.SubElement(root, "name").text = name
    meta = ET.SubElement(root, "metadata")
    ET.SubElement(meta, f"{{{NETWORK_NS}}}mark").text = mark
    ET.SubElement(root, "bridge", stp="off", delay="0")
    ET.register_namespace("vmkeep", NETWORK_NS)
    return _text(root)


def network_mark(xml: str) -> str | None:
    """The mark ``isolated_network_xml`` put into a network's XML (None: not vmkeep's)."""
    return ET.fromstring(xml).findtext(f"./metadata/{{{NETWORK_NS}}}mark")


def network_isolation(xml: str) -> list[str]:
    """What in a network's XML reaches beyond its bridge (empty: isolated)."""
    root = ET.fromstring(xml)
    return [f"<{tag}>" for tag in ("forward", "ip", "route", "dns") if root.find(tag) is not None]


def with_description(xml: str, text: str) -> str:
    """``xml`` with its ``<description>`` replaced by ``text`` (placed right after ``<name>``)."""
    root = ET.fromstring(xml)
    for el in root.findall("description"):
        root.remove(el)
    desc = ET.Element("description")
    desc.text = text
    root.insert(1, desc)
    return _text(root)


# --- edits of a definition (lifecycle) ----------------------------------------------------------
def with_cpu_memory(xml: str, vcpus: int | None, memory_mib: int | None) -> str:
    """``xml`` with ``vcpus`` virtual CPUs (all of them current) and/or ``memory_mib`` MiB of
    memory (maximum and current); None leaves that part as it is."""
    root = ET.fromstring(xml)
    if vcpus is not None:
        el = root.find("vcpu")
        if el is None:
            el = ET.SubElement(root, "vcpu")
        el.attrib.pop("current", None)
        el.text = str(int(vcpus))
    if memory_mib is not None:
        for tag in ("memory", "currentMemory"):
            el = root.find(tag)
            if el is None:
                el = ET.SubElement(root, tag)
            el.attrib.clear()
            el.set("unit", "MiB")
            el.text = str(int(memory_mib))
    return _text(root)


def with_device(xml: str, device: str) -> str:
    """``xml`` with ``device`` (one device element's XML) appended to ``<devices>``."""
    root = ET.fromstring(xml)
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    devices.append(ET.fromstring(device))
    return _text(root)


def without_disk(xml: str, target: str) -> str:
    """``xml`` without the disk whose target is ``target``."""
    root = ET.fromstring(xml)
    for devices in root.findall("devices"):
        for disk in devices.findall("disk"):
            if _target_of(disk) == target:
                devices.remove(disk)
    return _text(root)


def without_nic(xml: str, mac: str) -> str:
    """``xml`` without the NIC whose MAC address is ``mac``."""
    root = ET.fromstring(xml)
    for devices in root.findall("devices"):
        for iface in devices.findall("interface"):
            found = iface.find("mac")
            if found is not None and found.get("address") == mac:
                devices.remove(iface)
    return _text(root)


# --- device and snapshot XML the drivers hand to libvirt ----------------------------------------
def disk_device_xml(d: DiskSpec) -> str:
    """A file-backed virtio ``<disk>`` for hotplug (attach and detach)."""
    ro = "<readonly/>" if d.readonly else ""
    return (
        f"<disk type='file' device='disk'><driver name='qemu' type={quoteattr(d.fmt)} "
        f"cache={quoteattr(d.cache)}/><source file={quoteattr(d.source)}/>"
        f"<target dev={quoteattr(d.target)} bus='virtio'/>{ro}</disk>"
    )


def nic_device_xml(n: NicSpec) -> str:
    """An ``<interface>`` for hotplug: on ``n.bridge``, or user-mode networking without one."""
    target = f"<target dev={quoteattr(n.target)}/>" if n.target else ""
    if n.bridge:
        head, source = "<interface type='bridge'>", f"<source bridge={quoteattr(n.bridge)}/>"
    else:
        head, source = "<interface type='user'>", ""
    return (
        f"{head}<mac address={quoteattr(n.mac)}/>{source}<model type={quoteattr(n.model)}/>"
        f"{target}</interface>"
    )


def nic_detach_xml(mac: str) -> str:
    """The ``<interface>`` libvirt matches by MAC address to detach a NIC."""
    return f"<interface type='user'><mac address={quoteattr(mac)}/></interface>"


def system_snapshot_xml(name: str) -> str:
    """An internal system snapshot (disks and, of a running domain, RAM) named ``name`` (escaped:
    whatever the name holds stays the text of ``<name>``)."""
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = name
    return _text(root)


def memory_snapshot_xml(path: str, targets: Iterable[str]) -> str:
    """A memory-only external snapshot to ``path`` that leaves the disks ``targets`` alone."""
    disks = "".join(f"<disk name={quoteattr(t)} snapshot='no'/>" for t in targets)
    return (
        "<domainsnapshot><name>vmkeep-memory</name>"
        f"<memory snapshot='external' file={quoteattr(path)}/>"
        f"<disks>{disks}</disks></domainsnapshot>"
    )
