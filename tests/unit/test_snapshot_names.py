"""Named snapshots (``vm snapshot create VM [NAME]``, ``vm disk-snapshot create VM [NAME]``) on
``FakeHypervisor``: the name is listed, revert and delete take a name or an id (all digits), a
taken name and a bad one are refused before the hypervisor is asked, an unknown one is NotFound
naming ``vm snapshot list``; the hypervisor and qemu-img only ever see their own names. The
params and the API routes (generated from the action table) read the same references."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config as AlembicConfig
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from vmkeep.api.app import create_app
from vmkeep.catalog import Catalog
from vmkeep.catalog.db import HEAD_REVISION, MIGRATIONS_DIR
from vmkeep.engine.core.context import Context
from vmkeep.engine.lifecycle import dispatch
from vmkeep.engine.service import actions, tokens
from vmkeep.errors import AlreadyExists, InvalidValue, NotFound
from vmkeep.hypervisor.fake import SAMPLE_XML, FakeHypervisor

XML = SAMPLE_XML


@pytest.fixture
def ctx(fake_ctx: Context) -> Context:
    return fake_ctx


@pytest.fixture
def hv(ctx: Context, tmp_path: Path) -> FakeHypervisor:
    """VM ``web`` deployed (RUNNING) on the fake, its disk a real qcow2 image."""
    disk = tmp_path / "web-vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"], check=True)
    dispatch.create(ctx, XML.format(disk=disk))
    act(ctx, "deploy")
    assert isinstance(ctx.hv, FakeHypervisor)
    return ctx.hv


def act(ctx: Context, action: str, **opts: Any) -> dict[str, Any]:
    out, _warnings = dispatch.run_action(ctx, "web", action, opts)
    return out


def listed(ctx: Context) -> list[tuple[int, str | None, str, str]]:
    rows = dispatch.snapshots(ctx, "web")["snapshots"]
    return [(r["id"], r["name"], r["kind"], r["hypervisor_name"]) for r in rows]


def test_a_named_snapshot_is_listed_reverted_and_deleted_by_name(
    ctx: Context, hv: FakeHypervisor
) -> None:
    made = act(ctx, "snapshot-create", name="before-upgrade")
    assert (made["snapshot"], made["name"], made["hypervisor_name"]) == (
        1,
        "before-upgrade",
        "snap-1",
    )
    assert set(hv.domains["web"].snapshots) == {"snap-1"}  # the hypervisor's name, not the user's
    act(ctx, "snapshot-create")  # unnamed: reached by its id
    assert listed(ctx) == [(1, "before-upgrade", "system", "snap-1"), (2, None, "system", "snap-2")]

    hv.domains["web"].xml = hv.domains["web"].xml.replace("<vcpu>1</vcpu>", "<vcpu>4</vcpu>")
    reverted = act(ctx, "snapshot-revert", snapshot="before-upgrade")
    assert (reverted["snapshot"], reverted["name"]) == (1, "before-upgrade")
    assert hv.calls[-1] == ("snapshot_revert", "web")
    assert "<vcpu>1</vcpu>" in hv.domains["web"].xml  # snap-1's definition is back

    assert act(ctx, "snapshot-delete", snapshot="before-upgrade")["snapshot"] == 1
    assert set(hv.domains["web"].snapshots) == {"snap-2"}
    assert act(ctx, "snapshot-delete", snapshot="2")["snapshot"] == 2  # all digits: the id
    assert listed(ctx) == [] and hv.domains["web"].snapshots == {}


def test_a_taken_name_is_refused_before_the_hypervisor_is_asked(
    ctx: Context, hv: FakeHypervisor
) -> None:
    act(ctx, "snapshot-create", name="base")
    calls = len(hv.calls)
    with pytest.raises(AlreadyExists, match=r"snapshot 'base' of VM web \(id 1; give another name"):
        act(ctx, "snapshot-create", name="base")
    assert len(hv.calls) == calls and set(hv.domains["web"].snapshots) == {"snap-1"}
    act(ctx, "poweroff")
    with pytest.raises(AlreadyExists, match="'base'"):  # one name space per VM, both kinds
        act(ctx, "disk-snapshot-create", name="base")
    assert [r[0] for r in listed(ctx)] == [1]
    act(ctx, "snapshot-delete", snapshot="base")
    assert act(ctx, "snapshot-create", name="base")["name"] == "base"  # free again


def test_a_taken_name_is_refused_before_the_action_is_queued(
    ctx: Context, hv: FakeHypervisor
) -> None:
    """Through the daemon's door (the API's check before queueing): a 409 at once, no job that
    fails later."""
    from vmkeep.engine.core import jobs
    from vmkeep.engine.core.trust import Actor

    act(ctx, "snapshot-create", name="base")
    for kind in ("vm-snapshot-create", "vm-disk-snapshot-create"):
        if kind == "vm-disk-snapshot-create":
            act(ctx, "poweroff")  # what a disk snapshot needs
        a = actions.ACTIONS[kind]
        with pytest.raises(AlreadyExists, match="'base'") as err:
            actions.enqueue(ctx, a, actions.parse(a, {"vm": "web", "name": "base"}),
                            Actor("ops", "operator"))  # fmt: skip
        assert err.value.http_status == 409
    assert jobs.list_jobs(ctx) == []
    a = actions.ACTIONS["vm-disk-snapshot-create"]
    queued = actions.enqueue(ctx, a, actions.parse(a, {"vm": "web", "name": "other"}),
                             Actor("ops", "operator"))  # fmt: skip
    assert (queued["state"], queued["target"]) == ("QUEUED", "web")


@pytest.mark.parametrize("bad", ["12", "a/b", "-x", "x" * 65, "a b", "<name>"])
def test_a_bad_name_is_refused_with_the_rule(ctx: Context, hv: FakeHypervisor, bad: str) -> None:
    calls = len(hv.calls)
    with pytest.raises(InvalidValue, match="use 1-64 letters, digits"):
        act(ctx, "snapshot-create", name=bad)
    with pytest.raises(InvalidValue, match="use 1-64 letters, digits"):
        actions.parse(actions.ACTIONS["vm-snapshot-create"], {"vm": "web", "name": bad})
    assert len(hv.calls) == calls and listed(ctx) == [] and hv.domains["web"].snapshots == {}


def test_an_unknown_snapshot_is_not_found(ctx: Context, hv: FakeHypervisor) -> None:
    act(ctx, "snapshot-create", name="base")
    for ref in ("nosuch", "7", "99999999999999999999"):
        with pytest.raises(NotFound, match=f"'{ref}' of VM web .*'vmkeep vm snapshot list web'"):
            act(ctx, "snapshot-revert", snapshot=ref)
    act(ctx, "poweroff")
    with pytest.raises(NotFound, match="it is a system snapshot"):
        act(ctx, "disk-snapshot-revert", snapshot="base")
    assert act(ctx, "snapshot-revert", snapshot="base")["snapshot"] == 1


def test_disk_snapshots_by_name_and_id(ctx: Context, hv: FakeHypervisor, tmp_path: Path) -> None:
    act(ctx, "poweroff")
    made = act(ctx, "disk-snapshot-create", name="clean", disk="vda")
    assert (made["snapshot"], made["name"], made["disk"]) == (1, "clean", "vda")
    act(ctx, "disk-snapshot-create")
    image = subprocess.run(["qemu-img", "snapshot", "-l", str(tmp_path / "web-vda.qcow2")],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "disk-snap-1" in image and "disk-snap-2" in image and "clean" not in image
    assert listed(ctx) == [(1, "clean", "disk", "disk-snap-1"), (2, None, "disk", "disk-snap-2")]
    assert act(ctx, "disk-snapshot-revert", snapshot="clean")["snapshot"] == 1
    assert act(ctx, "disk-snapshot-delete", snapshot="clean")["name"] == "clean"
    assert act(ctx, "disk-snapshot-delete", snapshot="2")["snapshot"] == 2
    image = subprocess.run(["qemu-img", "snapshot", "-l", str(tmp_path / "web-vda.qcow2")],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "disk-snap" not in image and listed(ctx) == []


def test_a_snapshot_taken_before_names_stays_reachable_by_id(ctx: Context) -> None:
    """A catalog at 0008 (no names) with a snapshot: after the migration it is unnamed, listed and
    reverted by its id; two unnamed snapshots may coexist, two of one name on a VM may not."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    hv = ctx.hv
    assert isinstance(hv, FakeHypervisor)
    hv.start(hv.define(XML.format(disk="/nowhere/web-vda.qcow2")))
    hv.native_vmm().snapshot_create("web", 1)  # as an older vmkeep took it ...
    old = Catalog(ctx.config.catalog_url, migrate=False)
    with old.engine.begin() as conn:  # ... and recorded it
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0008")
        vm = ("INSERT INTO vms (id, name, uuid, host_uri, state, lcm_state, backup_config, "
              "created, imported_at, updated_at) VALUES (1, 'web', :uuid, :uri, 'ACTIVE', "
              "'RUNNING', '{}', 1, '2026-01-01 00:00:00', '2026-01-01 00:00:00')")  # fmt: skip
        conn.execute(text(vm), {"uuid": hv.domain("web").uuid, "uri": hv.uri})
        conn.execute(text("INSERT INTO vm_snapshots (vm_id, seq, name, kind, memory, created_at) "
                          "VALUES (1, 1, 'snap-1', 'system', 1, '2026-01-01 00:00:00')"))  # fmt: skip
    old.dispose()
    assert ctx.catalog.current_revision() == HEAD_REVISION  # migrated when opened
    assert listed(ctx) == [(1, None, "system", "snap-1")]
    assert act(ctx, "snapshot-revert", snapshot=1)["snapshot"] == 1  # an int, as jobs stored it
    assert hv.calls[-1] == ("snapshot_revert", "web")
    act(ctx, "snapshot-create")
    act(ctx, "snapshot-create", name="a")
    with pytest.raises(IntegrityError), ctx.catalog.engine.begin() as conn:  # the schema's guard
        conn.execute(text("UPDATE vm_snapshots SET label = 'a' WHERE seq = 2"))
    assert [r[1] for r in listed(ctx)] == [None, None, "a"]


def test_params_and_routes_read_names_and_ids(ctx: Context) -> None:
    revert = actions.ACTIONS["vm-snapshot-revert"]
    assert actions.parse(revert, {"vm": "web", "snapshot": 3}).snapshot == "3"  # type: ignore[attr-defined]
    assert actions.parse(revert, {"vm": "web", "snapshot": "base"}).snapshot == "base"  # type: ignore[attr-defined]
    create = actions.ACTIONS["vm-disk-snapshot-create"]
    p = actions.parse(create, {"vm": "web", "name": "clean", "disk": "vda"})
    assert p.model_dump() == {"vm": "web", "disk": "vda", "name": "clean"}

    admin = {"Authorization": "Bearer " + tokens.create(ctx, "a", "admin")["token"]}
    client = TestClient(create_app(ctx.config))
    bad = client.post("/v1/vms/web/actions/snapshot-create", json={"name": "12"}, headers=admin)
    assert bad.status_code in (400, 422) and "not only digits" in bad.text, bad.text
    assert set(bad.json()["error"]) == {"code", "message"}
    # a JSON number is still an id; the refusal is the unknown VM (404), not the params
    gone = client.post("/v1/vms/web/actions/snapshot-revert", json={"snapshot": 3}, headers=admin)
    assert gone.status_code == 404 and "'web'" in gone.text, gone.text
