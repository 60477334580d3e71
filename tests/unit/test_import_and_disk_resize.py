"""``vm import --all`` and ``vm disk-resize`` on ``FakeHypervisor``: a domain removed between the
listing and its import is skipped, one whose name vmkeep cannot take is skipped with a warning,
an already-imported one is reported (``new`` False) and never duplicated; disk-resize only grows
a disk, running (the hypervisor's size) or powered off (the image's), and refuses to shrink one
before anything changes; resize of an UNDEPLOYED VM changes its template and leaves it so."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from vmkeep.datastores.base import qemu_img_info
from vmkeep.engine.core.context import Context
from vmkeep.engine.lifecycle import dispatch
from vmkeep.engine.vm import inventory
from vmkeep.errors import InvalidValue
from vmkeep.hypervisor.fake import SAMPLE_XML, FakeHypervisor
from vmkeep.model import DomainInfo

MIB = 1 << 20


def named(name: str, disk: Path) -> str:
    return SAMPLE_XML.format(disk=disk).replace("<name>web</name>", f"<name>{name}</name>")


class RemovedWhileListed(FakeHypervisor):
    """Domain ``gone`` is in the listing but removed before its import (another user)."""

    def list_domains(self) -> list[DomainInfo]:
        listed = super().list_domains()
        self.domains.pop("gone", None)
        return listed


def test_import_all_skips_a_removed_domain_warns_on_a_bad_name_and_never_duplicates(
    clean_env: Path, tmp_path: Path
) -> None:
    from vmkeep.config import load_config

    hv = RemovedWhileListed()
    ctx = Context(load_config(), _hv=hv)
    for name in ("a", "b", "gone", "bad name"):
        hv.define(named(name, tmp_path / f"{name}.qcow2"))
    first = inventory.import_vm(ctx, "a")
    assert first["new"] is True
    rows, warnings = inventory.import_all(ctx)
    assert [(r["name"], r["new"]) for r in rows] == [("a", False), ("b", True)]
    assert rows[0]["id"] == first["id"]
    assert len(warnings.items) == 1 and "'bad name' was not imported" in warnings.items[0]
    assert "domrename" in warnings.items[0]
    again, _ = inventory.import_all(ctx)
    assert [(r["name"], r["id"], r["new"]) for r in again] == [
        (r["name"], r["id"], False) for r in rows
    ]
    assert [v["name"] for v in inventory.list_vms(ctx)] == ["a", "b"]


@pytest.fixture
def web(fake_ctx: Context, tmp_path: Path) -> FakeHypervisor:
    """VM ``web`` created and deployed (RUNNING) on the fake, its disk a real 4 MiB qcow2."""
    disk = tmp_path / "web-vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "4M"], check=True)
    dispatch.create(fake_ctx, SAMPLE_XML.format(disk=disk))
    act(fake_ctx, "deploy")
    assert isinstance(fake_ctx.hv, FakeHypervisor)
    fake_ctx.hv.disk_sizes[("web", "vda")] = (4 * MIB, 0)
    return fake_ctx.hv


def act(ctx: Context, action: str, **opts: Any) -> dict[str, Any]:
    out, _warnings = dispatch.run_action(ctx, "web", action, opts)
    return out


def test_disk_resize_grows_a_running_disk_and_refuses_to_shrink_it(
    fake_ctx: Context, web: FakeHypervisor
) -> None:
    with pytest.raises(InvalidValue) as err:
        act(fake_ctx, "disk-resize", disk="vda", size="2M")
    assert "only grows" in str(err.value) and str(4 * MIB) in str(err.value)
    assert ("resize_disk", "web") not in web.calls and web.disk_sizes[("web", "vda")][0] == 4 * MIB
    assert inventory.show_vm(fake_ctx, "web")["lcm_state"] == "RUNNING"  # back, nothing changed
    assert act(fake_ctx, "disk-resize", disk="vda", size="6M")["size"] == 6 * MIB
    assert web.disk_sizes[("web", "vda")][0] == 6 * MIB


def test_disk_resize_of_a_powered_off_disk_grows_its_image_and_refuses_to_shrink_it(
    fake_ctx: Context, web: FakeHypervisor, tmp_path: Path
) -> None:
    act(fake_ctx, "poweroff", hard=True)
    image = tmp_path / "web-vda.qcow2"
    with pytest.raises(InvalidValue) as err:
        act(fake_ctx, "disk-resize", disk="vda", size="1M")
    assert "only grows" in str(err.value)
    assert qemu_img_info(image)["virtual-size"] == 4 * MIB
    act(fake_ctx, "disk-resize", disk="vda", size="8M")
    assert qemu_img_info(image)["virtual-size"] == 8 * MIB


def test_resize_of_an_undeployed_vm_changes_its_template_and_leaves_it_undeployed(
    fake_ctx: Context, web: FakeHypervisor
) -> None:
    act(fake_ctx, "undeploy", hard=True)
    out = act(fake_ctx, "resize", vcpus=2, memory=512)
    assert (out["state"], out["lcm_state"]) == ("UNDEPLOYED", "UNDEPLOYED"), out
    assert "web" not in web.domains  # still off the host
    act(fake_ctx, "deploy")
    xml = web.domains["web"].xml
    assert "<vcpu>2</vcpu>" in xml and '<memory unit="MiB">512</memory>' in xml, xml
