"""An in-memory hypervisor behind the ``Hypervisor`` interface, for the engine's unit tests.

Domains are plain records in a dict; define, start, destroy, shutdown, undefine, suspend, resume,
memory save and restore change them as libvirt would (a transient domain disappears when it
stops; a running one that is undefined becomes transient; ``domain_xml`` returns the stored XML).
There is no QEMU behind it: what needs one (a backup job copying disks, a block pull, a program
run in the guest) raises ``HypervisorError`` saying the fake cannot do it.

``native_vmm()`` gives ``FakeVmm``, the ``native`` VMM driver's actions on these records, so the
lifecycle (``engine/lifecycle``) runs end to end without libvirt. Knobs for tests: a domain's
``agent`` (its guest agent answers) and ``obeys_shutdown`` (its guest powers off when asked).

Migration moves a record to the ``FakeHypervisor`` made last with the destination's URI (every
fake is in ``FAKE_HOSTS`` by its URI), through the same checkpoint carrying as libvirt's
(``carry.py``). Knobs: ``refuses_checkpoints`` (the source's libvirt will not migrate a domain
with checkpoints), ``keeps_bitmaps`` (False: the destination has lost the bitmaps, so the
checkpoints cannot be defined there), ``migrate_error`` (the next migration fails with it) and
``migrations`` (what each did, in order).
"""

from __future__ import annotations

import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from vmkeep.errors import (
    AgentUnavailable,
    DomainNotFound,
    HypervisorError,
    HypervisorUnreachable,
    VmmError,
)
from vmkeep.hypervisor import carry
from vmkeep.hypervisor.base import Hypervisor
from vmkeep.hypervisor.domain_xml import (
    disk_device_xml,
    domain_name,
    domain_uuid,
    has_agent_channel,
    mac_addresses,
    nic_device_xml,
    parse_disks,
    with_device,
    without_disk,
    without_nic,
)
from vmkeep.hypervisor.vmm import DiskSpec, Migration, NicSpec, Progress, Vmm
from vmkeep.model import DomainInfo, GuestExecResult, VmState

T = TypeVar("T")


# A minimal domain the fake (and libvirt) accepts: unit tests format {disk} with an image path.
SAMPLE_XML = """<domain type='qemu'><name>web</name><memory unit='MiB'>256</memory>
<vcpu>1</vcpu><os><type>hvm</type></os>
<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='{disk}'/><target dev='vda' bus='virtio'/></disk></devices></domain>"""


@dataclass
class FakeDomain:
    """One domain as the fake keeps it."""

    name: str
    uuid: str
    xml: str
    persistent: bool = True
    running: bool = False
    paused: bool = False
    agent: bool = True  # the guest agent answers (when the XML has its channel)
    obeys_shutdown: bool = True  # the guest powers off at once when asked
    frozen: int = 0  # file systems frozen through the agent
    checkpoints: list[str] = field(default_factory=list)
    snapshots: dict[str, tuple[str, bool, bool]] = field(default_factory=dict)  # xml, run, pause


def _cannot(what: str) -> HypervisorError:
    return HypervisorError(f"{what}: the fake hypervisor cannot do this (no QEMU behind it)")


FAKE_HOSTS: dict[str, FakeHypervisor] = {}  # URI -> the fake made last with it


class FakeHypervisor(Hypervisor):
    """Every abstract method of ``Hypervisor`` on in-memory records (see the module's doc)."""

    def __init__(self, uri: str = "fake:///system", filesystems: int = 1) -> None:
        self.uri = uri
        FAKE_HOSTS[uri] = self
        self.refuses_checkpoints = False
        self.keeps_bitmaps = True
        self.migrate_error: str | None = None
        self.migrations: list[tuple[str, str, Migration]] = []  # (domain, dest uri, what)
        self.filesystems = filesystems  # how many a guest agent freezes
        self.domains: dict[str, FakeDomain] = {}
        self.saved: dict[str, str] = {}  # save image path -> the domain XML it holds
        self.disk_sizes: dict[tuple[str, str], tuple[int, int]] = {}  # (name, target) -> sizes
        self.calls: list[tuple[str, str]] = []  # (action, domain) of every change, in order

    def record(self, name: str) -> FakeDomain:
        """The record of domain ``name``; DomainNotFound as libvirt says it."""
        try:
            return self.domains[name]
        except KeyError:
            raise DomainNotFound(name, self.uri) from None

    def _running(self, name: str, what: str) -> FakeDomain:
        d = self.record(name)
        if not d.running:
            raise HypervisorError(f"{what} {name}: domain is not running")
        return d

    def _stopped(self, d: FakeDomain) -> None:
        d.running = d.paused = False
        d.frozen = 0
        if not d.persistent:
            del self.domains[d.name]

    def _info(self, d: FakeDomain) -> DomainInfo:
        return DomainInfo(
            name=d.name,
            uuid=d.uuid,
            state=VmState.ACTIVE if d.running else VmState.POWEROFF,
            paused=d.paused,
            persistent=d.persistent,
            disks=parse_disks(d.xml),
            has_agent_channel=has_agent_channel(d.xml),
            checkpoints=tuple(d.checkpoints),
        )

    def native_vmm(self) -> Vmm:
        return FakeVmm(self)

    # --- inventory ----------------------------------------------------------------------------
    def list_domains(self) -> list[DomainInfo]:
        return [self._info(self.domains[n]) for n in sorted(self.domains)]

    def states(self) -> dict[str, DomainInfo]:
        return {
            n: DomainInfo(
                n, d.uuid, VmState.ACTIVE if d.running else VmState.POWEROFF, d.paused, True
            )
            for n, d in self.domains.items()
        }

    def domain(self, name: str) -> DomainInfo:
        return self._info(self.record(name))

    def domain_xml(self, name: str, *, inactive: bool = False) -> str:
        return self.record(name).xml

    # --- lifecycle ----------------------------------------------------------------------------
    def _put(self, xml: str, what: str) -> FakeDomain:
        """The domain ``xml`` describes, added or updated (libvirt's rules on name and UUID)."""
        name, uuid = domain_name(xml), domain_uuid(xml)
        if not name:
            raise HypervisorError(f"{what}: the domain XML has no <name>")
        d = self.domains.get(name)
        other = next((o for o in self.domains.values() if uuid and o.uuid == uuid), None)
        if other is not None and other.name != name:
            raise HypervisorError(f"{what}: domain '{other.name}' already has uuid {uuid}")
        if d is None:
            d = FakeDomain(name, uuid or str(uuidlib.uuid4()), xml, persistent=False)
            self.domains[name] = d
        elif uuid and uuid != d.uuid:
            raise HypervisorError(f"{what}: domain '{name}' already exists with uuid {d.uuid}")
        d.xml = xml
        return d

    def define(self, xml: str) -> str:
        d = self._put(xml, "define domain")
        d.persistent = True
        self.calls.append(("define", d.name))
        return d.name

    def start(self, name: str, *, paused: bool = False) -> None:
        d = self.record(name)
        if d.running:
            raise HypervisorError(f"start {name}: domain is already running")
        d.running, d.paused = True, paused
        self.calls.append(("start", name))

    def destroy(self, name: str) -> None:
        d = self.domains.get(name)
        if d is not None and d.running:
            self.calls.append(("destroy", name))
            self._stopped(d)

    def shutdown(self, name: str) -> None:
        d = self.domains.get(name)
        if d is not None and d.running:
            self.calls.append(("shutdown", name))
            if d.obeys_shutdown:
                self._stopped(d)

    def undefine(self, name: str) -> None:
        d = self.domains.get(name)
        if d is None:
            return
        self.calls.append(("undefine", name))
        d.checkpoints.clear()
        d.snapshots.clear()
        if d.running:
            d.persistent = False
        else:
            del self.domains[name]

    def suspend(self, name: str) -> None:
        self._running(name, "suspend").paused = True
        self.calls.append(("suspend", name))

    def resume(self, name: str) -> None:
        d = self.record(name)
        if d.running and d.paused:
            d.paused = False
            self.calls.append(("resume", name))

    # --- memory state -------------------------------------------------------------------------
    def save_memory(self, name: str, path: str) -> None:
        self.saved[path] = self._running(name, "save the memory of").xml
        self.calls.append(("save_memory", name))

    def saved_xml(self, path: str) -> str:
        if path not in self.saved:
            raise HypervisorError(f"read {path}: no save image there")
        return self.saved[path]

    def restore_memory(self, path: str, xml: str | None = None) -> None:
        xml = xml or self.saved_xml(path)
        name = domain_name(xml)
        if name in self.domains and self.domains[name].running:
            raise HypervisorError(f"restore from {path}: domain '{name}' is already active")
        d = self._put(xml, f"restore from {path}")
        d.running, d.paused = True, False
        self.calls.append(("restore_memory", name))

    # --- guest agent --------------------------------------------------------------------------
    def _agent(self, name: str) -> FakeDomain:
        d = self._running(name, "guest agent of")
        if not (d.agent and has_agent_channel(d.xml)) or d.paused:
            raise AgentUnavailable(name, "QEMU guest agent is not connected")
        return d

    def guest_ping(self, name: str, timeout: float) -> bool:
        try:
            self._agent(name)
        except (AgentUnavailable, HypervisorError):
            return False
        return True

    def fs_freeze(self, name: str, timeout: float) -> int:
        d = self._agent(name)
        d.frozen = self.filesystems
        return d.frozen

    def fs_thaw(self, name: str, timeout: float) -> int:
        d = self._agent(name)
        thawed, d.frozen = d.frozen, 0
        return thawed

    def fs_freeze_status(self, name: str, timeout: float) -> str:
        return "frozen" if self._agent(name).frozen else "thawed"

    def guest_exec(self, name: str, argv: list[str], timeout: float) -> GuestExecResult:
        self._agent(name)
        raise _cannot(f"guest-exec {argv[0] if argv else ''} on {name}")

    # --- backup API and checkpoints -----------------------------------------------------------
    def backup_begin(
        self, name: str, backup_xml: str, checkpoint_xml: str | None, *, reuse: bool = False
    ) -> None:
        self.record(name)
        raise _cannot(f"backup begin on {name}")

    def job_progress(self, name: str) -> tuple[bool, int, int]:
        self.record(name)
        return False, 0, 0  # no job ever runs

    def job_result(self, name: str) -> tuple[bool, str]:
        self.record(name)
        return False, "no job ran (the fake hypervisor runs no jobs)"

    def abort_job(self, name: str) -> None:
        self.record(name)

    def disk_size(self, name: str, target: str) -> tuple[int, int]:
        self.record(name)
        if (name, target) not in self.disk_sizes:
            raise _cannot(f"block info of {name}/{target} (set disk_sizes)")
        return self.disk_sizes[(name, target)]

    def checkpoint_size(self, name: str, checkpoint: str, target: str) -> int | None:
        return None

    def checkpoints(self, name: str) -> list[str]:
        return list(self.record(name).checkpoints)

    def delete_checkpoint(self, name: str, checkpoint: str) -> None:
        d = self.record(name)
        if checkpoint in d.checkpoints:
            d.checkpoints.remove(checkpoint)

    # --- block jobs ---------------------------------------------------------------------------
    def block_pull(self, name: str, target: str, bandwidth_mib: int = 0) -> None:
        self._running(name, "block pull")
        raise _cannot(f"block pull {name}/{target}")

    def block_job(self, name: str, target: str) -> tuple[int, int] | None:
        self.record(name)
        return None

    def block_job_abort(self, name: str, target: str) -> None:
        self.record(name)

    # --- the host: knobs for tests of its monitoring --------------------------------------------
    node: dict[str, int] | None = None  # the host's figures (None: 4 CPUs, 8 GiB, 6 GiB free)
    reachable: bool = True  # False: libvirt cannot be reached

    def node_info(self) -> dict[str, int]:
        if not self.reachable:
            raise HypervisorUnreachable(self.uri, "the fake host is down")
        return dict(self.node or {"cpus": 4, "memory_kib": 8 << 20, "free_memory_kib": 6 << 20})


class FakeCheckpoints:
    """``carry.CheckpointSide`` over a fake domain: a checkpoint's XML names its parent (the one
    before it in the list)."""

    def __init__(self, hv: FakeHypervisor, name: str) -> None:
        self.hv, self.name, self.where = hv, name, hv.uri

    def read(self) -> list[tuple[str, str]]:
        names = self.hv.record(self.name).checkpoints
        return [(n, checkpoint_xml(n, names[i - 1] if i else None)) for i, n in enumerate(names)]

    def drop_metadata(self, name: str) -> None:
        self.hv.record(self.name).checkpoints.remove(name)

    def redefine(self, xml: str) -> None:
        d = self.hv.record(self.name)
        name = ET.fromstring(xml).findtext("name", "")
        if d.running and not self.hv.keeps_bitmaps:
            raise HypervisorError(f"missing or broken bitmap '{name}' for disk 'vda'")
        d.checkpoints.append(name)


def checkpoint_xml(name: str, parent: str | None) -> str:
    inner = f"<parent><name>{parent}</name></parent>" if parent else ""
    return f"<domaincheckpoint><name>{name}</name>{inner}</domaincheckpoint>"


class FakeVmm(Vmm):
    """The ``native`` VMM driver's actions on a ``FakeHypervisor``'s records. Errors are the
    native driver's: DomainNotFound for an unknown domain, else VmmError naming the action."""

    kind = "native"

    def __init__(self, hv: FakeHypervisor, shutdown_timeout: float = 120.0) -> None:
        self.hv = hv
        self.shutdown_timeout = shutdown_timeout

    def _call(self, action: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except DomainNotFound:
            raise
        except HypervisorError as err:
            raise VmmError("native", action, str(err)) from err

    def _on(self, action: str, domain: str, *, running: bool = False) -> FakeDomain:
        d = self._call(action, lambda: self.hv.record(domain))
        if running and not d.running:
            raise VmmError("native", action, f"domain {domain} is not running")
        return d

    def _edit(self, action: str, domain: str, edit: Callable[[str], str]) -> None:
        d = self._on(action, domain)
        d.xml = edit(d.xml)
        self.hv.calls.append((action, domain))

    # --- lifecycle ----------------------------------------------------------------------------
    def deploy(self, domain: str, xml: str) -> str:
        name = self._call("deploy", lambda: self.hv.define(xml))
        if not self.hv.domains[name].running:
            self._call("deploy", lambda: self.hv.start(name))
        return name

    def shutdown(self, domain: str) -> None:
        d = self._on("shutdown", domain)
        self.hv.shutdown(domain)
        if d.running:
            raise VmmError(
                "native",
                "shutdown",
                f"{domain} did not power off within {self.shutdown_timeout:.0f} s",
            )

    def cancel(self, domain: str) -> None:
        self._on("cancel", domain)
        self.hv.destroy(domain)

    def reboot(self, domain: str) -> None:
        self._on("reboot", domain, running=True)
        self.hv.calls.append(("reboot", domain))

    def reset(self, domain: str) -> None:
        self._on("reset", domain, running=True)
        self.hv.calls.append(("reset", domain))

    def save(self, domain: str, file: str) -> None:
        self._call("save", lambda: self.hv.save_memory(domain, file))
        self.hv.destroy(domain)  # the guest stops; a persistent definition stays

    def restore(self, file: str) -> None:
        xml = self._call("restore", lambda: self.hv.saved_xml(file))
        self._call("restore", lambda: self.hv.restore_memory(file))
        self._call("restore", lambda: self.hv.define(xml))  # a restored domain is transient

    def undefine(self, domain: str) -> None:
        self.hv.undefine(domain)

    def poll(self, domain: str) -> dict[str, str]:
        d = self.hv.domains.get(domain)
        if d is None or not d.running:
            return {"STATE": "d"}
        zero = dict.fromkeys(("NETRX", "NETTX", "DISKRDBYTES", "DISKWRBYTES"), "0")
        zero |= dict.fromkeys(("DISKRDIOPS", "DISKWRIOPS", "MEMORY"), "0")
        return {"STATE": "p" if d.paused else "a", "CPU": "0.0", **zero}

    # --- snapshots ----------------------------------------------------------------------------
    def snapshot_create(self, domain: str, snapshot_id: int) -> str:
        d = self._on("snapshot_create", domain)
        name = f"snap-{snapshot_id}"
        d.snapshots[name] = (d.xml, d.running, d.paused)
        self.hv.calls.append(("snapshot_create", domain))
        return name

    def _snapshot(self, action: str, domain: str, name: str) -> FakeDomain:
        d = self._on(action, domain)
        if name not in d.snapshots:
            raise VmmError("native", action, f"no domain snapshot with matching name '{name}'")
        return d

    def snapshot_revert(self, domain: str, name: str) -> None:
        d = self._snapshot("snapshot_revert", domain, name)
        d.xml, d.running, d.paused = d.snapshots[name]
        self.hv.calls.append(("snapshot_revert", domain))

    def snapshot_delete(self, domain: str, name: str) -> None:
        del self._snapshot("snapshot_delete", domain, name).snapshots[name]
        self.hv.calls.append(("snapshot_delete", domain))

    # --- hotplug ------------------------------------------------------------------------------
    def attach_disk(self, domain: str, disk: DiskSpec) -> None:
        if disk.target in {x.target for x in parse_disks(self._on("attach_disk", domain).xml)}:
            raise VmmError("native", "attach_disk", f"target {disk.target} already exists")
        self._edit("attach_disk", domain, lambda xml: with_device(xml, disk_device_xml(disk)))

    def detach_disk(self, domain: str, disk: DiskSpec) -> None:
        if disk.target not in {x.target for x in parse_disks(self._on("detach_disk", domain).xml)}:
            raise VmmError("native", "detach_disk", f"no target device {disk.target}")
        self._edit("detach_disk", domain, lambda xml: without_disk(xml, disk.target))

    def attach_nic(self, domain: str, nic: NicSpec) -> None:
        self._edit("attach_nic", domain, lambda xml: with_device(xml, nic_device_xml(nic)))

    def detach_nic(self, domain: str, mac: str) -> None:
        if mac not in mac_addresses(self._on("detach_nic", domain).xml):
            raise VmmError("native", "detach_nic", f"no NIC with MAC {mac}")
        self._edit("detach_nic", domain, lambda xml: without_nic(xml, mac))

    def resize_disk(self, domain: str, target: str, size: int) -> None:
        self._on("resize_disk", domain, running=True)
        _capacity, allocation = self.hv.disk_sizes.get((domain, target), (0, 0))
        self.hv.disk_sizes[(domain, target)] = (size, allocation)
        self.hv.calls.append(("resize_disk", domain))

    # --- migration ----------------------------------------------------------------------------
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
        src = self.hv
        d = self._on("migrate", domain)
        dest = FAKE_HOSTS.get(dest_uri)
        if dest is None or dest is src:
            raise VmmError("native", "migrate", f"cannot reach {dest_uri}")
        if domain in dest.domains:
            raise VmmError("native", "migrate", f"domain '{domain}' already exists on {dest_uri}")

        def move() -> None:
            if progress is not None:
                progress(0, 1 << 20)  # a cancel raises here: nothing has moved yet
            if src.migrate_error:
                err, src.migrate_error = src.migrate_error, None
                raise VmmError("native", "migrate", err)
            if src.refuses_checkpoints and d.checkpoints:
                raise VmmError("native", "migrate", "cannot migrate domain with checkpoints")
            if progress is not None:
                progress(1 << 20, 1 << 20)

        def refused(err: BaseException) -> bool:
            return "checkpoints" in str(err)

        _, saved = carry.migrate_with_checkpoints(FakeCheckpoints(src, domain), move, refused)
        del src.domains[domain]
        moved = FakeDomain(d.name, d.uuid, d.xml, True, d.running, d.paused, d.agent)
        moved.obeys_shutdown, moved.snapshots = d.obeys_shutdown, d.snapshots
        dest.domains[domain] = moved
        for key in [k for k in src.disk_sizes if k[0] == domain]:
            dest.disk_sizes[key] = src.disk_sizes.pop(key)
        names, why = carry.redefine_all(FakeCheckpoints(dest, domain), saved)
        src.calls.append(("migrate", domain))
        out = Migration(names, why, live and d.running, 10, 1 if d.running else None, 1 << 20)
        src.migrations.append((domain, dest_uri, out))
        return out
