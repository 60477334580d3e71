"""The engine's lifecycle on ``FakeHypervisor`` (no libvirt): states, history and the driver calls
of ``dispatch.run_action`` and ``dispatch.poll``; the fake implements the whole ``Hypervisor``
interface; the engine names no concrete hypervisor."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

from vmkeep.engine.core.context import Context
from vmkeep.engine.lifecycle import dispatch
from vmkeep.engine.restore import memory
from vmkeep.errors import DomainNotFound, HypervisorError, VmmError, WrongState
from vmkeep.hypervisor import Hypervisor
from vmkeep.hypervisor.domain_xml import with_disks
from vmkeep.hypervisor.fake import SAMPLE_XML, FakeHypervisor, FakeVmm
from vmkeep.hypervisor.vmm import Vmm
from vmkeep.model import LcmState, VmState, Warnings

SRC = Path(__file__).resolve().parents[2] / "src" / "vmkeep"
XML = SAMPLE_XML


@pytest.fixture
def ctx(fake_ctx: Context) -> Context:
    return fake_ctx


def fake(ctx: Context) -> FakeHypervisor:
    assert isinstance(ctx.hv, FakeHypervisor)
    return ctx.hv


def created(ctx: Context, tmp_path: Path) -> None:
    out = dispatch.create(ctx, XML.format(disk=tmp_path / "web-vda.qcow2"))
    assert (out["state"], out["lcm_state"]) == (VmState.PENDING, VmState.PENDING)


def act(ctx: Context, action: str, **opts: Any) -> dict[str, Any]:
    out, _warnings = dispatch.run_action(ctx, "web", action, opts)
    return out


def test_the_fake_implements_every_method_of_the_interface() -> None:
    assert "native_vmm" in Hypervisor.__abstractmethods__
    hv = FakeHypervisor()  # TypeError if an abstract method were left out
    optional = {"block_pull", "block_job", "block_job_abort"}
    for name in Hypervisor.__abstractmethods__ | optional:
        assert getattr(FakeHypervisor, name) is not getattr(Hypervisor, name), name
    vmm = hv.native_vmm()
    assert isinstance(vmm, FakeVmm) and isinstance(vmm, Vmm) and vmm.kind == "native"


def test_the_engine_names_no_concrete_hypervisor() -> None:
    concrete = {"LibvirtHypervisor", "NativeVmm", "FakeHypervisor", "FakeVmm"}
    modules = ("vmkeep.hypervisor.native", "vmkeep.hypervisor.vmm_native", "vmkeep.hypervisor.fake")
    offenders = []
    for path in (SRC / "engine").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                offenders.append(f"{path.name}: from {node.module}")
            elif isinstance(node, ast.Name | ast.Attribute):
                name = node.id if isinstance(node, ast.Name) else node.attr
                if name in concrete:
                    offenders.append(f"{path.name}: {name}")
    assert offenders == []


def test_lifecycle_states_and_driver_calls(ctx: Context, tmp_path: Path) -> None:
    hv = fake(ctx)
    created(ctx, tmp_path)
    assert hv.domains == {}  # PENDING: not on the host yet

    def step(action: str, state: VmState, lcm: LcmState, **opts: Any) -> dict[str, Any]:
        out = act(ctx, action, **opts)
        assert (out["state"], out["lcm_state"]) == (state, lcm), action
        return out

    assert step("deploy", VmState.ACTIVE, LcmState.RUNNING)["deploy_id"] == "web"
    assert hv.domains["web"].running and hv.domains["web"].persistent
    step("poweroff", VmState.POWEROFF, LcmState.POWEROFF)
    assert not hv.domains["web"].running and hv.calls[-1] == ("shutdown", "web")
    assert step("resume", VmState.ACTIVE, LcmState.RUNNING)["memory"] is False  # a boot
    state_file = step("suspend", VmState.SUSPENDED, LcmState.SUSPENDED)["state_file"]
    assert state_file in hv.saved and not hv.domains["web"].running
    assert step("resume", VmState.ACTIVE, LcmState.RUNNING)["memory"] is True
    assert hv.domains["web"].running and hv.calls[-2:] == [
        ("restore_memory", "web"),
        ("define", "web"),
    ]
    step("stop", VmState.STOPPED, LcmState.STOPPED)
    assert "web" not in hv.domains  # off the host, its memory in the state file
    step("resume", VmState.ACTIVE, LcmState.RUNNING)
    assert hv.domains["web"].persistent and hv.domains["web"].running
    step("reboot", VmState.ACTIVE, LcmState.RUNNING, hard=True)
    assert hv.calls[-1] == ("reset", "web")
    step("poweroff", VmState.POWEROFF, LcmState.POWEROFF, hard=True)
    assert hv.calls[-1] == ("destroy", "web")
    step("terminate", VmState.DONE, LcmState.DONE)
    assert hv.domains == {}
    rows = dispatch.history(ctx, "web")
    assert [r["action"] for r in rows] == ["create", "deploy", "poweroff", "resume", "suspend",
                                           "resume", "stop", "resume", "reboot", "poweroff",
                                           "terminate"]  # fmt: skip
    assert {r["result"] for r in rows} == {"DONE"}


def test_a_guest_that_ignores_shutdown_fails_the_poweroff(ctx: Context, tmp_path: Path) -> None:
    hv = fake(ctx)
    created(ctx, tmp_path)
    act(ctx, "deploy")
    hv.domains["web"].obeys_shutdown = False
    with pytest.raises(VmmError, match="did not power off") as err:
        act(ctx, "poweroff")
    assert err.value.exit_code == 27
    assert dispatch.history(ctx, "web")[-1]["result"] == "FAILED"
    # poweroff has no failure state: the VM is back where it was, still running
    assert act(ctx, "poweroff", hard=True)["lcm_state"] == LcmState.POWEROFF
    assert not hv.domains["web"].running


def test_a_wrong_state_is_refused_before_any_driver_call(ctx: Context, tmp_path: Path) -> None:
    hv = fake(ctx)
    created(ctx, tmp_path)
    with pytest.raises(WrongState):
        act(ctx, "suspend")  # PENDING: nothing to save
    assert hv.calls == [] and hv.domains == {}
    act(ctx, "deploy")
    calls = list(hv.calls)
    with pytest.raises(WrongState):
        act(ctx, "deploy")
    assert hv.calls == calls


def test_poll_follows_the_hypervisor(ctx: Context, tmp_path: Path) -> None:
    hv = fake(ctx)
    created(ctx, tmp_path)
    act(ctx, "deploy")
    hv.suspend("web")  # paused behind vmkeep's back
    [row] = dispatch.poll(ctx)
    assert row["poll"]["STATE"] == "p" and row["lcm_state"] == LcmState.SUSPENDED
    hv.destroy("web")
    [row] = dispatch.poll(ctx, "web")
    assert (row["state"], row["lcm_state"]) == (VmState.POWEROFF, LcmState.POWEROFF)


def test_a_poll_that_saw_the_domain_before_an_action_ended_keeps_the_actions_state(
    ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's poll and a job race: the poll reads "running", the suspend job ends
    (SUSPENDED), then the poll writes; the VM stays SUSPENDED (the next poll sees the truth)."""
    created(ctx, tmp_path)
    act(ctx, "deploy")
    real = dispatch.vmm_of(ctx)

    class Racing:
        def __getattr__(self, attr: str) -> Any:
            return getattr(real, attr)

        def poll(self, name: str) -> dict[str, str]:
            record = real.poll(name)
            act(ctx, "suspend")  # ends while the poll is on its way
            return record

    monkeypatch.setattr(dispatch, "vmm_of", lambda _ctx: Racing())
    [row] = dispatch.poll(ctx)
    assert row["poll"]["STATE"] == "a" and row["lcm_state"] == LcmState.SUSPENDED, row
    monkeypatch.undo()
    [row] = dispatch.poll(ctx)  # the next poll: saved, still SUSPENDED
    assert row["lcm_state"] == LcmState.SUSPENDED, row


def test_nics_and_resize_edit_the_stored_definition(ctx: Context, tmp_path: Path) -> None:
    hv = fake(ctx)
    created(ctx, tmp_path)
    act(ctx, "deploy")
    mac = act(ctx, "nic-attach", mac="52:54:00:12:34:56")["mac"]
    assert f'address="{mac}"' in hv.domain_xml("web")
    act(ctx, "nic-detach", mac=mac)
    assert mac not in hv.domain_xml("web")
    act(ctx, "poweroff")
    act(ctx, "resize", vcpus=3, memory=512)
    xml = hv.domain_xml("web", inactive=True)
    assert "<vcpu>3</vcpu>" in xml and '<currentMemory unit="MiB">512</currentMemory>' in xml


def test_the_fake_follows_libvirts_rules() -> None:
    hv = FakeHypervisor()
    name = hv.define(XML.format(disk="/d/vda.qcow2"))
    with pytest.raises(DomainNotFound):
        hv.domain("other")
    hv.start(name)
    with pytest.raises(HypervisorError, match="already running"):
        hv.start(name)
    hv.save_memory(name, "/s/web.state")
    with pytest.raises(HypervisorError, match="already active"):
        hv.restore_memory("/s/web.state")
    hv.undefine(name)  # running: it becomes transient ...
    assert not hv.domain(name).persistent
    hv.destroy(name)  # ... and disappears when it stops
    assert hv.list_domains() == []
    hv.restore_memory("/s/web.state")  # back, running, transient until defined
    info = hv.domain(name)
    assert info.state == VmState.ACTIVE and not info.persistent
    assert [d.target for d in info.disks] == ["vda"] and not info.has_agent_channel
    assert not hv.guest_ping(name, 1)  # no agent channel in the XML
    with pytest.raises(HypervisorError, match="fake hypervisor cannot"):
        hv.backup_begin(name, "<domainbackup/>", None)
    with pytest.raises(HypervisorError, match="uuid"):
        hv.define(XML.format(disk="/x").replace("<name>web</name>", f"<name>web</name><uuid>"
                                                f"{'0' * 8}-0000-0000-0000-{'0' * 12}</uuid>"))  # fmt: skip


def test_a_memory_state_resumes_on_the_restored_disks(ctx: Context, tmp_path: Path) -> None:
    hv = fake(ctx)
    old = XML.format(disk="/old/web-vda.qcow2")
    hv.start(hv.define(old))
    hv.save_memory("web", "/states/web.state")
    hv.destroy("web")
    hv.undefine("web")  # the domain is gone: the restore recreates it
    disks = {"vda": tmp_path / "vda.qcow2"}
    persistent = with_disks(old, disks, "qcow2")
    warnings = Warnings()
    state = Path("/states/web.state")
    assert memory.resume(ctx, state, disks, warnings, persistent_xml=persistent, fmt="qcow2")
    info = hv.domain("web")
    assert info.state == VmState.ACTIVE and info.persistent and not warnings.items
    assert [(d.path, d.fmt) for d in info.disks] == [(str(disks["vda"]), "qcow2")]
    # libvirt refuses (here: the domain runs already): it is defined and a warning says why
    assert not memory.resume(ctx, state, disks, warnings, persistent_xml=persistent)
    assert any("could not be resumed" in w for w in warnings.items)
    assert hv.calls[-1] == ("define", "web")
