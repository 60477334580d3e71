"""Group drills' logic (tests/e2e/test_group_drill.py runs them on real guests): MEMBER=CMD
parsing, the params model, the isolated network's XML, NICs moved onto it with their MACs, the
leftover marks, and the steps' order with every drill VM and the network removed in every case."""

from __future__ import annotations

import os
import socket
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import select

from vmkeep.catalog.tables import (
    Backup,
    Datastore,
    Group,
    GroupBackup,
    GroupBackupMember,
    GroupDrill,
    Increment,
    Vm,
)
from vmkeep.cli.group_cmd import member_commands
from vmkeep.config import load_config
from vmkeep.engine.core.context import Context
from vmkeep.engine.groups import drill as D
from vmkeep.engine.groups import manage
from vmkeep.engine.restore.drill import Check, StepFailed
from vmkeep.engine.service.actions import ACTIONS, parse
from vmkeep.errors import GroupBackupNotFound, InvalidValue
from vmkeep.hypervisor.domain_xml import (
    isolated_network_xml,
    network_isolation,
    network_mark,
    on_network,
)


# --- MEMBER=CMD and the params -------------------------------------------------------------------
def test_member_commands_split_at_the_first_equals_sign() -> None:
    got = member_commands(("db=test -f /x", "app=echo a=b | grep -q a=b"), "--probe")
    assert got == {"db": "test -f /x", "app": "echo a=b | grep -q a=b"}


@pytest.mark.parametrize("bad", ["db", "=cmd", "db=", "db=   ", " =x"])
def test_member_commands_refuse_what_is_not_member_equals_command(bad: str) -> None:
    with pytest.raises(InvalidValue, match="MEMBER=CMD") as err:
        member_commands((bad,), "--probe")
    assert "--probe" in str(err.value)


def test_member_commands_refuse_a_second_probe_for_one_member() -> None:
    with pytest.raises(InvalidValue, match="db has a probe already"):
        member_commands(("db=true", "db=false"), "--probe")


def test_group_drill_params() -> None:
    a = ACTIONS["group-drill"]
    assert a.route == "/v1/group-backups/{group_backup}/drill" and a.policy == "group-drill"
    p = parse(
        a,
        {
            "group_backup": 3,
            "probes": {"db": "true"},
            "cross_probe": {"member": "app", "command": "nc -w 5 10.0.0.2 5432"},
        },
    )
    assert p.cross_probe is not None and p.cross_probe.member == "app"  # type: ignore[attr-defined]
    assert p.timeout == 300.0  # type: ignore[attr-defined]
    for bad in (
        {"group_backup": 3, "cross_probe": {"member": "app"}},  # no command
        {"group_backup": 3, "probes": {"db": ""}},
        {"group_backup": 3, "timeout": 0},
        {"group_backup": 3, "probe": "true"},  # a typo is an error, not ignored
    ):
        with pytest.raises(InvalidValue):
            parse(a, bad)


def test_probes_must_name_members() -> None:
    D.check_members(["db", "app"], {"db": "true"}, ("app", "true"))
    with pytest.raises(InvalidValue, match="members are db, app") as err:
        D.check_members(["db", "app"], {"web": "true"}, ("cache", "true"))
    assert "web, cache" in str(err.value)


# --- the network and the NICs --------------------------------------------------------------------
def test_the_drill_network_is_isolated_and_marked() -> None:
    xml = isolated_network_xml("vmkeep-gdrill-7", "vmkeep group drill of group backup 7 (x)")
    root = ET.fromstring(xml)
    assert root.findtext("name") == "vmkeep-gdrill-7"
    assert root.find("forward") is None and root.find("ip") is None and root.find("dns") is None
    assert network_isolation(xml) == []
    assert network_mark(xml) == "vmkeep group drill of group backup 7 (x)"
    nat = (
        "<network><name>default</name><forward mode='nat'/><ip address='192.168.122.1'/></network>"
    )
    assert network_isolation(nat) == ["<forward>", "<ip>"]
    assert network_mark(nat) is None


def test_nics_move_onto_the_network_keeping_their_mac() -> None:
    xml = """<domain><name>db</name><devices>
      <interface type='bridge'><mac address='52:54:00:aa:bb:01'/><source bridge='br0'/>
        <target dev='vnet3'/><model type='virtio'/><ip address='10.0.0.5' prefix='24'/>
        <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/></interface>
      <interface type='user'><model type='e1000'/></interface>
    </devices></domain>"""
    out, macs = on_network(xml, "vmkeep-gdrill-7")
    assert macs == ["52:54:00:aa:bb:01", None]
    nics = ET.fromstring(out).findall("./devices/interface")
    for nic in nics:
        assert nic.get("type") == "network"
        assert [s.get("network") for s in nic.findall("source")] == ["vmkeep-gdrill-7"]
        assert nic.find("target") is None and nic.find("ip") is None
    assert nics[0].find("mac").get("address") == "52:54:00:aa:bb:01"  # type: ignore[union-attr]
    assert nics[0].find("address").get("slot") == "0x03"  # type: ignore[union-attr]
    assert nics[1].find("model").get("type") == "e1000"  # type: ignore[union-attr]


def test_leftovers_are_recognised_by_their_mark_and_dead_owner() -> None:
    host = socket.gethostname()
    mine = D.mark_text(7)
    assert D.is_orphan(mine, 7)  # this drill's own group backup: its lock is held
    assert not D.is_orphan(mine, 8)  # another drill, still running (this process)
    dead = f"{D.MARK} of group backup 9 (pid 999999999 on {host})"
    assert D.is_orphan(dead, None)
    assert not D.is_orphan(f"{D.MARK} of group backup 9 (pid 999999999 on other-host)", None)
    assert not D.is_orphan("vmkeep restore drill (point 0)", 7)
    assert not D.is_orphan("", 7)
    assert str(os.getpid()) in mine


# --- the steps, in order, and the clean-up -------------------------------------------------------
STORED = """<domain><name>x</name><devices><interface type='user'>
  <mac address='52:54:00:00:00:{n}'/><model type='virtio'/></interface></devices></domain>"""


class Hv:
    def __init__(self, host_address: str = "") -> None:
        self.events: list[tuple[str, ...]] = []
        self.host_address = host_address
        self.nets: dict[str, str] = {}

    def network_create(self, xml: str) -> str:
        name = ET.fromstring(xml).findtext("name") or ""
        self.nets[name] = xml
        self.events.append(("network", name))
        return name

    def networks(self) -> dict[str, str]:
        return dict(self.nets)

    def network_bridge(self, _name: str) -> str:
        return "virbr9"

    def network_destroy(self, name: str) -> None:
        self.nets.pop(name, None)
        self.events.append(("network-destroy", name))

    def define(self, xml: str) -> str:
        root = ET.fromstring(xml)
        nic = root.find("./devices/interface")
        assert nic is not None and nic.get("type") == "network"
        assert D.MARK in (root.findtext("description") or "")
        self.events.append(("define", root.findtext("name") or ""))
        return root.findtext("name") or ""


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    def go(
        fail_stage: str | None = None,
        fail_boot: str | None = None,
        host_address: str = "",
        probes: dict[str, str] | None = None,
        cross: tuple[str, str] | None = None,
    ) -> tuple[list[tuple[str, ...]], list[D.Step]]:
        hv = Hv(host_address)
        ctx = SimpleNamespace(hv=hv, config=SimpleNamespace(data_dir=tmp_path))

        def stage(_ctx: Any, pf: Any, work: Path, checks: list[Check]) -> Any:
            ok = pf != fail_stage
            checks.append(Check("checksums", ok, "ok" if ok else "mismatch"))
            if not ok:
                raise StepFailed
            return STORED.format(n=len(hv.events) + 10), {}

        def boot(_ctx: Any, name: str, _t: float) -> Check:
            hv.events.append(("boot", name))
            return Check("boot", not name.startswith(f"{fail_boot}-"), "agent")

        def probe(_ctx: Any, name: str, command: str) -> Check:
            hv.events.append(("probe", name, command))
            return Check("probe", command != "false", command)

        monkeypatch.setattr(D, "point_files", lambda _c, backup, _seq: {1: "db", 2: "app"}[backup])
        monkeypatch.setattr(D, "stage", stage)
        monkeypatch.setattr(D, "check_stored_xml", lambda *_a: None)
        monkeypatch.setattr(D, "boot_check", boot)
        monkeypatch.setattr(D, "probe_check", probe)
        monkeypatch.setattr(D, "remove_vm", lambda _c, name: hv.events.append(("remove", name)))
        monkeypatch.setattr(D, "_host_addresses", lambda _b: hv.host_address)
        steps: list[D.Step] = []
        members = [("db", 1, 0), ("app", 2, 0)]
        D._drill(ctx, 5, members, probes or {}, cross, 60.0, steps)  # type: ignore[arg-type]
        assert not (tmp_path / "drills" / "group-5").exists()
        assert hv.nets == {}  # the network is gone in every case
        return hv.events, steps

    return go


REMOVED = [("remove", "app-gdrill-5"), ("remove", "db-gdrill-5")]


def test_members_boot_in_start_order_then_probes_then_the_cross_probe(run: Any) -> None:
    events, steps = run(probes={"app": "true", "db": "true"}, cross=("app", "nc db 5432"))
    assert events == [
        ("network", "vmkeep-gdrill-5"),
        ("define", "db-gdrill-5"), ("define", "app-gdrill-5"),
        ("boot", "db-gdrill-5"), ("boot", "app-gdrill-5"),
        ("probe", "db-gdrill-5", "true"), ("probe", "app-gdrill-5", "true"),  # start order
        ("probe", "app-gdrill-5", "nc db 5432"),
        *REMOVED, ("network-destroy", "vmkeep-gdrill-5"),
    ]  # fmt: skip
    assert [(s.member, s.step) for s in steps][-1] == ("app", "cross-probe")
    assert all(s.ok for s in steps)
    assert "52:54:00:00:00:" in next(s.detail for s in steps if s.step == "define")


def test_a_member_that_does_not_boot_stops_the_drill(run: Any) -> None:
    events, steps = run(fail_boot="db", cross=("app", "true"))
    assert ("boot", "app-gdrill-5") not in events  # the next member never started
    assert not any(e[0] == "probe" for e in events)
    assert events[-3:] == [*REMOVED, ("network-destroy", "vmkeep-gdrill-5")]
    assert (steps[-1].member, steps[-1].step, steps[-1].ok) == ("db", "boot", False)


def test_a_failed_cross_probe_is_the_last_step(run: Any) -> None:
    _events, steps = run(cross=("app", "false"))
    assert (steps[-1].member, steps[-1].step, steps[-1].ok) == ("app", "cross-probe", False)
    assert all(s.ok for s in steps[:-1])


def test_a_damaged_member_fails_before_any_network_or_vm(run: Any) -> None:
    events, steps = run(fail_stage="app")
    assert [e for e in events if e[0] != "remove"] == []
    assert [(s.member, s.step, s.ok) for s in steps] == [
        ("db", "checksums", True),
        ("app", "checksums", False),
    ]


def test_a_network_the_host_has_an_address_on_is_refused(run: Any) -> None:
    events, steps = run(host_address="5: virbr9 inet 10.1.1.1/24")
    assert not any(e[0] in ("define", "boot") for e in events)
    assert (steps[-1].step, steps[-1].ok) == ("network", False)
    assert "10.1.1.1" in steps[-1].detail
    assert events[-1] == ("network-destroy", "vmkeep-gdrill-5")


# --- the catalog: members in start order, refusals, the last drill -------------------------------
def _catalog(ctx: Context) -> tuple[int, int]:
    """A VALID group backup of db (position 0) and app (position 1), app's row written first;
    and a RUNNING one."""
    with ctx.catalog.session() as s:
        ds = Datastore(name="ds", driver="dir", options={"path": "/nonexistent"})
        g = Group(name="shop")
        s.add_all([ds, g])
        s.flush()
        vms = {}
        for name in ("db", "app"):
            vms[name] = Vm(name=name, uuid=f"uuid-{name}", host_uri="qemu:///system",
                           state="ACTIVE", lcm_state="RUNNING")  # fmt: skip
            s.add(vms[name])
            s.flush()
            b = Backup(vm_id=vms[name].id, datastore_id=ds.id, chain=f"{name}/1", mode="FULL",
                       status="VALID")  # fmt: skip
            s.add(b)
            s.flush()
            s.add(Increment(backup_id=b.id, seq=0, status="VALID", files=[]))
        s.flush()
        ids = []
        for status in ("VALID", "RUNNING"):
            gb = GroupBackup(group_id=g.id, datastore_id=ds.id, status=status)
            s.add(gb)
            s.flush()
            for name, pos in (("app", 1), ("db", 0)):
                s.add(GroupBackupMember(group_backup_id=gb.id, vm_id=vms[name].id, vm_name=name,
                                        position=pos, backup_id=vms[name].id, seq=0,
                                        status=status))  # fmt: skip
            ids.append(gb.id)
        return ids[0], ids[1]


def test_members_in_start_order_and_what_is_refused_before_queueing(clean_env: Path) -> None:
    ctx = Context(load_config())
    valid, running = _catalog(ctx)
    group, members = D._members(ctx, valid)
    assert (group, [m[0] for m in members]) == ("shop", ["db", "app"])
    D.check_request(ctx, valid, {"db": "true"}, ("app", "true"))
    with pytest.raises(InvalidValue, match="members are db, app"):
        D.check_request(ctx, valid, {}, ("web", "true"))
    with pytest.raises(InvalidValue, match="it is RUNNING"):
        D.check_request(ctx, running, {}, None)
    with pytest.raises(GroupBackupNotFound):
        D.check_request(ctx, 99, {}, None)


def test_group_backups_show_their_last_drill_and_a_group_deletes_with_its_drills(
    clean_env: Path,
) -> None:
    ctx = Context(load_config())
    valid, running = _catalog(ctx)
    with ctx.catalog.session() as s:
        s.add_all([GroupDrill(group_backup_id=valid, result="PASS", checks=[]),
                   GroupDrill(group_backup_id=valid, result="FAIL", reason="app: cross-probe: x",
                              checks=[{"member": "app", "step": "cross-probe"}])])  # fmt: skip
    rows = {r["id"]: r for r in manage.list_group_backups(ctx)}
    assert rows[running]["last_drill"] is None
    last = rows[valid]["last_drill"]
    assert (last["result"], last["reason"]) == ("FAIL", "app: cross-probe: x")
    assert manage.show_group_backup(ctx, valid)["last_drill"] == last
    assert manage.show_group(ctx, "shop")["backups"][0]["last_drill"] == last
    manage.delete_group(ctx, "shop")  # the drills' rows go with their group backups
    with ctx.catalog.session() as s:
        assert s.execute(select(GroupDrill)).scalars().all() == []
