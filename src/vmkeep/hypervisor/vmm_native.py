"""The ``native`` VMM driver: every action in-process through libvirt (the host's connection)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import libvirt

from vmkeep.errors import DomainNotFound, VmmError
from vmkeep.hypervisor import native_migrate
from vmkeep.hypervisor.domain_xml import (
    disk_device_xml,
    nic_detach_xml,
    nic_device_xml,
    system_snapshot_xml,
)
from vmkeep.hypervisor.native import LibvirtHypervisor
from vmkeep.hypervisor.vmm import DiskSpec, Migration, NicSpec, Progress, Vmm

T = TypeVar("T")
SHUTDOWN_TIMEOUT = 120.0
_POLL_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: "a",
    libvirt.VIR_DOMAIN_BLOCKED: "a",
    libvirt.VIR_DOMAIN_SHUTDOWN: "a",
    libvirt.VIR_DOMAIN_PAUSED: "p",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "p",
    libvirt.VIR_DOMAIN_CRASHED: "e",
    libvirt.VIR_DOMAIN_SHUTOFF: "d",
}


class NativeVmm(Vmm):
    kind = "native"

    def __init__(self, hv: LibvirtHypervisor, shutdown_timeout: float = SHUTDOWN_TIMEOUT) -> None:
        self.hv = hv
        self.shutdown_timeout = shutdown_timeout

    def _call(self, action: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise DomainNotFound(action, self.hv.uri) from err
            raise VmmError("native", action, err.get_error_message()) from err

    def _dom(self, action: str, domain: str) -> libvirt.virDomain:
        return self._call(action, lambda: self.hv.conn.lookupByName(domain))

    def _flags(self, dom: libvirt.virDomain) -> int:
        """Hotplug into the running guest and its definition; only the definition when off."""
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        return flags | libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else flags

    # --- lifecycle --------------------------------------------------------------------------------
    def deploy(self, domain: str, xml: str) -> str:
        dom = self._call("deploy", lambda: self.hv.conn.defineXML(xml))
        if not dom.isActive():
            self._call("deploy", dom.create)
        return str(dom.name())

    def shutdown(self, domain: str) -> None:
        dom = self._dom("shutdown", domain)
        if not dom.isActive():
            return
        self._call("shutdown", lambda: dom.shutdownFlags(0))  # the agent when there, else ACPI
        deadline = time.monotonic() + self.shutdown_timeout
        while time.monotonic() < deadline:
            if not dom.isActive():
                return
            time.sleep(0.3)
        raise VmmError(
            "native", "shutdown", f"{domain} did not power off within {self.shutdown_timeout:.0f} s"
        )

    def cancel(self, domain: str) -> None:
        dom = self._dom("cancel", domain)
        if dom.isActive():
            self._call("cancel", dom.destroy)

    def reboot(self, domain: str) -> None:
        dom = self._dom("reboot", domain)
        self._call("reboot", lambda: dom.reboot(0))

    def reset(self, domain: str) -> None:
        dom = self._dom("reset", domain)
        self._call("reset", lambda: dom.reset(0))

    def save(self, domain: str, file: str) -> None:
        dom = self._dom("save", domain)
        self._call("save", lambda: dom.save(file))

    def restore(self, file: str) -> None:
        conn = self.hv.conn
        xml = self._call("restore", lambda: conn.saveImageGetXMLDesc(file, 0))
        self._call(
            "restore", lambda: conn.restoreFlags(file, None, libvirt.VIR_DOMAIN_SAVE_RUNNING)
        )
        self._call("restore", lambda: conn.defineXML(xml))  # a restored domain is transient

    def undefine(self, domain: str) -> None:
        self.hv.undefine(domain)

    def poll(self, domain: str) -> dict[str, str]:
        try:
            dom = self.hv.conn.lookupByName(domain)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return {"STATE": "d"}
            raise VmmError("native", "poll", err.get_error_message()) from err
        state = _POLL_STATES.get(self._call("poll", dom.state)[0], "e")
        if state in ("d", "e"):
            return {"STATE": state}
        stats = libvirt.VIR_DOMAIN_STATS_CPU_TOTAL | libvirt.VIR_DOMAIN_STATS_BALLOON
        stats |= libvirt.VIR_DOMAIN_STATS_INTERFACE | libvirt.VIR_DOMAIN_STATS_BLOCK
        conn = self.hv.conn

        def sample() -> dict[str, int] | None:
            rows = self._call("poll", lambda: conn.domainListGetStats([dom], stats, 0))
            if not rows:
                return None  # the domain went away meanwhile (migrated, undefined)
            return {k: int(v) for k, v in rows[0][1].items() if isinstance(v, int | float)}

        t0, first = time.monotonic(), sample()
        time.sleep(0.5)
        second, elapsed = sample(), time.monotonic() - t0
        if first is None or second is None:
            return {"STATE": "d"}
        cpu = (second.get("cpu.time", 0) - first.get("cpu.time", 0)) / (elapsed * 1e9) * 100

        def total(suffix: str, prefix: str) -> int:
            return sum(v for k, v in second.items() if k.startswith(prefix) and k.endswith(suffix))

        return {
            "STATE": state,
            "CPU": f"{cpu:.1f}",
            "MEMORY": str(second.get("balloon.rss", second.get("balloon.current", 0))),
            "NETRX": str(total(".rx.bytes", "net.")),
            "NETTX": str(total(".tx.bytes", "net.")),
            "DISKRDBYTES": str(total(".rd.bytes", "block.")),
            "DISKWRBYTES": str(total(".wr.bytes", "block.")),
            "DISKRDIOPS": str(total(".rd.reqs", "block.")),
            "DISKWRIOPS": str(total(".wr.reqs", "block.")),
        }

    # --- snapshots --------------------------------------------------------------------------------
    def snapshot_create(self, domain: str, snapshot_id: int) -> str:
        dom = self._dom("snapshot_create", domain)
        name = f"snap-{snapshot_id}"
        xml = system_snapshot_xml(name)  # internal: disks + RAM
        self._call("snapshot_create", lambda: dom.snapshotCreateXML(xml, 0))
        return name

    def snapshot_revert(self, domain: str, name: str) -> None:
        dom = self._dom("snapshot_revert", domain)
        snap = self._call("snapshot_revert", lambda: dom.snapshotLookupByName(name, 0))
        self._call("snapshot_revert", lambda: dom.revertToSnapshot(snap, 0))

    def snapshot_delete(self, domain: str, name: str) -> None:
        dom = self._dom("snapshot_delete", domain)
        snap = self._call("snapshot_delete", lambda: dom.snapshotLookupByName(name, 0))
        self._call("snapshot_delete", lambda: snap.delete(0))

    # --- hotplug ----------------------------------------------------------------------------------
    def attach_disk(self, domain: str, disk: DiskSpec) -> None:
        dom = self._dom("attach_disk", domain)
        xml = disk_device_xml(disk)
        self._call("attach_disk", lambda: dom.attachDeviceFlags(xml, self._flags(dom)))

    def detach_disk(self, domain: str, disk: DiskSpec) -> None:
        dom = self._dom("detach_disk", domain)
        xml = disk_device_xml(disk)
        self._call("detach_disk", lambda: dom.detachDeviceFlags(xml, self._flags(dom)))

    def attach_nic(self, domain: str, nic: NicSpec) -> None:
        dom = self._dom("attach_nic", domain)
        xml = nic_device_xml(nic)
        self._call("attach_nic", lambda: dom.attachDeviceFlags(xml, self._flags(dom)))

    def detach_nic(self, domain: str, mac: str) -> None:
        dom = self._dom("detach_nic", domain)
        xml = nic_detach_xml(mac)
        self._call("detach_nic", lambda: dom.detachDeviceFlags(xml, self._flags(dom)))

    def resize_disk(self, domain: str, target: str, size: int) -> None:
        dom = self._dom("resize_disk", domain)
        flags = libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES
        self._call("resize_disk", lambda: dom.blockResize(target, size, flags))

    # --- migration (native_migrate.py) ------------------------------------------------------------
    def migrate(
        self,
        domain: str,
        dest_uri: str,
        *,
        live: bool,
        copy_storage: bool = False,
        bandwidth_mib: int = 0,
        progress: Progress | None = None,
    ) -> Migration:
        return native_migrate.migrate(
            self.hv.conn,
            domain,
            dest_uri,
            live=live,
            copy_storage=copy_storage,
            bandwidth_mib=bandwidth_mib,
            progress=progress,
        )
