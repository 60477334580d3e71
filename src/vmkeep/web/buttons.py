"""Which action buttons a page shows: the actions the action table has, whose allowed states
(``engine/core/states.py``) hold the VM's lcm state now, and whose policy key the viewer's role
may use. Only what to show: the server checks again when the form is posted (``Web.act``:
``tokens.authorize``, then the action's own check)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vmkeep.engine.core import states
from vmkeep.engine.core.trust import Actor
from vmkeep.engine.service import actions
from vmkeep.web.base import Web


@dataclass(frozen=True)
class Button:
    kind: str  # the action table's kind: the form's data-action and /act/<kind>
    label: str
    fields: dict[str, Any] = field(default_factory=dict)
    confirm: str | None = None  # asked in the browser before the form is sent
    danger: bool = False


# lifecycle actions a VM row offers without further input: (state rule, label, confirm)
_LIFECYCLE = [
    ("deploy", "Deploy", None),
    ("release", "Release", None),
    ("hold", "Hold", None),
    ("resume", "Resume", None),
    ("reboot", "Reboot", None),
    ("poweroff", "Power off", "Shut down {vm}?"),
    ("suspend", "Suspend", None),
    ("stop", "Stop", "Save {vm}'s memory and take it off the host?"),
    ("undeploy", "Undeploy", "Take {vm} off the host (disks kept)?"),
    ("terminate", "Terminate", "Destroy {vm} and delete its disks? This cannot be undone."),
]


def allowed(web: Web, actor: Actor, kind: str, rule: str, lcm_state: str) -> bool:
    a = actions.ACTIONS.get(kind)
    r = states.RULES.get(rule)
    return (
        a is not None
        and r is not None
        and r.supported
        and lcm_state in r.needs
        and web.can(actor, a.policy)
    )


def vm_buttons(web: Web, actor: Actor, vm: dict[str, Any]) -> list[Button]:
    """The buttons of a VM (besides "back up now", which needs a datastore: ``can_backup``)."""
    name, lcm = vm["name"], vm["lcm_state"]
    out = []
    for rule, label in (("quiesce", "Quiesce"), ("unquiesce", "Thaw")):
        if allowed(web, actor, rule, rule, lcm):
            out.append(Button(rule, label, {"vm": name}))
    for rule, label, confirm in _LIFECYCLE:
        if allowed(web, actor, f"vm-{rule}", rule, lcm):
            text = confirm.format(vm=name) if confirm else None
            out.append(Button(f"vm-{rule}", label, {"vm": name}, text, rule == "terminate"))
    return out


def can_backup(web: Web, actor: Actor, vm: dict[str, Any]) -> bool:
    return allowed(web, actor, "backup", "backup", vm["lcm_state"])


def point_buttons(
    web: Web, actor: Actor, backup: dict[str, Any], inc: dict[str, Any]
) -> list[Button]:
    """The buttons of one restore point (a chain's increment): drill it; on the chain's newest
    point also verify the chain and delete that point (a chain loses only its newest increment,
    ``engine/points/delete.py``)."""
    if inc["status"] != "VALID":
        return []
    bid, seq = backup["id"], inc["id"]
    newest = inc is backup["increments"][-1]
    out = []
    if newest and web.can(actor, "verify"):
        out.append(Button("verify", "Verify chain", {"backup": bid}))
    if web.can(actor, "drill"):
        out.append(Button("drill", "Drill", {"backup": bid, "increment": seq}))
    if newest and web.can(actor, "backup-delete"):
        out.append(Button("delete", "Delete", {"backup": bid, "increment": seq},
                          f"Delete point {bid}.{seq} of {backup['vm']}?", danger=True))  # fmt: skip
    return out


def chain_buttons(web: Web, actor: Actor, backup: dict[str, Any]) -> list[Button]:
    """The buttons of a whole chain: delete it (every point in it)."""
    if not web.can(actor, "backup-delete") or backup["status"] == "RUNNING":
        return []
    n = len(backup["increments"])
    text = f"Delete chain {backup['id']} of {backup['vm']} with its {n} points?"
    return [Button("delete", "Delete chain", {"backup": backup["id"]}, text, danger=True)]
