"""The hypervisor interface the engine talks to (OpenNebula's VMM driver actions).

The engine never names a concrete implementation: it gets one from ``Context.hv`` and, for the
lifecycle, the host's in-process VMM driver from ``native_vmm()``. The engine's unit tests use
the in-memory ``FakeHypervisor`` (``fake.py``) behind this interface; end-to-end tests use the
native libvirt implementation in ``native.py`` against a real libvirtd.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from vmkeep.errors import HypervisorError
from vmkeep.hypervisor.vmm import Vmm
from vmkeep.model import DomainInfo, GuestExecResult


class Hypervisor(ABC):
    uri: str

    def reconnect(self, wait: float = 60.0) -> None:  # noqa: B027 (optional; in-process fakes)
        """Drop the connection and open a new one, waiting up to ``wait`` s for the daemon."""

    def qemu_ids(self) -> tuple[int, int] | None:
        """The uid and gid QEMU runs as (libvirt's DAC label); None when unknown."""
        return None

    @abstractmethod
    def native_vmm(self) -> Vmm:
        """The ``native`` VMM driver of this hypervisor: the lifecycle's actions in-process, on
        this hypervisor's own connection (a host whose ``[[hosts]]`` entry says ``vmm = native``,
        or that has none)."""

    # --- inventory -----------------------------------------------------------------------------
    @abstractmethod
    def list_domains(self) -> list[DomainInfo]:
        """Every domain libvirt knows (running and defined)."""

    @abstractmethod
    def states(self) -> dict[str, DomainInfo]:
        """Every domain's name -> state and paused flag only (one cheap call for list views;
        the other DomainInfo fields are left empty)."""

    @abstractmethod
    def domain(self, name: str) -> DomainInfo:
        """One domain; raises DomainNotFound."""

    @abstractmethod
    def domain_xml(self, name: str, *, inactive: bool = False) -> str:
        """The domain's XML (``inactive=True``: the persistent definition)."""

    # --- lifecycle (deploy / cancel / shutdown / save-restore in OpenNebula's terms) ------------
    @abstractmethod
    def define(self, xml: str) -> str:
        """Define a persistent domain from XML; returns its name."""

    @abstractmethod
    def start(self, name: str, *, paused: bool = False) -> None:
        """Start a defined domain (``paused``: no vCPU runs; used to read disks of an off VM)."""

    @abstractmethod
    def destroy(self, name: str) -> None:
        """Hard power-off (OpenNebula 'cancel'); no error if already off."""

    @abstractmethod
    def shutdown(self, name: str) -> None:
        """Ask the guest to power off (agent, else ACPI); returns at once, no error if off."""

    @abstractmethod
    def undefine(self, name: str) -> None:
        """Remove the definition (and its checkpoint metadata); no error if absent."""

    @abstractmethod
    def suspend(self, name: str) -> None:
        """Pause the vCPUs."""

    @abstractmethod
    def resume(self, name: str) -> None:
        """Resume paused vCPUs; no error if already running."""

    # --- memory state --------------------------------------------------------------------------
    @abstractmethod
    def save_memory(self, name: str, path: str) -> None:
        """Write RAM and device state to ``path``; the domain and its disks stay as they are."""

    @abstractmethod
    def saved_xml(self, path: str) -> str:
        """The domain XML held by a memory state file."""

    @abstractmethod
    def restore_memory(self, path: str, xml: str | None = None) -> None:
        """Bring the domain back running from a memory state file (``xml``: other disk paths)."""

    # --- guest agent: every call has a timeout --------------------------------------------------
    @abstractmethod
    def guest_ping(self, name: str, timeout: float) -> bool:
        """True when the guest agent answers within ``timeout``."""

    @abstractmethod
    def fs_freeze(self, name: str, timeout: float) -> int:
        """Freeze the guest file systems; returns how many were frozen.

        Raises AgentUnavailable when there is no agent, AgentTimeout when it does not answer."""

    @abstractmethod
    def fs_thaw(self, name: str, timeout: float) -> int:
        """Thaw the guest file systems; returns how many were thawed."""

    @abstractmethod
    def fs_freeze_status(self, name: str, timeout: float) -> str:
        """'frozen' or 'thawed', as the guest agent reports it."""

    @abstractmethod
    def guest_exec(self, name: str, argv: list[str], timeout: float) -> GuestExecResult:
        """Run a program in the guest through the agent and wait for it (tests and the lab)."""

    # --- backup API (push mode) and checkpoints -------------------------------------------------
    @abstractmethod
    def backup_begin(
        self, name: str, backup_xml: str, checkpoint_xml: str | None, *, reuse: bool = False
    ) -> None:
        """Start a push-mode backup job; the point in time is fixed when this returns. ``reuse``:
        the target files exist already (created before the guest was frozen), else libvirt
        creates them.

        Raises CheckpointInvalid when the incremental's checkpoint is missing or inconsistent."""

    @abstractmethod
    def job_progress(self, name: str) -> tuple[bool, int, int]:
        """(active, processed bytes, total bytes) of the domain's current job."""

    @abstractmethod
    def job_result(self, name: str) -> tuple[bool, str]:
        """(success, error message) of the domain's last completed job."""

    @abstractmethod
    def abort_job(self, name: str) -> None:
        """Abort the domain's running job; no error when there is none."""

    @abstractmethod
    def disk_size(self, name: str, target: str) -> tuple[int, int]:
        """``(capacity, allocation)`` of a disk in bytes: its virtual size (what the guest sees)
        and what its image has allocated (what a full backup copies, about)."""

    @abstractmethod
    def checkpoint_size(self, name: str, checkpoint: str, target: str) -> int | None:
        """Bytes changed on ``target`` since ``checkpoint`` (running domain), None if unknown."""

    @abstractmethod
    def checkpoints(self, name: str) -> list[str]:
        """Checkpoint names of the domain."""

    @abstractmethod
    def delete_checkpoint(self, name: str, checkpoint: str) -> None:
        """Delete a checkpoint (its bitmap merges into the parent); no error when absent."""

    # --- block jobs (instant restore) -----------------------------------------------------
    def block_pull(self, name: str, target: str, bandwidth_mib: int = 0) -> None:
        """Start pulling the disk's backing chain into its top image (the domain runs on)."""
        raise NotImplementedError

    def block_job(self, name: str, target: str) -> tuple[int, int] | None:
        """(done, total) of the disk's running block job, None when none runs."""
        raise NotImplementedError

    def block_job_abort(self, name: str, target: str) -> None:
        """Abort the disk's block job; no error when there is none."""
        raise NotImplementedError

    # --- the host (``engine/hosts/monitor.py``) -------------------------------------------------
    def node_info(self) -> dict[str, int]:
        """The host's ``cpus``, ``memory_kib`` and ``free_memory_kib``; HypervisorUnreachable
        when libvirt cannot be reached."""
        raise HypervisorError(f"{self.uri}: the host's figures are not available")

    # --- networks (a group drill's isolated network) -------------------------------------------
    def network_create(self, xml: str) -> str:
        """Create and start a transient network from XML; returns its name."""
        raise HypervisorError(f"{self.uri}: networks are not supported")

    def network_destroy(self, name: str) -> None:
        """Stop the network (and undefine it when persistent); an absent one is no error."""
        raise HypervisorError(f"{self.uri}: networks are not supported")

    def networks(self) -> dict[str, str]:
        """Every network libvirt knows, active or defined: name -> its XML."""
        return {}

    def network_bridge(self, name: str) -> str:
        """The host bridge of an active network."""
        raise HypervisorError(f"{self.uri}: networks are not supported")
