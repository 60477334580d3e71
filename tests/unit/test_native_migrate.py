"""The native driver's migration (native_migrate.py) over stand-in libvirt objects: what it
leaves behind when it is interrupted after the switch-over (the real one runs in the e2e
tests; these reach the moments a real guest cannot be stopped at on purpose)."""

from __future__ import annotations

from typing import Any

import libvirt
import pytest

from vmkeep.errors import VmmError
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
    def __init__(self, name: str, files: tuple[str, ...] = (), path: str = "/local") -> None:
        self.pool_name, self.files, self.path, self.active = name, files, path, True

    def name(self) -> str:
        return self.pool_name

    def isActive(self) -> bool:  # noqa: N802
        return self.active

    def XMLDesc(self, _flags: int) -> str:  # noqa: N802
        return f"<pool><target><path>{self.path}</path></target></pool>"

    def refresh(self, _flags: int) -> None:
        pass

    def storageVolLookupByName(self, name: str) -> None:  # noqa: N802
        if name not in self.files:
            raise libvirt.libvirtError(f"no volume {name}")

    def destroy(self) -> None:
        self.active = False


class Dest:
    def __init__(self, pools: tuple[Pool, ...] = (), sees: tuple[str, ...] = ()) -> None:
        self.pools, self.sees, self.made = list(pools), sees, list[Pool]()

    def listAllStoragePools(self, _flags: int) -> list[Pool]:  # noqa: N802
        return self.pools

    def storagePoolCreateXML(self, xml: str, _flags: int) -> Pool:  # noqa: N802
        pool = Pool(xml.split("<name>")[1].split("<")[0], self.sees)
        self.made.append(pool)
        return pool


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


def test_an_offline_move_to_a_host_that_does_not_see_the_disks_is_refused_with_the_fix() -> None:
    """libvirt's offline migration checks no disk: the definition would move to a host where
    the VM cannot start. Refused before anything moves, naming --copy-storage; the pool made
    for the check is gone."""
    log: list[str] = []
    src = Dom(log, "h1", False, [])
    src.migrate3 = lambda *_a: log.append("migrate")  # type: ignore[attr-defined]
    dest = Dest()
    with pytest.raises(VmmError, match="does not see disk /local/web.qcow2.*--copy-storage"):
        native_migrate._migrate(Src(), src, dest, DEST, False, False, 0, None)  # type: ignore[arg-type]
    assert log == [] and [p.active for p in dest.made] == [False]
    seen = Dest(sees=("web.qcow2",))
    native_migrate._migrate(Src(), src, seen, DEST, False, False, 0, None)  # type: ignore[arg-type]
    assert log == ["migrate"] and [p.active for p in seen.made] == [False]


def test_a_pool_left_by_a_killed_migration_is_removed_by_the_next_one() -> None:
    log: list[str] = []
    src = Dom(log, "h1", True, [])
    src.migrate3 = lambda *_a: Dom(log, "h2", True, [])  # type: ignore[attr-defined]
    left, admins = Pool("vmkeep-migrate-a602624a1c"), Pool("images", path="/images")
    native_migrate._migrate(Src(), src, Dest((left, admins)), DEST, True, True, 0, None)  # type: ignore[arg-type]
    assert not left.active and admins.active
