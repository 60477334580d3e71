"""Migration in the hypervisor layer: checkpoints carried (carry.py), the fake's migrate (what the
engine's unit tests stand on), the migration URI, the exec driver's protocol (a script in a
temporary folder stands for drivers/exec/virsh/migrate), and the engine's ``vm migrate`` on two
fake hosts (destination checks, states, history, cancel, the chain-break record)."""

from __future__ import annotations

import os
import subprocess
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from vmkeep.config import load_config
from vmkeep.engine.core.context import Context
from vmkeep.engine.hosts import records
from vmkeep.engine.lifecycle import dispatch, migration
from vmkeep.engine.service import actions
from vmkeep.engine.vm.inventory import import_vm
from vmkeep.engine.vm.record import find_vm
from vmkeep.errors import HostNotFound, InvalidValue, Refused, VmmError
from vmkeep.hypervisor import carry
from vmkeep.hypervisor.fake import SAMPLE_XML, FakeHypervisor, checkpoint_xml
from vmkeep.hypervisor.vmm import migration_uri
from vmkeep.hypervisor.vmm_exec import ExecVmm, parse_args

SRC, DEST = "fake+tcp://h1/system", "fake+tcp://h2/system"


class Side:
    """A CheckpointSide in memory that can be told to fail."""

    def __init__(self, cps: list[tuple[str, str]], where: str = "h", refuse: str = "") -> None:
        self.cps, self.where, self.refuse = list(cps), where, refuse
        self.log: list[str] = []

    def read(self) -> list[tuple[str, str]]:
        return list(self.cps)

    def drop_metadata(self, name: str) -> None:
        self.log.append(f"drop {name}")
        self.cps = [c for c in self.cps if c[0] != name]

    def redefine(self, xml: str) -> None:
        name = xml.split("<name>")[1].split("<")[0]
        if name == self.refuse:
            raise VmmError("native", "migrate", f"missing or broken bitmap '{name}'")
        self.log.append(f"define {name}")
        self.cps.append((name, xml))


def chain(*names: str) -> list[tuple[str, str]]:
    return [(n, checkpoint_xml(n, names[i - 1] if i else None)) for i, n in enumerate(names)]


def hosts() -> tuple[FakeHypervisor, FakeHypervisor]:
    src, dest = FakeHypervisor(SRC), FakeHypervisor(DEST)
    src.define(SAMPLE_XML.format(disk="/shared/web.qcow2"))
    src.start("web")
    src.record("web").checkpoints.extend(["vmkeep-1-0", "vmkeep-1-1"])
    return src, dest


# --- carry.py -------------------------------------------------------------------------------------
def test_ordered_puts_parents_first_whatever_order_libvirt_gave() -> None:
    cps = chain("a", "b", "c")
    assert [n for n, _ in carry.ordered([cps[2], cps[0], cps[1]])] == ["a", "b", "c"]
    assert carry.parent_of(cps[1][1]) == "a" and carry.parent_of(cps[0][1]) is None


def test_migration_without_refusal_keeps_the_source_metadata_untouched() -> None:
    src = Side(chain("a", "b"))
    result, saved = carry.migrate_with_checkpoints(src, lambda: "moved", lambda e: True)
    assert result == "moved" and [n for n, _ in saved] == ["a", "b"] and src.log == []


def test_refused_for_checkpoints_drops_metadata_children_first_then_retries() -> None:
    src = Side(chain("a", "b"))
    tries: list[int] = []

    def migrate() -> str:
        tries.append(len(src.cps))
        if src.cps:
            raise VmmError("native", "migrate", "cannot migrate domain with checkpoints")
        return "moved"

    result, saved = carry.migrate_with_checkpoints(src, migrate, lambda e: "checkpoints" in str(e))
    assert result == "moved" and tries == [2, 0]
    assert src.log == ["drop b", "drop a"] and [n for n, _ in saved] == ["a", "b"]


def test_a_failed_retry_puts_the_checkpoints_back_on_the_source_in_order() -> None:
    src = Side(chain("a", "b"))

    def migrate() -> str:
        raise VmmError("native", "migrate", "cannot migrate domain with checkpoints")

    with pytest.raises(VmmError, match="with checkpoints"):
        carry.migrate_with_checkpoints(src, migrate, lambda e: "checkpoints" in str(e))
    assert src.log == ["drop b", "drop a", "define a", "define b"]
    assert [n for n, _ in src.cps] == ["a", "b"]


def test_an_interrupt_between_drops_puts_the_dropped_checkpoints_back() -> None:
    src = Side(chain("a", "b", "c"))
    drop = src.drop_metadata

    def drop_then_cancel(name: str) -> None:
        drop(name)
        if name == "b":
            raise KeyboardInterrupt  # a job's cancel arrives between two drops

    src.drop_metadata = drop_then_cancel  # type: ignore[method-assign]

    def migrate() -> str:
        raise VmmError("native", "migrate", "cannot migrate domain with checkpoints")

    with pytest.raises(KeyboardInterrupt):
        carry.migrate_with_checkpoints(src, migrate, lambda e: "checkpoints" in str(e))
    assert sorted(n for n, _ in src.cps) == ["a", "b", "c"]


def test_a_source_that_cannot_list_its_checkpoints_still_gets_them_back_and_the_error() -> None:
    src = Side(chain("a", "b"))
    read = src.read
    reads: list[int] = []

    def read_once() -> list[tuple[str, str]]:
        reads.append(1)
        if len(reads) > 1:
            raise VmmError("native", "migrate", "cannot list the checkpoints")
        return read()

    src.read = read_once  # type: ignore[method-assign]

    def migrate() -> str:
        raise VmmError("native", "migrate", "cannot migrate domain with checkpoints")

    with pytest.raises(VmmError, match="with checkpoints"):  # the migration's, not the listing's
        carry.migrate_with_checkpoints(src, migrate, lambda e: "checkpoints" in str(e))
    assert [n for n, _ in src.cps] == ["a", "b"]


def test_another_failure_is_raised_as_it_is_and_nothing_is_dropped() -> None:
    src = Side(chain("a"))

    def migrate() -> str:
        raise VmmError("native", "migrate", "unable to connect to server")

    with pytest.raises(VmmError, match="unable to connect"):
        carry.migrate_with_checkpoints(src, migrate, lambda e: "checkpoints" in str(e))
    assert src.log == []


def test_redefine_all_says_which_checkpoint_broke_the_chain_and_why() -> None:
    dest = Side([], where=DEST, refuse="b")
    names, why = carry.redefine_all(dest, chain("a", "b", "c"))
    assert names == ("a",)
    assert "checkpoint b (2 of 3 not carried)" in why and DEST in why and "bitmap 'b'" in why
    assert dest.log == ["define a"]  # c, whose parent failed, is not tried
    assert carry.redefine_all(Side([]), chain("a", "b")) == (("a", "b"), "")


# --- the fake's migrate ---------------------------------------------------------------------------
def test_fake_live_migration_moves_the_domain_with_its_checkpoints() -> None:
    src, dest = hosts()
    m = src.native_vmm().migrate("web", DEST, live=True)
    assert "web" not in src.domains and dest.record("web").running
    assert dest.checkpoints("web") == ["vmkeep-1-0", "vmkeep-1-1"]
    assert m.checkpoints == ("vmkeep-1-0", "vmkeep-1-1") and m.chain_break == "" and m.live


def test_fake_powered_off_migration_moves_the_definition() -> None:
    src, dest = hosts()
    src.destroy("web")
    m = src.native_vmm().migrate("web", DEST, live=True)
    assert not dest.record("web").running and dest.record("web").persistent
    assert not m.live and m.downtime_ms is None


def test_fake_lost_bitmaps_leave_a_reason_for_the_chain_restart() -> None:
    src, dest = hosts()
    dest.keeps_bitmaps = False
    m = src.native_vmm().migrate("web", DEST, live=True)
    assert m.checkpoints == () and "vmkeep-1-0" in m.chain_break and "bitmap" in m.chain_break
    assert dest.checkpoints("web") == []


def test_fake_source_that_refuses_checkpoints_still_carries_them() -> None:
    src, dest = hosts()
    src.refuses_checkpoints = True
    m = src.native_vmm().migrate("web", DEST, live=True)
    assert m.checkpoints == ("vmkeep-1-0", "vmkeep-1-1")


def test_fake_failed_migration_leaves_the_domain_running_on_the_source() -> None:
    src, dest = hosts()
    src.migrate_error = "unable to connect to server at 'h2:49152'"
    with pytest.raises(VmmError, match="h2:49152"):
        src.native_vmm().migrate("web", DEST, live=True)
    assert src.record("web").running and src.checkpoints("web") == ["vmkeep-1-0", "vmkeep-1-1"]
    assert "web" not in dest.domains


def test_fake_cancel_through_progress_leaves_it_on_the_source() -> None:
    src, dest = hosts()

    class Cancelled(Exception):
        pass

    def progress(done: int, total: int) -> None:
        raise Cancelled

    with pytest.raises(Cancelled):
        src.native_vmm().migrate("web", DEST, live=True, progress=progress)
    assert src.record("web").running and "web" not in dest.domains


def test_fake_refuses_an_unknown_destination_and_a_name_taken_there() -> None:
    src, dest = hosts()
    with pytest.raises(VmmError, match="cannot reach fake://nowhere"):
        src.native_vmm().migrate("web", "fake://nowhere", live=True)
    dest.define(SAMPLE_XML.format(disk="/other.qcow2"))
    with pytest.raises(VmmError, match="already exists"):
        src.native_vmm().migrate("web", DEST, live=True)


# --- the migration stream's address ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("qemu+tcp://10.77.0.2/system", "tcp://10.77.0.2"),
        ("qemu+ssh://root@host2.example/system", "tcp://host2.example"),
        ("qemu+tcp://[fd00::2]:16509/system", "tcp://[fd00::2]"),
        ("qemu:///system", None),
    ],
)
def test_migration_uri_goes_to_the_destination_host(uri: str, expected: str | None) -> None:
    assert migration_uri(uri) == expected


# --- the exec driver's protocol -------------------------------------------------------------------
def script(tmp_path: Path, body: str) -> ExecVmm:
    d = tmp_path / "drv"
    d.mkdir()
    f = d / "migrate"
    f.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    f.chmod(0o755)
    return ExecVmm(d, parse_args(""), "qemu:///system", tmp_path / "slots")


def test_exec_migrate_passes_the_seed_arguments_then_vmkeeps(tmp_path: Path) -> None:
    args = tmp_path / "args"
    vmm = script(
        tmp_path,
        f"""\
        echo "$@" > {args}
        echo 'CHECKPOINTS="vmkeep-1-0 vmkeep-1-1"'
        """,
    )
    m = vmm.migrate("web", "qemu+tcp://10.77.1.2/system", live=True, bandwidth_mib=5)
    assert args.read_text().split() == [
        "web", "10.77.1.2", "localhost", "qemu+tcp://10.77.1.2/system", "yes", "no", "5",
    ]  # fmt: skip
    assert m.checkpoints == ("vmkeep-1-0", "vmkeep-1-1") and m.chain_break == ""


def test_exec_migrate_reports_the_chain_break_and_failures(tmp_path: Path) -> None:
    vmm = script(
        tmp_path,
        """\
        [ "$6" = yes ] && { echo "offline migration cannot handle non-shared storage" >&2; exit 1; }
        echo 'CHECKPOINTS=""'
        echo 'CHAIN_BREAK="checkpoint vmkeep-1-0 could not be defined on h2: no bitmap"'
        """,
    )
    m = vmm.migrate("web", "qemu+tcp://h2/system", live=False)
    assert m.checkpoints == () and m.chain_break.endswith("no bitmap")
    with pytest.raises(VmmError, match="non-shared storage"):
        vmm.migrate("web", "qemu+tcp://h2/system", live=False, copy_storage=True)


def test_exec_migrate_cancel_interrupts_the_script(tmp_path: Path) -> None:
    marker = tmp_path / "interrupted"
    vmm = script(
        tmp_path,
        f"""\
        trap 'touch {marker}; exit 130' INT
        i=0
        while [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
        """,
    )

    class Cancelled(Exception):
        pass

    calls: list[float] = []

    def progress(done: int, total: int) -> None:
        calls.append(time.monotonic())
        if len(calls) == 2:
            raise Cancelled

    t0 = time.monotonic()
    with pytest.raises(Cancelled):
        vmm.migrate("web", "qemu+tcp://h2/system", live=True, progress=progress)
    assert time.monotonic() - t0 < 5 and marker.exists()


def test_the_shipped_migrate_script_is_valid_shell() -> None:
    shipped = Path(__file__).resolve().parents[2] / "drivers" / "exec" / "virsh" / "migrate"
    assert os.access(shipped, os.X_OK)
    proc = subprocess.run(["sh", "-n", str(shipped)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "not supported" not in shipped.read_text()


# --- the engine's vm migrate on two fake hosts ----------------------------------------------------
@pytest.fixture
def two_hosts(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Context, FakeHypervisor]:
    """A catalog with hosts h1 (this process's) and h2, VM web RUNNING on h1 with checkpoints."""
    monkeypatch.setenv("VMKEEP_CLUSTER_HOST", "h1")
    src, dest = hosts()
    ctx = Context(load_config(), _hv=src)
    records.add(ctx, "h1", SRC)
    records.add(ctx, "h2", DEST)
    import_vm(ctx, "web")
    with ctx.catalog.session() as s:
        find_vm(s, "web").created = True  # an imported VM migrates only when the config says so
    return ctx, dest


def vm_row(ctx: Context) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        vm = find_vm(s, "web")
        return {"host": vm.host, "uri": vm.host_uri, "lcm": vm.lcm_state, "error": vm.error}


def test_vm_migrate_moves_the_vm_and_records_it(two_hosts: tuple[Context, FakeHypervisor]) -> None:
    ctx, dest = two_hosts
    out, warnings = dispatch.run_action(ctx, "web", "migrate", {"host": "h2", "live": True})
    assert out["host"] == "h2" and out["lcm_state"] == "RUNNING" and not warnings.items
    assert vm_row(ctx) == {"host": "h2", "uri": DEST, "lcm": "RUNNING", "error": None}
    assert dest.record("web").running and dest.checkpoints("web") == ["vmkeep-1-0", "vmkeep-1-1"]
    last = dispatch.history(ctx, "web")[-1]
    assert last["action"] == "migrate" and last["result"] == "DONE"
    m = last["migration"]
    assert m["source"] == "h1" and m["destination"] == "h2" and m["downtime_ms"] == 1
    assert m["checkpoints"] == ["vmkeep-1-0", "vmkeep-1-1"] and m["chain_break"] == ""


def test_vm_migrate_of_a_powered_off_vm_keeps_it_off(
    two_hosts: tuple[Context, FakeHypervisor],
) -> None:
    ctx, dest = two_hosts
    ctx.hv.destroy("web")
    out, _ = dispatch.run_action(ctx, "web", "migrate", {"host": "h2"})
    assert out["lcm_state"] == "POWEROFF" and not dest.record("web").running


def test_vm_migrate_refuses_bad_destinations_naming_them(
    two_hosts: tuple[Context, FakeHypervisor],
) -> None:
    ctx, _dest = two_hosts
    with pytest.raises(HostNotFound):
        dispatch.run_action(ctx, "web", "migrate", {"host": "h9"})
    with pytest.raises(Refused, match="'h1'.*on that host already"):
        dispatch.run_action(ctx, "web", "migrate", {"host": "h1"})
    for state, why in (("disable", "DISABLED"), ("offline", "OFFLINE")):
        records.disable(ctx, "h2", offline=state == "offline")
        with pytest.raises(Refused, match=f"host 'h2'.*{why}.*vmkeep host enable h2"):
            dispatch.run_action(ctx, "web", "migrate", {"host": "h2"})
    records.enable(ctx, "h2")
    with ctx.catalog.session() as s:
        records.find_host(s, "h2").state = records.ERROR
    with pytest.raises(Refused, match="h2.*ERROR"):
        dispatch.run_action(ctx, "web", "migrate", {"host": "h2"})
    assert vm_row(ctx) == {"host": "h1", "uri": SRC, "lcm": "RUNNING", "error": None}


def test_a_failed_migration_leaves_the_vm_running_on_its_host_with_the_error(
    two_hosts: tuple[Context, FakeHypervisor],
) -> None:
    ctx, dest = two_hosts
    ctx.hv.migrate_error = "unable to connect to server at 'h2:49152'"  # type: ignore[attr-defined]
    with pytest.raises(VmmError):
        dispatch.run_action(ctx, "web", "migrate", {"host": "h2", "live": True})
    row = vm_row(ctx)
    assert row["host"] == "h1" and row["lcm"] == "RUNNING" and "h2:49152" in row["error"]
    assert dispatch.history(ctx, "web")[-1]["result"] == "FAILED" and "web" not in dest.domains


def test_a_cancelled_migration_job_leaves_the_vm_where_it_was(
    two_hosts: tuple[Context, FakeHypervisor],
) -> None:
    ctx, dest = two_hosts

    class Cancelled(Exception):
        pass

    def progress(done: int, total: int) -> None:
        raise Cancelled

    a = actions.action("vm-migrate")
    p = actions.parse(a, {"vm": "web", "host": "h2", "live": True})
    with pytest.raises(Cancelled):
        actions.run_here(ctx, a, p, progress)
    assert vm_row(ctx)["host"] == "h1" and ctx.hv.record("web").running  # type: ignore[attr-defined]
    assert "web" not in dest.domains


def test_a_cancel_after_the_move_still_records_the_vm_on_the_destination(
    two_hosts: tuple[Context, FakeHypervisor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's cancel arrives (raised in the action's thread) while the catalog is written,
    after the VM has moved: too late to undo, so the catalog still says where it runs."""
    ctx, dest = two_hosts
    real, calls = migration.update, []

    def cancelled_once(table: Any) -> Any:
        calls.append(table)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(table)

    monkeypatch.setattr(migration, "update", cancelled_once)
    out, _ = dispatch.run_action(ctx, "web", "migrate", {"host": "h2", "live": True})
    assert dest.record("web").running and out["lcm_state"] == "RUNNING"
    assert vm_row(ctx) == {"host": "h2", "uri": DEST, "lcm": "RUNNING", "error": None}


def test_lost_checkpoints_warn_now_and_make_the_next_backup_a_warned_full(
    two_hosts: tuple[Context, FakeHypervisor],
) -> None:
    ctx, dest = two_hosts
    dest.keeps_bitmaps = False
    _, warnings = dispatch.run_action(ctx, "web", "migrate", {"host": "h2", "live": True})
    assert any("next backup starts a new full chain" in w and "bitmap" in w for w in warnings.items)
    with ctx.catalog.session() as s:
        vm_id = find_vm(s, "web").id
        why = migration.chain_break_since(s, vm_id, None)
        assert why is not None and "migrated to host h2" in why and "vmkeep-1-0" in why
        later = datetime.now(UTC) + timedelta(minutes=1)
        assert migration.chain_break_since(s, vm_id, later) is None  # a backup since: not this


def test_migrate_params_and_cli_options() -> None:
    a = actions.action("vm-migrate")
    p = actions.parse(a, {"vm": "web", "host": "h2", "live": True, "copy_storage": True})
    assert p.model_dump() == {  # type: ignore[union-attr]
        "vm": "web", "host": "h2", "live": True, "copy_storage": True, "bandwidth": 0,
    }  # fmt: skip
    with pytest.raises(InvalidValue):
        actions.parse(a, {"vm": "web"})  # the destination is required


def test_the_api_refuses_a_bad_destination_before_queueing(
    two_hosts: tuple[Context, FakeHypervisor],
) -> None:
    from fastapi.testclient import TestClient

    from vmkeep.api.app import create_app
    from vmkeep.engine.service import tokens

    ctx, _dest = two_hosts
    admin = {"Authorization": "Bearer " + tokens.create(ctx, "a", "admin")["token"]}
    client = TestClient(create_app(ctx.config))
    url = "/v1/vms/web/actions/migrate"
    missing = client.post(url, json={}, headers=admin)
    assert missing.status_code == 422 and "host" in missing.text, missing.text
    unknown = client.post(url, json={"host": "h9"}, headers=admin)
    assert unknown.status_code == 404 and "'h9'" in unknown.text, unknown.text
    records.disable(ctx, "h2")
    disabled = client.post(url, json={"host": "h2", "live": True}, headers=admin)
    assert disabled.status_code == 409 and "DISABLED" in disabled.text, disabled.text
    assert vm_row(ctx)["lcm"] == "RUNNING" and not dispatch.history(ctx, "web")


def test_recover_success_of_a_died_migration_puts_the_vm_on_the_destination(
    two_hosts: tuple[Context, FakeHypervisor],
) -> None:
    ctx, _dest = two_hosts
    ctx.hv.native_vmm().migrate("web", DEST, live=True)  # the move happened ...
    with ctx.catalog.session() as s:  # ... and the process died before the catalog knew
        find_vm(s, "web").lcm_state = "MIGRATE"
    hid = dispatch._begin_history(ctx, vm_row_id(ctx), "migrate", "cli", "", {
        "opts": {"host": "h2", "live": True}, "from": "RUNNING"})  # fmt: skip
    assert hid
    out, _ = dispatch.recover(ctx, "web", "success")
    assert out["lcm_state"] == "RUNNING"
    assert vm_row(ctx) == {"host": "h2", "uri": DEST, "lcm": "RUNNING", "error": None}


def died_while_copying_a_powered_off_vm(ctx: Context) -> None:
    """A POWEROFF VM's --copy-storage migration whose process was killed: MIGRATE in the
    catalog, the history's migrate row open."""
    with ctx.catalog.session() as s:
        find_vm(s, "web").lcm_state = "MIGRATE"
    dispatch._begin_history(ctx, vm_row_id(ctx), "migrate", "cli", "", {
        "opts": {"host": "h2", "copy_storage": True}, "from": "POWEROFF"})  # fmt: skip


def test_recover_failure_of_a_died_copy_stops_the_vm_left_paused_on_its_host(
    two_hosts: tuple[Context, FakeHypervisor],
) -> None:
    ctx, _dest = two_hosts
    ctx.hv.destroy("web")
    ctx.hv.start("web", paused=True)  # started paused for the copy, then the process died
    died_while_copying_a_powered_off_vm(ctx)
    out, _ = dispatch.recover(ctx, "web", "failure")
    assert out["lcm_state"] == "POWEROFF" and not ctx.hv.domain("web").paused
    assert ctx.hv.domain("web").state == "POWEROFF"


def test_recover_success_of_a_died_copy_stops_the_vm_left_paused_on_the_destination(
    two_hosts: tuple[Context, FakeHypervisor], monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx, dest = two_hosts
    ctx.hv.destroy("web")
    ctx.hv.native_vmm().migrate("web", DEST, live=False)  # switched over ...
    dest.start("web", paused=True)  # ... still paused there when the process died
    died_while_copying_a_powered_off_vm(ctx)
    monkeypatch.setattr(migration, "connect", lambda uri: {DEST: dest}[uri])
    out, _ = dispatch.recover(ctx, "web", "success")
    assert out["lcm_state"] == "POWEROFF" and dest.domain("web").state == "POWEROFF"
    assert vm_row(ctx)["host"] == "h2"


def vm_row_id(ctx: Context) -> int:
    with ctx.catalog.session() as s:
        return find_vm(s, "web").id


DEST_TCP = "qemu+tcp://h2/system"
FAKE_VIRSH = """\
#!/bin/sh
echo "$*" >> {log}
case "$*" in
    *checkpoint-list*) echo vmkeep-1-0 ;;
    *checkpoint-dumpxml*) echo "<domaincheckpoint><name>vmkeep-1-0</name></domaincheckpoint>" ;;
    *dumpxml*) printf "<disk type='file' device='disk'>\\n<source file='/local/web.qcow2'/>\\n" ;;
    *vol-info*) exit 1 ;;
    *"-c "*domstate*) echo paused ;;
    *domstate*) echo "shut off" ;;
    *" migrate "*) trap '' INT TERM; sleep 1.5 ;;  # too late to abort: it switches over
esac
exit 0
"""


def shipped_with_fake_virsh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> Path:
    """The log the fake virsh on PATH writes each call to."""
    log, bin_dir = tmp_path / "virsh.log", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "virsh").write_text(body.format(log=log))
    (bin_dir / "virsh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return log


SHIPPED = Path(__file__).resolve().parents[2] / "drivers" / "exec" / "virsh"


def test_shipped_script_refuses_an_offline_move_to_a_host_that_does_not_see_the_disks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = shipped_with_fake_virsh(tmp_path, monkeypatch, FAKE_VIRSH)
    vmm = ExecVmm(SHIPPED, parse_args(""), "qemu:///system", tmp_path / "slots")
    with pytest.raises(VmmError, match="does not see disk /local/web.qcow2.*--copy-storage"):
        vmm.migrate("web", DEST_TCP, live=False)
    lines = log.read_text().splitlines()
    assert not any(" migrate " in ln for ln in lines)
    assert lines[-1].startswith(f"-q -c {DEST_TCP} pool-destroy vmkeep-migrate-")
    log.unlink()
    sees = FAKE_VIRSH.replace("*vol-info*) exit 1 ;;", "*vol-info*) exit 0 ;;")
    (tmp_path / "bin" / "virsh").write_text(sees.format(log=log))
    vmm.migrate("web", DEST_TCP, live=False)
    assert any("--offline" in ln for ln in log.read_text().splitlines())


def test_shipped_script_cancelled_too_late_finishes_and_leaves_nothing_paused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A powered-off VM copied with its storage runs paused during the copy: a cancel that
    arrives once virsh cannot abort any more leaves the migration standing, its checkpoints
    defined and the domain stopped on the destination (never paused there, never reported as
    a failure while it has moved)."""
    log, bin_dir = tmp_path / "virsh.log", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "virsh").write_text(FAKE_VIRSH.format(log=log))
    (bin_dir / "virsh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    shipped = Path(__file__).resolve().parents[2] / "drivers" / "exec" / "virsh"
    vmm = ExecVmm(shipped, parse_args(""), "qemu:///system", tmp_path / "slots")

    class Cancelled(Exception):
        pass

    calls: list[int] = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 1:
            raise Cancelled

    m = vmm.migrate("web", DEST_TCP, live=False, copy_storage=True, progress=progress)
    lines = log.read_text().splitlines()
    assert m.checkpoints == ("vmkeep-1-0",)
    assert any(f"-c {DEST_TCP} checkpoint-create web" in ln for ln in lines)
    assert lines[-2] == f"-q -c {DEST_TCP} destroy web"  # stopped there, as it was
    assert lines[-1].startswith(f"-q -c {DEST_TCP} pool-destroy vmkeep-migrate-")
