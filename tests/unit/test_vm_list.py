"""``vm list`` reads the rows as plain tuples and writes only the VMs whose state libvirt changed;
what it returns and what it writes must agree with ``vm show``'s refresh of one VM (one rule)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from vmkeep.catalog.tables import Vm
from vmkeep.config import load_config
from vmkeep.engine.core.context import Context
from vmkeep.engine.vm import inventory
from vmkeep.errors import DomainNotFound
from vmkeep.model import DomainInfo, LcmState, VmState


class Domains:
    """The one hypervisor call ``list_vms`` makes (fake: this tests the catalog logic only)."""

    def __init__(self, live: dict[str, DomainInfo]) -> None:
        self.live = live

    def states(self) -> dict[str, DomainInfo]:
        return self.live

    def domain(self, name: str) -> DomainInfo:
        if name not in self.live:
            raise DomainNotFound(name, "qemu:///system")
        return self.live[name]


def running(name: str, paused: bool = False) -> DomainInfo:
    return DomainInfo(name, f"uuid-{name}", VmState.ACTIVE, paused, True)


ROWS = {  # name: (state, lcm_state, state_file) in the catalog
    "stays": (VmState.ACTIVE, LcmState.RUNNING, None),
    "paused": (VmState.ACTIVE, LcmState.RUNNING, None),  # libvirt: paused -> SUSPENDED
    "gone": (VmState.ACTIVE, LcmState.RUNNING, None),  # no domain any more -> UNKNOWN
    "stopped": (VmState.STOPPED, LcmState.UNKNOWN, "/x/state"),  # off the host, no domain
    "busy": (VmState.ACTIVE, LcmState.BACKUP, None),  # a backup runs: its lcm_state is kept
}


def test_list_returns_and_writes_what_libvirt_says(
    clean_env: Path, updated_rows: Callable[[Any], list[Any]]
) -> None:
    config = load_config()
    live = {n: running(n, paused=n == "paused") for n in ("stays", "paused", "busy")}
    ctx = Context(config, _hv=Domains(live))  # type: ignore[arg-type]
    with ctx.catalog.session() as s:
        for name, (state, lcm, state_file) in ROWS.items():
            s.add(Vm(name=name, uuid=f"uuid-{name}", host_uri="qemu:///system", state=state,
                     lcm_state=lcm, state_file=state_file, backup_config={"mode": "increment"}))  # fmt: skip
    updates = updated_rows(ctx.catalog.engine)
    listed = {d["name"]: (d["state"], d["lcm_state"]) for d in inventory.list_vms(ctx)}
    want = {
        "stays": (VmState.ACTIVE, LcmState.RUNNING),
        "paused": (VmState.SUSPENDED, LcmState.SUSPENDED),
        "gone": (VmState.UNKNOWN, LcmState.UNKNOWN),
        "stopped": (VmState.STOPPED, LcmState.UNKNOWN),
        "busy": (VmState.ACTIVE, LcmState.BACKUP),
    }
    assert listed == want
    assert len(updates) == 2  # "paused" and "gone" only
    with ctx.catalog.session() as s:
        stored = {v.name: (v.state, v.lcm_state) for v in s.execute(select(Vm)).scalars()}
    assert stored == want
    assert inventory.list_vms(ctx)[0]["backup_config"]["mode"] == "INCREMENT"
    assert [inventory.show_vm(ctx, n)["state"] for n in want] == [st for st, _ in want.values()]
    before = len(updates)
    inventory.list_vms(ctx)
    assert len(updates) == before  # nothing changed since: a list writes nothing
