"""Placement (rank, pin, every refusal naming each host and why), deploys placed before their
job is queued, and the redeploy of a failed host's VM (its refusals, the row moving, the
history, never two copies) on the fake hypervisor and a SQLite catalog."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from vmkeep.catalog.tables import Vm
from vmkeep.config import load_config
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.trust import LOCAL_ADMIN
from vmkeep.engine.groups import manage
from vmkeep.engine.hosts import placement, records
from vmkeep.engine.lifecycle import dispatch
from vmkeep.engine.restore import redeploy
from vmkeep.engine.service import actions
from vmkeep.errors import HostNotFound, HostUnavailable, InvalidValue, Refused
from vmkeep.hypervisor.domain_xml import cpu_memory
from vmkeep.hypervisor.fake import FakeHypervisor
from vmkeep.model import LcmState, VmState

GIB = 1 << 20  # KiB


def xml_of(name: str, disk: Path, mib: int = 256, vcpus: int = 1) -> str:
    return (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>{mib}</memory>"
        f"<vcpu>{vcpus}</vcpu><os><type>hvm</type></os><devices><disk type='file' "
        f"device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>"
        "<target dev='vda' bus='virtio'/></disk></devices></domain>"
    )


@pytest.fixture
def ctx_on(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str | None], Context]:
    """``ctx_on(host)``: a Context acting for that host (``[cluster] host``) on the fake."""

    def make(host: str | None) -> Context:
        if host is None:
            monkeypatch.delenv("VMKEEP_CLUSTER_HOST", raising=False)
        else:
            monkeypatch.setenv("VMKEEP_CLUSTER_HOST", host)
        return Context(load_config(), _hv=FakeHypervisor())

    return make


def host(
    ctx: Context,
    name: str,
    *,
    state: str = records.MONITORED,
    running: int = 0,
    free_kib: int = 4 * GIB,
    cpus: int = 4,
    heartbeat: float | None = 0.0,
) -> None:
    """A hosts row as its daemon's monitoring leaves it (``heartbeat``: seconds ago)."""
    records.add(ctx, name, f"qemu+tcp://{name}.invalid/system")
    with ctx.catalog.session() as s:
        h = records.find_host(s, name)
        h.state = state
        h.monitor = {"cpus": cpus, "free_memory_kib": free_kib, "running": running}
        if heartbeat is not None:
            h.heartbeat_at = datetime.now(UTC) - timedelta(seconds=heartbeat)


def test_the_size_read_from_a_definition() -> None:
    assert cpu_memory(xml_of("a", Path("/d"), 512, 2)) == (2, 512 * 1024)
    assert cpu_memory("<domain><memory>1048576</memory></domain>") == (1, GIB)
    assert cpu_memory("<domain><memory unit='GiB'>2</memory><vcpu>3</vcpu></domain>") == (
        3,
        2 * GIB,
    )
    assert placement.size_of(None) == (1, 0)


def test_rank_fewest_running_then_most_free_memory_then_name(ctx_on: Any) -> None:
    ctx = ctx_on(None)
    host(ctx, "h1", running=2, free_kib=8 * GIB)
    host(ctx, "h2", running=1, free_kib=2 * GIB)
    host(ctx, "h3", running=1, free_kib=3 * GIB)
    assert placement.place(ctx, 1, GIB) == "h3"  # h2 and h3 run one VM each: h3 has more free
    with ctx.catalog.session() as s:
        records.find_host(s, "h2").monitor = {"cpus": 4, "free_memory_kib": 3 * GIB, "running": 1}
    assert placement.place(ctx, 1, GIB) == "h2"  # a tie on both: the name
    assert placement.place(ctx, 1, GIB, exclude=("h2",)) == "h3"
    assert placement.place(ctx, 1, GIB, pin="h1") == "h1"  # pinned: the rank does not matter


def test_a_refusal_names_every_host_and_why(ctx_on: Any) -> None:
    ctx = ctx_on(None)
    host(ctx, "off", state=records.DISABLED)
    host(ctx, "down", state=records.ERROR)
    host(ctx, "quiet", heartbeat=600)
    host(ctx, "small", free_kib=GIB // 2)
    host(ctx, "narrow", cpus=1)
    with pytest.raises(HostUnavailable) as err:
        placement.place(ctx, 2, GIB)
    text = str(err.value)
    for part in (
        "off: it is DISABLED",
        "down: it is ERROR",
        "quiet: its daemon is silent",
        "small: 512 MiB free, the VM needs 1024 MiB",
        "narrow: 1 CPUs, the VM needs 2",
    ):
        assert part in text, text
    with pytest.raises(HostUnavailable, match="Host 'small' cannot take this now: 512 MiB free"):
        placement.place(ctx, 1, GIB, pin="small")
    with pytest.raises(HostNotFound):
        placement.place(ctx, 1, GIB, pin="nosuch")


def test_a_catalog_without_hosts_deploys_as_before(ctx_on: Any, tmp_path: Path) -> None:
    ctx = ctx_on(None)
    dispatch.create(ctx, xml_of("solo", tmp_path / "d.qcow2"))
    assert placement.deploy_host(ctx, "solo") is None
    with pytest.raises(InvalidValue, match="this catalog has no hosts"):
        placement.deploy_host(ctx, "solo", "h1")
    a = actions.action("vm-deploy")
    p = actions.check(ctx, a, actions.parse(a, {"vm": "solo"}), LOCAL_ADMIN)
    assert actions.runs_on(ctx, a, p) is None
    dispatch.run_action(ctx, "solo", "deploy")
    with ctx.catalog.session() as s:
        vm = s.execute(select(Vm).where(Vm.name == "solo")).scalar_one()
        assert (vm.host, vm.lcm_state) == (None, LcmState.RUNNING)


def test_deploy_is_placed_before_its_job_is_queued(ctx_on: Any, tmp_path: Path) -> None:
    ctx = ctx_on(None)
    host(ctx, "h1", running=3)
    host(ctx, "h2", running=0)
    dispatch.create(ctx, xml_of("web", tmp_path / "d.qcow2", 512))
    a = actions.action("vm-deploy")
    p = actions.check(ctx, a, actions.parse(a, {"vm": "web"}), LOCAL_ADMIN)
    assert actions.runs_on(ctx, a, p) == "h2"  # the fewer running VMs
    with ctx.catalog.session() as s:
        vm = s.execute(select(Vm).where(Vm.name == "web")).scalar_one()
        assert (vm.host, vm.host_uri) == ("h2", "qemu+tcp://h2.invalid/system")
    # the job runs on h2's daemon; a process acting for another host refuses it with the fix
    with pytest.raises(HostUnavailable, match="VM web lives there"):
        dispatch.run_action(ctx_on("h1"), "web", "deploy")
    # --host pins, and is refused with the reason when that host cannot take the VM
    host(ctx, "tiny", free_kib=128 * 1024)
    pinned = actions.parse(a, {"vm": "web", "host": "tiny"})
    with pytest.raises(HostUnavailable, match="128 MiB free, the VM needs 512 MiB"):
        actions.check(ctx, a, pinned, LOCAL_ADMIN)
    p = actions.check(ctx, a, actions.parse(a, {"vm": "web", "host": "h1"}), LOCAL_ADMIN)
    assert actions.runs_on(ctx, a, p) == "h1"
    on_h1 = ctx_on("h1")
    out, _ = dispatch.run_action(on_h1, "web", "deploy", {"host": "h1"})
    assert out["lcm_state"] == LcmState.RUNNING and on_h1.hv.domain("web").state == VmState.ACTIVE


def test_create_pinned_to_a_host(ctx_on: Any, tmp_path: Path) -> None:
    ctx = ctx_on(None)
    host(ctx, "h1")
    host(ctx, "h2", state=records.OFFLINE)
    with pytest.raises(HostUnavailable, match="Host 'h2' cannot take this now: it is OFFLINE"):
        dispatch.create(ctx, xml_of("db", tmp_path / "d.qcow2"), host="h2")
    with ctx.catalog.session() as s:
        assert s.execute(select(Vm).where(Vm.name == "db")).first() is None  # nothing created
    out = dispatch.create(ctx, xml_of("db", tmp_path / "d.qcow2"), host="h1", hold=True)
    assert out["host"] == "h1"
    assert placement.host_of_vm(ctx, "db") == "h1"
    assert dispatch.history(ctx, "db")[0]["options"] == {"hold": True, "host": "h1"}


# --- redeploy -------------------------------------------------------------------------------------
@pytest.fixture
def failed(ctx_on: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """VM ``web`` (created, deployed) on host h2, whose libvirt died: UNKNOWN; this process
    acts for h1. ``said``: what h2's libvirt answers (``redeploy.probe``)."""
    ctx = ctx_on("h1")
    host(ctx, "h1")
    host(ctx, "h2", running=0)
    disk = tmp_path / "web.qcow2"
    disk.write_bytes(b"")
    dispatch.create(ctx, xml_of("web", disk), host="h2")
    with ctx.catalog.session() as s:
        vm = s.execute(select(Vm).where(Vm.name == "web")).scalar_one()
        vm.state, vm.lcm_state = VmState.UNKNOWN, LcmState.UNKNOWN
    said = {"web": "unreachable: h2.invalid: Connection refused"}
    monkeypatch.setattr(redeploy, "probe", lambda uri, name: said[name])
    return {"ctx": ctx, "said": said, "disk": disk}


def test_redeploy_brings_the_vm_up_on_another_host(failed: dict[str, Any]) -> None:
    ctx = failed["ctx"]
    a = actions.action("vm-recover")
    p = actions.check(ctx, a, actions.parse(a, {"vm": "web", "redeploy": True}), LOCAL_ADMIN)
    assert actions.runs_on(ctx, a, p) == "h1"  # placed, h2 passed over: h1's daemon runs it
    out, warnings = redeploy.redeploy(ctx, "web", who="admin")
    assert (out["host"], out["from_host"], out["from"]) == ("h1", "h2", "disks")
    assert ctx.hv.domain("web").state == VmState.ACTIVE
    with ctx.catalog.session() as s:
        vm = s.execute(select(Vm).where(Vm.name == "web")).scalar_one()
        assert (vm.host, vm.lcm_state, vm.error) == ("h1", LcmState.RUNNING, None)
        assert vm.host_uri == "qemu+tcp://h1.invalid/system"
    last = dispatch.history(ctx, "web")[-1]
    assert last["action"] == "recover" and last["result"] == "DONE"
    assert last["options"] == {"redeploy": True, "host": "h1", "from_backup": False}
    assert any("could not be asked" in w and "undefine web" in w for w in warnings.items)
    # it runs on a working host now: a second redeploy is refused, nothing changes
    with pytest.raises(Refused, match="Redeploy is for the VM of a failed host"):
        redeploy.check(ctx, "web")


def test_never_two_copies(failed: dict[str, Any]) -> None:
    ctx = failed["ctx"]
    failed["said"]["web"] = "running"
    with pytest.raises(Refused, match="it still runs on host h2"):
        redeploy.redeploy(ctx, "web")
    assert "web" not in ctx.hv.domains
    assert placement.host_of_vm(ctx, "web") == "h2"


def test_a_definition_left_on_the_old_host_is_removed(
    failed: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = failed["ctx"]
    old = FakeHypervisor("qemu+tcp://h2.invalid/system")
    old.define(xml_of("web", failed["disk"]))
    monkeypatch.setattr(redeploy, "connect", lambda uri: old)
    failed["said"]["web"] = "defined"
    redeploy.redeploy(ctx, "web")
    assert "web" not in old.domains and ctx.hv.domain("web").state == VmState.ACTIVE


def test_redeploy_refusals(failed: dict[str, Any], ctx_on: Any, tmp_path: Path) -> None:
    ctx = failed["ctx"]
    with pytest.raises(Refused, match="no VALID restore point"):
        redeploy.check(ctx, "web", from_backup=True)
    failed["disk"].unlink()
    with pytest.raises(Refused, match=r"disks are not reachable from this host: vda \("):
        redeploy.redeploy(ctx, "web")
    assert "web" not in ctx.hv.domains  # nothing left defined on the destination
    with ctx.catalog.session() as s:
        vm = s.execute(select(Vm).where(Vm.name == "web")).scalar_one()
        assert (vm.host, vm.lcm_state) == ("h2", LcmState.UNKNOWN)
        assert "redeploy failed" in (vm.error or "")
    assert dispatch.history(ctx, "web")[-1]["result"] == "FAILED"
    with pytest.raises(Refused, match="its libvirt cannot be reached"):
        redeploy.check(ctx, "web", "h2")  # pinned to the failed host itself
    # a process acting for another host than the destination refuses with the fix
    with pytest.raises(HostUnavailable, match="runs on its destination"):
        redeploy.redeploy(ctx_on("h2"), "web", "h1")
    # an imported VM (no definition): --from-backup is the way
    with ctx.catalog.session() as s:
        s.execute(select(Vm).where(Vm.name == "web")).scalar_one().template = None
    with pytest.raises(Refused, match="Add --from-backup"):
        redeploy.check(ctx, "web")
    # a VM off any host: deploy it instead
    dispatch.create(ctx, xml_of("new", tmp_path / "n.qcow2"), host="h2")
    with pytest.raises(Refused, match="it is PENDING: not on a host"):
        redeploy.check(ctx, "new")


def test_recover_params_take_one_way() -> None:
    a = actions.action("vm-recover")
    assert actions.parse(a, {"vm": "x", "how": "retry"})
    for bad in (
        {"vm": "x"},
        {"vm": "x", "how": "retry", "redeploy": True},
        {"vm": "x", "how": "retry", "host": "h1"},
    ):
        with pytest.raises(InvalidValue):
            actions.parse(a, bad)


def test_group_recover_in_start_order(failed: dict[str, Any], tmp_path: Path) -> None:
    ctx = failed["ctx"]
    for name in ("db", "app"):
        disk = tmp_path / f"{name}.qcow2"
        disk.write_bytes(b"")
        dispatch.create(ctx, xml_of(name, disk), host="h2")
        with ctx.catalog.session() as s:
            vm = s.execute(select(Vm).where(Vm.name == name)).scalar_one()
            vm.state, vm.lcm_state = VmState.UNKNOWN, LcmState.UNKNOWN
        failed["said"][name] = "absent"
    dispatch.create(ctx, xml_of("fine", tmp_path / "f.qcow2"), host="h1")
    dispatch.run_action(ctx, "fine", "deploy")
    manage.create_group(ctx, "shop", ["db", "fine", "app", "web"])
    a = actions.action("group-recover")
    p = actions.check(ctx, a, actions.parse(a, {"group": "shop"}), LOCAL_ADMIN)
    assert actions.runs_on(ctx, a, p) == "h1"
    out, _ = manage.recover_group(ctx, "shop")
    assert [(m["vm"], m["action"]) for m in out["members"]] == [
        ("db", "redeployed"),
        ("fine", "skipped"),
        ("app", "redeployed"),
        ("web", "redeployed"),
    ]
    redeployed = [c for c in ctx.hv.calls if c[0] == "define" and c[1] != "fine"]
    assert [name for _, name in redeployed] == ["db", "app", "web"]  # the start order
    assert "failed host" in out["members"][1]["why"]
    with pytest.raises(Refused, match="none of its members is on a failed host"):
        manage.recover_host(ctx, "shop")


def test_group_recover_stops_at_a_member_it_cannot_redeploy(
    failed: dict[str, Any], tmp_path: Path
) -> None:
    """A member on a failed host with nothing to bring it up from is not skipped as if it
    needed no redeploy: the members after it in the start order may depend on it."""
    ctx = failed["ctx"]
    for name in ("db", "app"):
        disk = tmp_path / f"{name}.qcow2"
        disk.write_bytes(b"")
        dispatch.create(ctx, xml_of(name, disk), host="h2")
        with ctx.catalog.session() as s:
            vm = s.execute(select(Vm).where(Vm.name == name)).scalar_one()
            vm.state, vm.lcm_state = VmState.UNKNOWN, LcmState.UNKNOWN
            vm.template = None if name == "db" else vm.template  # imported: no definition
        failed["said"][name] = "absent"
    manage.create_group(ctx, "shop", ["db", "app"])
    with pytest.raises(Refused, match="vmkeep holds no definition of it"):
        manage.recover_host(ctx, "shop")
    with pytest.raises(Refused, match="member db failed.*before it: none"):
        manage.recover_group(ctx, "shop", "h1")
    assert "app" not in ctx.hv.domains and placement.host_of_vm(ctx, "app") == "h2"


def test_a_domain_already_on_the_destination(failed: dict[str, Any], tmp_path: Path) -> None:
    ctx = failed["ctx"]
    other = xml_of("web", failed["disk"]).replace(
        "<name>web</name>", "<name>web</name><uuid>00000000-0000-0000-0000-000000000001</uuid>"
    )
    ctx.hv.define(other)  # another domain of that name on h1
    with pytest.raises(Refused, match="host h1 has another domain of that name"):
        redeploy.redeploy(ctx, "web")
    assert ctx.hv.domains["web"].uuid.endswith("0001")  # left as it was
    ctx.hv.undefine("web")
    # the VM itself already running there (a redeploy that died before the catalog): kept
    with ctx.catalog.session() as s:
        template = s.execute(select(Vm).where(Vm.name == "web")).scalar_one().template
    ctx.hv.define(template)
    ctx.hv.start("web")
    out, warnings = redeploy.redeploy(ctx, "web")
    assert out["from"] == "already running there" and out["host"] == "h1"
    assert any("kept running there" in w for w in warnings.items)
    assert ("define", "web") not in ctx.hv.calls[-1:]
