"""The one table of VM actions and the states they need (OpenNebula's DispatchManager): the CLI, the
API (a 409 before a job is queued) and the engine (again under the VM's lock) all read it, and
docs/lifecycle.md is generated from it (``scripts/regen_lifecycle.py``; a unit test keeps the two
in sync). Also the only home of named sets of VM and lcm states (busy, stale, off the host, ...):
other modules import them from here. No I/O here.

Each rule: the lcm states the action is allowed from; the transient lcm state while the VMM driver
works; where a success leaves the VM; where a failure leaves it (None: back where it was, with
the error on the VM; a ``*_FAILURE`` state: ``vm recover`` decides).
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass

from vmkeep.model import LcmState as L
from vmkeep.model import VmState as S


@dataclass(frozen=True)
class Rule:
    needs: frozenset[L]
    through: L | None
    success: tuple[S, L] | None  # None: whatever the hypervisor says afterwards
    failure: L | None
    summary: str
    vmm: str = ""  # the VMM driver actions it calls
    supported: bool = True


def _r(
    needs: Set[L],
    through: L | None,
    success: tuple[S, L] | None,
    failure: L | None,
    summary: str,
    vmm: str = "",
    supported: bool = True,
) -> Rule:
    return Rule(frozenset(needs), through, success, failure, summary, vmm, supported)


# --- state sets: every named set of VM or lcm states lives here (nowhere else in src/) --------
# (VM state, lcm state) of an idle running VM, and of an idle powered-off one
RUNNING = (S.ACTIVE, L.RUNNING)
POWEROFF = (S.POWEROFF, L.POWEROFF)
# lcm states of an idle VM whose domain is on the host (running or powered off)
ON_HOST = frozenset({L.RUNNING, L.POWEROFF})
# transient states: a process that died in one leaves it; ``recover`` ends it
TRANSIENT = frozenset(
    {
        L.BOOT,
        L.SHUTDOWN,
        L.SHUTDOWN_POWEROFF,
        L.SHUTDOWN_UNDEPLOY,
        L.SAVE_SUSPEND,
        L.SAVE_STOP,
        L.HOTPLUG,
        L.HOTPLUG_NIC,
        L.HOTPLUG_SNAPSHOT,
        L.HOTPLUG_RESIZE,
        L.DISK_SNAPSHOT,
        L.DISK_RESIZE,
        L.CLEANUP_DELETE,
        L.MIGRATE,
    }
)
# failure states a lifecycle action may leave: only ``vm recover`` (or ``terminate``) ends them
FAILURES = frozenset({L.BOOT_FAILURE, L.EPILOG_FAILURE})
# lcm states only a running vmkeep action may hold: with no live owner they are leftovers
STALE_STATES = frozenset({L.BACKUP, L.BACKUP_POWEROFF, L.QUIESCING, L.UNQUIESCING, L.RESTORE})
# lcm states of a quiesce under way, held or being undone: the guard process watches them
QUIESCE_STATES = frozenset({L.QUIESCING, L.QUIESCED, L.UNQUIESCING})
# lcm states that mean "vmkeep is doing something"; a refresh from libvirt leaves them alone
BUSY_STATES = frozenset(
    {
        L.BACKUP,
        L.BACKUP_POWEROFF,
        L.QUIESCING,
        L.QUIESCED,
        L.UNQUIESCING,
        L.RESTORE,
        L.ERROR,
        *TRANSIENT,
        *FAILURES,
    }
)
# VM states only vmkeep knows (the domain is off the host, or saved): libvirt's view never
# replaces them unless the domain runs again
OFF_HOST = frozenset({S.PENDING, S.HOLD, S.STOPPED, S.UNDEPLOYED, S.DONE})

RULES: dict[str, Rule] = {
    # --- lifecycle (``vmkeep vm ACTION VM``) ---------------------------------------------------
    "create": _r(set(), None, (S.PENDING, L.PENDING), None,
                 "define a new VM in the catalog from a domain XML (--hold: HOLD)"),
    "hold": _r({L.PENDING}, None, (S.HOLD, L.HOLD), None, "keep a PENDING VM from deploying"),
    "release": _r({L.HOLD}, None, (S.PENDING, L.PENDING), None, "HOLD back to PENDING"),
    "deploy": _r({L.PENDING, L.UNDEPLOYED}, L.BOOT, RUNNING, L.BOOT_FAILURE,
                 "define and boot the VM on the host", "deploy"),
    "poweroff": _r({L.RUNNING}, L.SHUTDOWN_POWEROFF, POWEROFF, None,
                   "shut the guest down (--hard: pull the plug); disks and definition stay",
                   "shutdown | cancel"),
    "reboot": _r({L.RUNNING}, None, RUNNING, None, "reboot the guest (--hard: reset)",
                 "reboot | reset"),
    "suspend": _r({L.RUNNING}, L.SAVE_SUSPEND, (S.SUSPENDED, L.SUSPENDED), None,
                  "save the memory to a state file on the host; the guest stops", "save"),
    "resume": _r({L.SUSPENDED, L.STOPPED, L.POWEROFF}, L.BOOT, RUNNING, L.BOOT_FAILURE,
                 "bring a suspended or stopped VM back with its memory; boot a powered-off one",
                 "restore | deploy"),
    "stop": _r({L.RUNNING}, L.SAVE_STOP, (S.STOPPED, L.STOPPED), L.EPILOG_FAILURE,
               "save the memory to a state file and take the VM off the host", "save"),
    "undeploy": _r({L.RUNNING, L.POWEROFF}, L.SHUTDOWN_UNDEPLOY, (S.UNDEPLOYED, L.UNDEPLOYED),
                   L.EPILOG_FAILURE, "shut down (--hard) and take the VM off the host; disks stay",
                   "shutdown | cancel"),
    "terminate": _r({L.PENDING, L.HOLD, L.RUNNING, L.POWEROFF, L.SUSPENDED, L.STOPPED,
                     L.UNDEPLOYED, *FAILURES}, L.CLEANUP_DELETE, (S.DONE, L.DONE),
                    L.EPILOG_FAILURE, "destroy the VM and delete its disks (--keep-disks)",
                    "shutdown | cancel"),
    "snapshot-create": _r(ON_HOST, L.HOTPLUG_SNAPSHOT, None, None,
                          "system snapshot: disks and, running, memory", "snapshot_create"),
    "snapshot-revert": _r(ON_HOST, L.HOTPLUG_SNAPSHOT, None, None,
                          "back to a system snapshot (RAM too when it has it)", "snapshot_revert"),
    "snapshot-delete": _r(ON_HOST, L.HOTPLUG_SNAPSHOT, None, None, "delete a system snapshot",
                          "snapshot_delete"),
    "disk-snapshot-create": _r({L.POWEROFF}, L.DISK_SNAPSHOT, POWEROFF, None,
                               "snapshot of one disk (qcow2 internal, no memory)"),
    "disk-snapshot-revert": _r({L.POWEROFF}, L.DISK_SNAPSHOT, POWEROFF, None,
                               "one disk back to its snapshot"),
    "disk-snapshot-delete": _r({L.POWEROFF}, L.DISK_SNAPSHOT, POWEROFF, None,
                               "delete a disk snapshot"),
    "disk-attach": _r(ON_HOST, L.HOTPLUG, None, None,
                      "add a disk (hotplug when running)", "attach_disk"),
    "disk-detach": _r(ON_HOST, L.HOTPLUG, None, None, "remove a disk", "detach_disk"),
    "nic-attach": _r(ON_HOST, L.HOTPLUG_NIC, None, None, "add a NIC", "attach_nic"),
    "nic-detach": _r(ON_HOST, L.HOTPLUG_NIC, None, None, "remove a NIC", "detach_nic"),
    "resize": _r({L.POWEROFF, L.UNDEPLOYED}, L.HOTPLUG_RESIZE, None, None,
                 "change vCPUs and memory (applied at the next boot)"),
    "disk-resize": _r(ON_HOST, L.DISK_RESIZE, None, None, "grow a disk", "resize_disk"),
    "recover": _r({*FAILURES, *TRANSIENT}, None, None, None,
                  "admin: end a *_FAILURE or stuck state (--success, --failure, --retry, "
                  "--delete)"),
    "migrate": _r(ON_HOST, L.MIGRATE, None, None,
                  "move the VM to another host, running (--live: it runs on during the copy) "
                  "or powered off, in the state it had (--copy-storage: its disks too)",
                  "migrate"),
    # --- data protection (other commands; the same table) ------------------------------------
    "backup": _r({L.RUNNING, L.POWEROFF}, L.BACKUP, None, None,
                 "backup (BACKUP_POWEROFF for a powered-off VM)"),
    "group backup": _r({L.RUNNING, L.POWEROFF}, L.BACKUP, None, None,
                       "one member of a group backup"),
    "quiesce": _r({L.RUNNING}, L.QUIESCING, (S.ACTIVE, L.QUIESCED), None,
                  "freeze the guest's file systems"),
    "unquiesce": _r({L.QUIESCED}, L.UNQUIESCING, RUNNING, None, "thaw them"),
    "start": _r({L.POWEROFF, L.RUNNING}, None, RUNNING, None,
                "start (group restore and start order)"),
    "group stop": _r({L.POWEROFF, L.RUNNING, L.SUSPENDED}, None, POWEROFF, None,
                     "power a group's members off in its stop order"),
    "restore in place": _r({L.POWEROFF}, L.RESTORE, None, None,
                           "roll the VM back to a restore point"),
}  # fmt: skip


# actions of the data-protection commands (the rest are ``vmkeep vm ACTION``)
DATA_ACTIONS = frozenset(
    {"backup", "group backup", "quiesce", "unquiesce", "start", "group stop", "restore in place"}
)


def needs(action: str) -> frozenset[L]:
    return RULES[action].needs


def table_markdown() -> str:
    """docs/lifecycle.md's table."""
    lines = [
        "| action | allowed from (lcm state) | while it runs | on success | on failure "
        "| VMM driver | what it does |",
        "|---|---|---|---|---|---|---|",
    ]
    for action, r in RULES.items():
        allowed = ", ".join(sorted(r.needs)) or "(new VM)"
        success = f"{r.success[0]} / {r.success[1]}" if r.success else "as the hypervisor says"
        failure = r.failure or "back, error kept"
        what = r.summary + ("" if r.supported else " (not supported yet: refused)")
        lines.append(
            f"| `{action}` | {allowed} | {r.through or '-'} | {success} | {failure} "
            f"| {r.vmm or '-'} | {what} |"
        )
    return "\n".join(lines) + "\n"
