"""Native libvirt implementation of the hypervisor interface.

This package is the only one importing ``libvirt``; every ``libvirtError`` is turned into a vmkeep
error by its ``get_error_code()`` (as virtnbdbackup's ``virt/client.py`` does).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import libvirt
import libvirt_qemu

from vmkeep.errors import (
    AgentTimeout,
    AgentUnavailable,
    CheckpointInvalid,
    DomainNotFound,
    HypervisorError,
    HypervisorUnreachable,
)
from vmkeep.hypervisor.base import Hypervisor
from vmkeep.hypervisor.domain_xml import has_agent_channel, memory_snapshot_xml, parse_disks
from vmkeep.hypervisor.libvirt_errors import CONNECTION_CODES, agent_error, watch_connection
from vmkeep.hypervisor.native_net import LibvirtNetworks
from vmkeep.hypervisor.vmm import Vmm
from vmkeep.model import DomainInfo, GuestExecResult, VmState

log = logging.getLogger(__name__)
T = TypeVar("T")

# libvirt prints every error to stderr by default; vmkeep reports them itself.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: VmState.ACTIVE,
    libvirt.VIR_DOMAIN_BLOCKED: VmState.ACTIVE,
    libvirt.VIR_DOMAIN_PAUSED: VmState.ACTIVE,
    libvirt.VIR_DOMAIN_SHUTDOWN: VmState.ACTIVE,
    libvirt.VIR_DOMAIN_SHUTOFF: VmState.POWEROFF,
    libvirt.VIR_DOMAIN_CRASHED: VmState.UNKNOWN,  # the seed: a crashed domain (e) is UNKNOWN
    libvirt.VIR_DOMAIN_PMSUSPENDED: VmState.SUSPENDED,
}


@watch_connection
class LibvirtHypervisor(LibvirtNetworks, Hypervisor):
    def __init__(self, uri: str = "qemu:///system") -> None:
        self.uri = uri
        self._conn: libvirt.virConnect | None = None

    # --- plumbing -------------------------------------------------------------------------------
    @property
    def conn(self) -> libvirt.virConnect:
        if self._conn is None or not self._conn.isAlive():
            try:
                self._conn = libvirt.open(self.uri)
            except libvirt.libvirtError as err:
                raise HypervisorUnreachable(self.uri, err.get_error_message()) from err
        return self._conn

    def _lost(self, err: BaseException | None) -> bool:
        # a system error is an errno from anywhere (a file QEMU cannot open, too); only the RPC
        # layer's own means the connection broke
        if (
            isinstance(err, libvirt.libvirtError)
            and err.get_error_code() in CONNECTION_CODES
            and (
                err.get_error_code() != libvirt.VIR_ERR_SYSTEM_ERROR
                or err.get_error_domain() in (libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE)
            )
        ):
            return True
        if self._conn is None:
            return False
        try:
            return not self._conn.isAlive()
        except libvirt.libvirtError:
            return True

    def _drop(self) -> None:
        """Forget a broken connection (isAlive() may still say yes): the next call reopens."""
        self.close()

    def reconnect(self, wait: float = 60.0) -> None:
        deadline = time.monotonic() + wait
        self.close()
        while True:
            try:
                self._conn = libvirt.open(self.uri)
                return
            except libvirt.libvirtError as err:
                if time.monotonic() > deadline:
                    raise HypervisorUnreachable(self.uri, err.get_error_message()) from err
                time.sleep(0.5)

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None

    def _dom(self, name: str) -> libvirt.virDomain:
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise DomainNotFound(name, self.uri) from err
            raise HypervisorError(err.get_error_message()) from err

    def _call(self, fn: Callable[[], T], what: str) -> T:
        try:
            return fn()
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise DomainNotFound(what, self.uri) from err
            raise HypervisorError(f"{what}: {err.get_error_message()}") from err

    @contextmanager
    def _agent(self, name: str, command: str, timeout: float) -> Iterator[libvirt.virDomain]:
        """Run an agent call with a bounded wait; map libvirt's agent errors."""
        dom = self._dom(name)
        try:
            # Bound libvirt's own wait for the agent (default: block forever).
            dom.agentSetResponseTimeout(max(1, int(round(timeout))))
            yield dom
        except libvirt.libvirtError as err:
            code, msg = err.get_error_code(), err.get_error_message() or ""
            raise agent_error(name, command, timeout, code, msg) from err

    def _agent_command(self, name: str, payload: dict[str, Any], timeout: float) -> Any:
        command = payload["execute"]
        with self._agent(name, command, timeout) as dom:
            raw = libvirt_qemu.qemuAgentCommand(dom, json.dumps(payload), int(timeout) or 1, 0)
        return json.loads(raw)["return"]

    def _info(self, dom: libvirt.virDomain) -> DomainInfo:
        state, _reason = dom.state()
        xml = dom.XMLDesc(0)
        try:
            checkpoints = tuple(c.getName() for c in dom.listAllCheckpoints())
        except libvirt.libvirtError:
            checkpoints = ()
        return DomainInfo(
            name=dom.name(),
            uuid=dom.UUIDString(),
            state=_STATES.get(state, VmState.UNKNOWN),
            paused=state == libvirt.VIR_DOMAIN_PAUSED,
            persistent=bool(dom.isPersistent()),
            disks=parse_disks(xml),
            has_agent_channel=has_agent_channel(xml),
            checkpoints=checkpoints,
        )

    def native_vmm(self) -> Vmm:
        """The ``native`` VMM driver: every action in-process on this connection."""
        from vmkeep.hypervisor.vmm_native import NativeVmm  # it imports this module

        return NativeVmm(self)

    # --- inventory ------------------------------------------------------------------------------
    def list_domains(self) -> list[DomainInfo]:
        doms = self._call(lambda: self.conn.listAllDomains(0), "list domains")
        infos = []
        for d in doms:
            try:
                infos.append(self._info(d))
            except libvirt.libvirtError as err:
                if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
                # undefined between the listing and this read (another process removed it)
        return sorted(infos, key=lambda d: d.name)

    def states(self) -> dict[str, DomainInfo]:
        out = {}
        for dom in self._call(lambda: self.conn.listAllDomains(0), "list domains"):
            try:
                state, _reason = dom.state()
            except libvirt.libvirtError as err:
                if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
                continue  # gone since the listing
            out[dom.name()] = DomainInfo(
                name=dom.name(),
                uuid=dom.UUIDString(),
                state=_STATES.get(state, VmState.UNKNOWN),
                paused=state == libvirt.VIR_DOMAIN_PAUSED,
                persistent=True,
            )
        return out

    def domain(self, name: str) -> DomainInfo:
        dom = self._dom(name)
        return self._call(lambda: self._info(dom), name)

    def node_info(self) -> dict[str, int]:
        """libvirt's node info (memory in MiB, CPUs) and free memory (bytes), in KiB."""
        info = self._call(lambda: self.conn.getInfo(), "node info")
        free = self._call(lambda: self.conn.getFreeMemory(), "free memory")
        return {"cpus": int(info[2]), "memory_kib": int(info[1]) * 1024,
                "free_memory_kib": int(free) // 1024}  # fmt: skip

    def qemu_ids(self) -> tuple[int, int] | None:
        """QEMU's uid and gid as libvirt runs it: the DAC security model's base label in the
        host capabilities (``+64055:+64055``; qemu.conf's ``user``/``group``)."""
        caps = ET.fromstring(self._call(lambda: self.conn.getCapabilities(), "capabilities"))
        for model in caps.iterfind("host/secmodel"):
            if model.findtext("model") != "dac":
                continue
            for label in model.iterfind("baselabel"):
                uid, _, gid = (label.text or "").partition(":")
                if uid.lstrip("+").isdigit() and gid.lstrip("+").isdigit():
                    return int(uid.lstrip("+")), int(gid.lstrip("+"))
        return None

    def domain_xml(self, name: str, *, inactive: bool = False) -> str:
        dom = self._dom(name)
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return self._call(lambda: dom.XMLDesc(flags), name)

    # --- lifecycle ------------------------------------------------------------------------------
    def define(self, xml: str) -> str:
        dom = self._call(lambda: self.conn.defineXML(xml), "define domain")
        return str(dom.name())

    def start(self, name: str, *, paused: bool = False) -> None:
        dom = self._dom(name)
        flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
        self._call(lambda: dom.createWithFlags(flags), f"start {name}")

    def destroy(self, name: str) -> None:
        try:
            dom = self._dom(name)
        except DomainNotFound:
            return
        if dom.isActive():
            try:
                self._call(dom.destroy, f"destroy {name}")
            except HypervisorError as err:
                if not _went_off(dom, err):  # it powered off by itself meanwhile: off it is
                    raise

    def shutdown(self, name: str) -> None:
        try:
            dom = self._dom(name)
        except DomainNotFound:
            return
        if dom.isActive():
            # flags=0: libvirt uses the guest agent when it is connected, ACPI otherwise.
            try:
                self._call(lambda: dom.shutdownFlags(0), f"shutdown {name}")
            except HypervisorError as err:
                # a guest the agent's shutdown took down at once fails libvirt's ACPI fallback
                # ("domain is not running"): off is what was asked
                if not _went_off(dom, err):
                    raise

    def undefine(self, name: str) -> None:
        try:
            dom = self._dom(name)
        except DomainNotFound:
            return
        flags = (
            libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        )
        self._call(lambda: dom.undefineFlags(flags), f"undefine {name}")

    def suspend(self, name: str) -> None:
        dom = self._dom(name)
        self._call(dom.suspend, f"suspend {name}")

    def resume(self, name: str) -> None:
        dom = self._dom(name)
        state, _ = dom.state()
        if state == libvirt.VIR_DOMAIN_PAUSED:
            self._call(dom.resume, f"resume {name}")

    # --- memory state (save / restore in OpenNebula's terms) -----------------------------------
    def save_memory(self, name: str, path: str) -> None:
        """Write the guest's RAM and device state to ``path`` (libvirt's save-image format) without
        touching its disks or stopping it: a memory-only external snapshot without metadata. Call
        it on a paused domain for a state consistent with a disk point taken while still paused."""
        targets = [d.target for d in parse_disks(self.domain_xml(name)) if d.target]
        xml = memory_snapshot_xml(path, targets)
        dom = self._dom(name)
        flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
        self._call(lambda: dom.snapshotCreateXML(xml, flags), f"save the memory of {name}")

    def saved_xml(self, path: str) -> str:
        """The domain XML stored in a save image."""
        return str(self._call(lambda: self.conn.saveImageGetXMLDesc(path, 0), f"read {path}"))

    def restore_memory(self, path: str, xml: str | None = None) -> None:
        """Resume a domain from a save image, running (``xml``: the same domain with other disk
        paths; libvirt refuses another name, UUID or machine)."""
        flags = libvirt.VIR_DOMAIN_SAVE_RUNNING
        self._call(lambda: self.conn.restoreFlags(path, xml, flags), f"restore from {path}")

    # --- guest agent ----------------------------------------------------------------------------
    def guest_ping(self, name: str, timeout: float) -> bool:
        try:
            self._agent_command(name, {"execute": "guest-ping"}, timeout)
        except (AgentUnavailable, AgentTimeout):
            return False
        return True

    def fs_freeze(self, name: str, timeout: float) -> int:
        with self._agent(name, "guest-fsfreeze-freeze", timeout) as dom:
            return int(dom.fsFreeze())

    def fs_thaw(self, name: str, timeout: float) -> int:
        with self._agent(name, "guest-fsfreeze-thaw", timeout) as dom:
            return int(dom.fsThaw())

    def fs_freeze_status(self, name: str, timeout: float) -> str:
        return str(self._agent_command(name, {"execute": "guest-fsfreeze-status"}, timeout))

    def guest_exec(self, name: str, argv: list[str], timeout: float) -> GuestExecResult:
        started = self._agent_command(
            name,
            {
                "execute": "guest-exec",
                "arguments": {"path": argv[0], "arg": argv[1:], "capture-output": True},
            },
            min(timeout, 30),
        )
        pid = started["pid"]
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            status = self._agent_command(
                name, {"execute": "guest-exec-status", "arguments": {"pid": pid}}, min(timeout, 30)
            )
            if status.get("exited"):
                break
            if time.monotonic() > deadline:
                raise AgentTimeout(name, f"guest-exec {argv[0]}", timeout)
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

        def decode(key: str) -> str:
            data = status.get(key)
            return base64.b64decode(data).decode(errors="replace") if data else ""

        return GuestExecResult(
            exit_code=int(status.get("exitcode", -1)),
            stdout=decode("out-data"),
            stderr=decode("err-data"),
        )

    # --- backup API -----------------------------------------------------------------------------
    def backup_begin(
        self, name: str, backup_xml: str, checkpoint_xml: str | None, *, reuse: bool = False
    ) -> None:
        dom = self._dom(name)
        flags = libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL if reuse else 0
        try:
            dom.backupBegin(backup_xml, checkpoint_xml, flags)
        except libvirt.libvirtError as err:
            code, msg = err.get_error_code(), err.get_error_message() or ""
            if code in (
                libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT,
                libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT,
            ):
                raise CheckpointInvalid("(incremental base)", name, msg) from err
            if "bitmap" in msg and (
                "missing" in msg or "inconsistent" in msg or "not found" in msg
            ):
                raise CheckpointInvalid("(incremental base)", name, msg) from err
            raise HypervisorError(f"backup begin on {name}: {msg}") from err

    def job_progress(self, name: str) -> tuple[bool, int, int]:
        dom = self._dom(name)
        try:
            stats = dom.jobStats(0)
        except libvirt.libvirtError as err:
            # While a backup job is being set up, libvirt 9 reports "backup job data missing".
            if "job data missing" in (err.get_error_message() or ""):
                return True, 0, 0
            raise HypervisorError(f"job stats of {name}: {err.get_error_message()}") from err
        active = stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_NONE
        return active, int(stats.get("disk_processed", 0)), int(stats.get("disk_total", 0))

    def job_result(self, name: str) -> tuple[bool, str]:
        dom = self._dom(name)
        stats = self._call(
            lambda: dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED), f"job result of {name}"
        )
        ok = stats.get("type") == libvirt.VIR_DOMAIN_JOB_COMPLETED and stats.get("success", True)
        return bool(ok), str(stats.get("errmsg", "") or ("" if ok else "job did not complete"))

    def abort_job(self, name: str) -> None:
        dom = self._dom(name)
        try:
            dom.abortJob()
        except libvirt.libvirtError as err:
            if err.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # no job running
                raise HypervisorError(f"abort job on {name}: {err.get_error_message()}") from err

    def disk_size(self, name: str, target: str) -> tuple[int, int]:
        dom = self._dom(name)
        capacity, allocation, physical = self._call(
            lambda: dom.blockInfo(target), f"block info of {name}/{target}"
        )
        return int(capacity), int(max(allocation, 0) or physical)

    def checkpoint_size(self, name: str, checkpoint: str, target: str) -> int | None:
        dom = self._dom(name)
        try:
            cp = dom.checkpointLookupByName(checkpoint)
            xml = cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE)
        except libvirt.libvirtError:
            return None  # inactive domain, or the checkpoint is gone
        for disk in ET.fromstring(xml).findall("./disks/disk"):
            if disk.get("name") == target and disk.get("size"):
                return int(disk.get("size", "0"))
        return None

    def checkpoints(self, name: str) -> list[str]:
        dom = self._dom(name)
        return [c.getName() for c in self._call(dom.listAllCheckpoints, f"checkpoints of {name}")]

    def delete_checkpoint(self, name: str, checkpoint: str) -> None:
        dom = self._dom(name)
        try:
            cp = dom.checkpointLookupByName(checkpoint)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                return
            raise HypervisorError(
                f"checkpoint {checkpoint} of {name}: {err.get_error_message()}"
            ) from err
        try:
            cp.delete(0)
        except libvirt.libvirtError as err:
            # The bitmap may already be gone (deleted behind our back): drop the metadata only.
            log.warning(
                "deleting checkpoint %s of %s: %s; removing metadata only",
                checkpoint,
                name,
                err.get_error_message(),
            )
            self._call(
                lambda: cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY),
                f"delete checkpoint {checkpoint} of {name}",
            )

    def block_pull(self, name: str, target: str, bandwidth_mib: int = 0) -> None:
        dom = self._dom(name)
        self._call(lambda: dom.blockPull(target, bandwidth_mib, 0), f"block pull {name}/{target}")

    def block_job(self, name: str, target: str) -> tuple[int, int] | None:
        dom = self._dom(name)
        info = self._call(lambda: dom.blockJobInfo(target, 0), f"block job of {name}/{target}")
        if not info:
            return None
        return int(info.get("cur", 0)), int(info.get("end", 0))

    def block_job_abort(self, name: str, target: str) -> None:
        dom = self._dom(name)
        try:
            dom.blockJobAbort(target, 0)
        except libvirt.libvirtError as err:
            if err.get_error_code() not in (
                libvirt.VIR_ERR_OPERATION_INVALID,
                libvirt.VIR_ERR_NO_DOMAIN,
                libvirt.VIR_ERR_INVALID_ARG,  # "disk vda does not have an active block job"
            ):
                raise HypervisorError(
                    f"abort block job {name}/{target}: {err.get_error_message()}"
                ) from err


def _went_off(dom: libvirt.virDomain, err: HypervisorError) -> bool:
    """A shutdown or destroy refused with "Requested operation is not valid" by a domain that
    is off now: it powered off between the check and the call."""
    cause = err.__cause__
    if not (
        isinstance(cause, libvirt.libvirtError)
        and cause.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID
    ):
        return False
    try:
        return not dom.isActive()
    except libvirt.libvirtError:
        return False
