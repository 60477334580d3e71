"""Edits of a backed-up domain XML shared by the restore paths."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path


def set_disk_sources(root: ET.Element, disks: dict[str, Path], fmt: str | None = None) -> None:
    """Point each disk whose target is in ``disks`` at its new image (a plain file, no backing
    store); ``fmt`` also sets the driver's format (a restored image is qcow2)."""
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        dev = target.get("dev", "") if target is not None else ""
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
