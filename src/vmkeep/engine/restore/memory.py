"""Memory state (stoney's state file): a point taken with BACKUP_CONFIG ``memory`` holds the guest's
RAM saved at the paused instant its disks were captured (``N.memory``, libvirt's save-image format).
A restore of that point resumes the guest where it was; ``--without-memory`` boots it cold.

libvirt resumes a save image only as the same domain (same name, UUID, machine and devices; disk
paths may differ), so a point with memory comes back as the VM itself: rolled back in place, or
recreated when its domain is gone. Limits: the same QEMU machine type and CPU model are needed
(libvirt checks the ABI and says what differs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmkeep.catalog.tables import Increment
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.trust import check_stored_xml
from vmkeep.errors import HypervisorError, InvalidValue, Refused
from vmkeep.hypervisor.domain_xml import with_disks
from vmkeep.model import Warnings


def memory_entry(target: Increment) -> dict[str, Any] | None:
    """The memory state file row of a point, if it has one."""
    return next((f for f in target.files if f.get("memory")), None)


def check_new_vm(ctx: Context, name: str, uuid: str, new_name: str | None) -> None:
    """A point with memory restored as a new VM comes back as the VM itself (``name``, ``uuid``):
    refuse when that VM still exists or another name is asked for."""
    if new_name is not None and new_name != name:
        raise InvalidValue(
            "--name",
            new_name,
            f"this point holds memory state, which resumes only as VM {name} itself (libvirt "
            "keeps its name and UUID); drop --name, or add --without-memory to boot a copy cold",
        )
    clash = next((d.name for d in ctx.hv.list_domains() if d.uuid == uuid or d.name == name), None)
    if clash is not None:
        raise Refused(
            f"restoring this point as a new VM (it holds memory state, which resumes only as "
            f"VM {name} itself, UUID {uuid})",
            f"domain {clash} still exists",
            "Roll it back with --in-place (power it off first), or add --without-memory to "
            "boot a copy cold.",
        )


def resume(
    ctx: Context,
    state: Path,
    disks: dict[str, Path],
    warnings: Warnings,
    persistent_xml: str | None = None,
    fmt: str | None = None,
) -> bool:
    """Resume the domain from ``state`` with ``disks`` in place (``persistent_xml``: define it
    afterwards, for a domain that did not exist; ``fmt``: the images' format when it changed).
    Returns whether it resumed; when libvirt refuses
    (changed machine or devices), the domain stays powered off with its restored disks and a
    warning says how to start it."""
    try:
        xml = with_disks(ctx.hv.saved_xml(str(state)), disks, fmt)
        check_stored_xml(ctx.config, xml, "resuming a memory state", disks.values())
        ctx.hv.restore_memory(str(state), xml)
    except HypervisorError as err:
        if persistent_xml is not None:
            ctx.hv.define(persistent_xml)
        warnings.add(
            f"the memory state could not be resumed ({err}); the disks are restored and the VM "
            "is powered off: start it for a cold boot (or restore with --without-memory)"
        )
        return False
    if persistent_xml is not None:
        ctx.hv.define(persistent_xml)
    return True
