"""The native driver's migration (native_migrate.py) over stand-in libvirt objects: what it
leaves behind when it is interrupted after the switch-over (the real one runs in the e2e
tests; these reach the moments a real guest cannot be stopped at on purpose)."""

from __future__ import annotations

from typing import Any

import libvirt
import pytest

from vmkeep.hypervisor import native_migrate
from vmkeep.hypervisor.fake import checkpoint_xml

DEST = "qemu+tcp://h2/system"
XML = (
    "<domain><name>web</name><devices><disk type='file' device='disk'>"
    "<source file='/local/web.qcow2'/><target dev='vda'/></disk></devices></domain>"
)


class Checkpoint:
    def __init__(self, name: str, xml: str) -> None:
        self.name, self.xml = name, xml

    def getName(self) -> str:  # noqa: N802 (libvirt's name)
        return self.name

    def getXMLDesc(self, _flags: int) -> str:  # noqa: N802
        return self.xml


class Dom:
    def __init__(self, log: list[str], where: str, active: bool, cps: list[Checkpoint]) -> None:
        self.log, self.where, self.active, self.cps = log, where, active, cps
        self.interrupt_redefine = False

    def isActive(self) -> bool:  # noqa: N802
        return self.active

    def XMLDesc(self, _flags: int) -> str:  # noqa: N802
        return XML

    def listAllCheckpoints(self, _flags: int) -> list[Checkpoint]:  # noqa: N802
        return list(self.cps)

    def createWithFlags(self, _flags: int) -> None:  # noqa: N802
        self.log.append(f"{self.where} start paused")
        self.active = True

    def destroy(self) -> None:
        self.log.append(f"{self.where} destroy")
        self.active = False

    def checkpointCreateXML(self, xml: str, _flags: int) -> None:  # noqa: N802
        if self.interrupt_redefine:
            raise KeyboardInterrupt  # a job's cancel arrives here
        name = xml.split("<name>")[1].split("<")[0]
        self.cps.append(Checkpoint(name, xml))

    def jobStats(self, _flags: int) -> dict[str, Any]:  # noqa: N802
        return {}


class Pool:
    def isActive(self) -> bool:  # noqa: N802
        return True

    def storageVolLookupByName(self, name: str) -> None:  # noqa: N802
        raise libvirt.libvirtError(f"no volume {name}")

    def destroy(self) -> None:
        pass


class Dest:
    def listAllStoragePools(self, _flags: int) -> list[Pool]:  # noqa: N802
        return []

    def storagePoolCreateXML(self, _xml: str, _flags: int) -> Pool:  # noqa: N802
        return Pool()


class Src:
    def getURI(self) -> str:  # noqa: N802
        return "qemu:///system"


def test_a_cancel_after_the_switch_over_stops_the_paused_copy_and_the_migration_stands() -> None:
    """A powered-off VM copied with --copy-storage runs paused for the copy; a cancel that
    arrives while its checkpoints are defined on the destination (too late to abort) leaves
    it stopped there, never paused, and the migration is returned with the reason the
    checkpoints did not all follow."""
    log: list[str] = []
    src = Dom(log, "h1", False, [Checkpoint("vmkeep-1-0", checkpoint_xml("vmkeep-1-0", None))])
    new = Dom(log, "h2", True, [])
    new.interrupt_redefine = True

    def migrate3(_dest: object, _params: dict[str, Any], _flags: int) -> Dom:
        log.append("migrate")
        return new

    src.migrate3 = migrate3  # type: ignore[attr-defined]
    m = native_migrate._migrate(Src(), src, Dest(), DEST, False, True, 0, None)  # type: ignore[arg-type]
    assert log == ["h1 start paused", "migrate", "h2 destroy"] and not new.active
    assert m.checkpoints == () and "interrupted after it had switched over" in m.chain_break


def test_a_cancel_before_the_switch_over_stops_the_paused_source() -> None:
    log: list[str] = []
    src = Dom(log, "h1", False, [])

    def migrate3(_dest: object, _params: dict[str, Any], _flags: int) -> Dom:
        raise KeyboardInterrupt

    src.migrate3 = migrate3  # type: ignore[attr-defined]
    with pytest.raises(KeyboardInterrupt):
        native_migrate._migrate(Src(), src, Dest(), DEST, False, True, 0, None)  # type: ignore[arg-type]
    assert log == ["h1 start paused", "h1 destroy"] and not src.active
