"""The VM lifecycle on real lab VMs, through both VMM drivers (native libvirt, and the exec driver
over the shipped drivers/exec/virsh scripts): create -> deploy -> a named snapshot created and
reverted by its name (a file written after the snapshot is gone, a RAM counter is back) -> disk
attach/detach (the guest sees the device) -> suspend/resume and stop/resume (memory survives) ->
undeploy/deploy -> reboot -> poweroff -> a guest that powers itself off is POWEROFF at the next
poll -> terminate. Wrong-state calls exit 4. The exec driver's -r retries a failing script and -t
runs deploys side by side."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkeep.errors import DomainNotFound
from vmkeep.hypervisor import Hypervisor
from vmkeep.lab import Lab
from vmkeep.lab.lab import LabError

from .conftest import PREFIX

VIRSH_DRIVER = Path(__file__).parents[2] / "drivers" / "exec" / "virsh"
COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.05; done"


def use_driver(kind: str, folder: Path = VIRSH_DRIVER, args: str = "") -> None:
    """Point the test's config at a VMM driver for this host."""
    config = Path(os.environ["VMKEEP_CONFIG"])
    text = "version = 1\n"
    if kind == "exec":
        text += (
            f'[[hosts]]\nname = "lab"\nuri = "qemu:///system"\nvmm = "exec"\n'
            f'vmm_dir = "{folder}"\nvmm_args = "{args}"\n'
        )
    config.write_text(text)


def xml_of_new_vm(lab: Lab, hv: Hypervisor, name: str) -> str:
    """A lab guest's domain XML (with its own fresh data disk), not defined in libvirt."""
    lab.create(name, [128 << 20], start=False)
    xml = hv.domain_xml(name, inactive=True)
    hv.undefine(name)
    return xml


def counter(lab: Lab, vm: str) -> tuple[int, str]:
    # After a resume from a memory state the guest agent reconnects a moment later (libvirt says
    # "agent is not connected" until the guest reopens its port): wait for it, as a user would.
    deadline = time.monotonic() + 60
    while not lab.hv.guest_ping(vm, 2) and time.monotonic() < deadline:
        time.sleep(0.3)
    out = lab.sh(vm, "cat /tmp/counter /tmp/counter.pid").split()
    return int(out[0]), out[1]


def wait_counter_above(lab: Lab, vm: str, value: int, timeout: float = 60) -> int:
    """Until the guest's counter passed ``value``; returns what it read."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            now, _ = counter(lab, vm)
        except LabError:  # the loop has not written /tmp/counter yet
            now = -1
        if now > value:
            return now
        assert time.monotonic() < deadline, f"the counter stayed at {now}"
        time.sleep(0.1)


def state(vmkeep, vm: str) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    row = vmkeep("vm", "show", vm, "--json").json()
    return row["state"], row["lcm_state"]


def fresh_log(lab: Lab, vm: str) -> None:
    """Empty the serial log (QEMU appends to it, even across a reset) so that wait_ready sees
    this boot's READY line only."""
    log = lab.serial_log(vm)
    if log.exists():
        log.write_text("")


def booted(lab: Lab, vm: str) -> None:
    lab.wait_ready(vm)


@pytest.fixture
def cleanup(lab: Lab) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        lab.remove(name)


@pytest.mark.parametrize("driver", ["native", "exec"])
def test_lifecycle_through_the_driver(
    driver: str, vmkeep, lab: Lab, hv: Hypervisor, tmp_path: Path, cleanup: list[str]
) -> None:
    use_driver(driver)
    vm = f"{PREFIX}lc-{driver}"
    cleanup.append(vm)
    xml = tmp_path / "vm.xml"
    xml.write_text(xml_of_new_vm(lab, hv, vm))
    disk = lab.vm_dir(vm) / "disk0.qcow2"

    assert vmkeep("vm", "create", "--xml", str(xml), "--json").json()["state"] == "PENDING"
    with pytest.raises(DomainNotFound):
        hv.domain(vm)  # PENDING: not on the host yet
    wrong = vmkeep("vm", "poweroff", vm, check=4)
    assert "PENDING" in wrong.err and "poweroff needs RUNNING" in wrong.err
    fresh_log(lab, vm)
    vmkeep("vm", "deploy", vm)
    booted(lab, vm)
    assert state(vmkeep, vm) == ("ACTIVE", "RUNNING")
    again = vmkeep("vm", "deploy", vm, check=4)
    assert "RUNNING" in again.err and "deploy needs" in again.err, again.err
    assert "release needs" in vmkeep("vm", "release", vm, check=4).err
    assert state(vmkeep, vm) == ("ACTIVE", "RUNNING")  # a refused action changes nothing

    # a named system snapshot with memory, reverted by its name: a file written afterwards is
    # gone after the revert, and a process's in-RAM counter is back to its exact value at the
    # snapshot (the process is stopped while the snapshot is taken, so that value is known);
    # libvirt knows the snapshot by vmkeep's own name for it, never the user's
    lab.sh(vm, f"({COUNTER}) </dev/null >/dev/null 2>&1 & echo $! > /tmp/counter.pid")
    lab.write_random(vm, "/mnt/vda/kept", 1)
    wait_counter_above(lab, vm, 0)
    lab.sh(vm, "kill -STOP $(cat /tmp/counter.pid)")
    at_snapshot, pid = counter(lab, vm)
    snap = vmkeep("vm", "snapshot", "create", vm, "before-write", "--json").json()
    assert (snap["snapshot"], snap["name"]) == (1, "before-write"), snap
    lab.sh(vm, "kill -CONT $(cat /tmp/counter.pid)")
    lab.write_random(vm, "/mnt/vda/after", 1)
    before_revert = wait_counter_above(lab, vm, at_snapshot)
    vmkeep("vm", "snapshot", "revert", vm, "before-write")
    value, same_pid = counter(lab, vm)
    assert (same_pid, value) == (pid, at_snapshot), (at_snapshot, value, before_revert)
    assert counter(lab, vm)[0] == at_snapshot  # still stopped, as it was at the snapshot
    lab.sh(vm, "kill -CONT $(cat /tmp/counter.pid)")
    lab.sh(vm, "test -e /mnt/vda/kept")
    with pytest.raises(LabError):
        lab.sh(vm, "test -e /mnt/vda/after")
    listed = vmkeep("vm", "snapshot", "list", vm, "--json").json()["snapshots"]
    assert [(s["id"], s["name"], s["kind"], s["memory"]) for s in listed] == [
        (1, "before-write", "system", True)
    ]  # fmt: skip
    libvirt_names = subprocess.run(["virsh", "-q", "snapshot-list", vm, "--name"],
                                   capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert libvirt_names == [listed[0]["hypervisor_name"]], libvirt_names
    assert "before-write" not in libvirt_names
    vmkeep("vm", "snapshot", "delete", vm, "1")  # all digits: the id
    assert vmkeep("vm", "snapshot", "list", vm, "--json").json()["snapshots"] == []
    libvirt_names = subprocess.run(["virsh", "-q", "snapshot-list", vm, "--name"],
                                   capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert libvirt_names == [], libvirt_names

    # disk hotplug: the guest sees the new block device, then it is gone
    added = vmkeep("vm", "disk", "attach", vm, "--size", "64M", "--json").json()
    assert added["target"] == "vdb"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            lab.sh(vm, "test -b /dev/vdb")
            break
        except LabError:
            time.sleep(0.5)
    lab.sh(vm, "test -b /dev/vdb")
    vmkeep("vm", "disk", "detach", vm, "--target", "vdb")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            lab.sh(vm, "test ! -e /dev/vdb")
            break
        except LabError:
            time.sleep(0.5)
    lab.sh(vm, "test ! -e /dev/vdb")

    # suspend / resume and stop / resume: the same process carries on
    value, pid = counter(lab, vm)
    vmkeep("vm", "suspend", vm)
    assert state(vmkeep, vm) == ("SUSPENDED", "SUSPENDED")
    vmkeep("vm", "poweroff", vm, check=4)
    vmkeep("vm", "resume", vm)
    assert state(vmkeep, vm) == ("ACTIVE", "RUNNING") and not hv.domain(vm).paused
    assert counter(lab, vm)[1] == pid and counter(lab, vm)[0] >= value
    vmkeep("vm", "stop", vm)
    assert state(vmkeep, vm) == ("STOPPED", "STOPPED")
    with pytest.raises(DomainNotFound):
        hv.domain(vm)  # off the host
    vmkeep("vm", "resume", vm)
    assert state(vmkeep, vm) == ("ACTIVE", "RUNNING")
    assert counter(lab, vm)[1] == pid

    # undeploy (disks kept) / deploy: a fresh boot with the data
    vmkeep("vm", "undeploy", vm)
    assert state(vmkeep, vm) == ("UNDEPLOYED", "UNDEPLOYED") and disk.is_file()
    with pytest.raises(DomainNotFound):
        hv.domain(vm)
    fresh_log(lab, vm)
    vmkeep("vm", "deploy", vm)
    booted(lab, vm)
    lab.sh(vm, "test -e /mnt/vda/kept && test ! -e /tmp/counter")

    fresh_log(lab, vm)
    vmkeep("vm", "reboot", vm, "--hard")
    booted(lab, vm)  # this boot's READY line: the guest did restart
    assert state(vmkeep, vm) == ("ACTIVE", "RUNNING")
    vmkeep("vm", "poweroff", vm)
    assert state(vmkeep, vm) == ("POWEROFF", "POWEROFF")
    fresh_log(lab, vm)
    vmkeep("vm", "resume", vm)  # a powered-off VM boots
    booted(lab, vm)
    assert state(vmkeep, vm) == ("ACTIVE", "RUNNING")

    # the guest powers itself off: the next poll sees it
    subprocess.run(["virsh", "-q", "qemu-agent-command", vm,
                    '{"execute":"guest-exec","arguments":{"path":"/bin/sh","arg":["-c",'
                    '"sleep 1; poweroff -f"]}}'], capture_output=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and hv.domain(vm).state == "ACTIVE":
        time.sleep(0.5)
    polled = vmkeep("vm", "poll", vm, "--json").json()
    assert polled[0]["poll"]["STATE"] == "d" and polled[0]["state"] == "POWEROFF"

    vmkeep("vm", "terminate", vm)
    assert state(vmkeep, vm) == ("DONE", "DONE") and not disk.exists()
    vmkeep("vm", "resume", vm, check=4)
    hist = vmkeep("vm", "history", vm, "--json").json()
    assert [h["action"] for h in hist] == [
        "create", "deploy", "snapshot-create", "snapshot-revert", "snapshot-delete",
        "disk-attach", "disk-detach", "suspend", "resume", "stop", "resume", "undeploy",
        "deploy", "reboot", "poweroff", "resume", "terminate",
    ]  # fmt: skip
    assert all(h["result"] == "DONE" and h["origin"] == "cli" for h in hist)


def flaky_driver(tmp_path: Path) -> Path:
    """The virsh driver plus a deploy that fails on its first two calls, and one that logs when
    it starts and ends (to measure overlap)."""
    folder = tmp_path / "driver"
    shutil.copytree(VIRSH_DRIVER, folder)
    (folder / "deploy_flaky").write_text(
        "#!/bin/sh\n"
        f"n=$(cat {tmp_path}/calls 2>/dev/null || echo 0); n=$((n+1)); echo $n > {tmp_path}/calls\n"
        'if [ "$n" -le 2 ]; then echo "flaky: call $n fails" >&2; cat >/dev/null; exit 1; fi\n'
        f'exec "{folder}/deploy" "$@"\n'
    )
    (folder / "deploy_timed").write_text(
        "#!/bin/sh\n"
        f'echo "start $(date +%s.%N)" >> {tmp_path}/times\n'
        f'"{folder}/deploy" "$@"; rc=$?\n'
        "sleep 1\n"
        f'echo "end $(date +%s.%N)" >> {tmp_path}/times\n'
        "exit $rc\n"
    )
    for f in ("deploy_flaky", "deploy_timed"):
        (folder / f).chmod(0o755)
    return folder


def test_exec_driver_retries_and_parallel_actions(
    vmkeep, lab: Lab, hv: Hypervisor, tmp_path: Path, cleanup: list[str]
) -> None:
    folder = flaky_driver(tmp_path)
    names = [f"{PREFIX}lc-t{i}" for i in range(3)]
    cleanup.extend(names)
    use_driver("exec", folder, "-r 0 -l deploy=deploy_flaky")
    for name in names:
        xml = tmp_path / f"{name}.xml"
        xml.write_text(xml_of_new_vm(lab, hv, name))
        vmkeep("vm", "create", "--xml", str(xml))
    # -r 0: the failing script fails the action; the VM waits in BOOT_FAILURE for an admin
    failed = vmkeep("vm", "deploy", names[0], check=27)
    assert "flaky: call 1 fails" in failed.err
    assert state(vmkeep, names[0]) == ("PENDING", "BOOT_FAILURE")
    vmkeep("vm", "recover", names[0], "--failure")
    assert state(vmkeep, names[0]) == ("PENDING", "PENDING")
    # -r 2: call 2 fails, call 3 succeeds
    use_driver("exec", folder, "-r 2 -l deploy=deploy_flaky")
    vmkeep("vm", "deploy", names[0])
    assert (tmp_path / "calls").read_text().strip() == "3"
    assert state(vmkeep, names[0])[1] == "RUNNING"
    vmkeep("vm", "poweroff", names[0], "--hard")
    assert state(vmkeep, names[0]) == ("POWEROFF", "POWEROFF")
    vmkeep("vm", "undeploy", names[0])
    assert state(vmkeep, names[0]) == ("UNDEPLOYED", "UNDEPLOYED")

    # -t 3: three deploys at once overlap; -t 1: one after the other
    def deploy_all(threads: int) -> list[tuple[float, float]]:
        (tmp_path / "times").unlink(missing_ok=True)
        use_driver("exec", folder, f"-t {threads} -l deploy=deploy_timed")
        procs = [
            subprocess.Popen([sys.executable, "-m", "vmkeep.cli.main", "vm", "deploy", n],
                             env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for n in names
        ]  # fmt: skip
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
        lines = (tmp_path / "times").read_text().split("\n")
        starts = sorted(float(x.split()[1]) for x in lines if x.startswith("start"))
        ends = sorted(float(x.split()[1]) for x in lines if x.startswith("end"))
        return list(zip(starts, ends, strict=True))

    spans = deploy_all(3)
    assert max(s for s, _ in spans) < min(e for _, e in spans), spans  # all three at once
    for name in names:
        vmkeep("vm", "undeploy", name, "--hard")
    spans = deploy_all(1)
    assert all(spans[i][1] <= spans[i + 1][0] for i in range(2)), spans  # never two at once
    for name in names:
        vmkeep("vm", "terminate", name, "--hard")
        assert state(vmkeep, name) == ("DONE", "DONE")
        with pytest.raises(DomainNotFound):
            hv.domain(name)


def test_lifecycle_through_the_api(vmkeep, lab: Lab, hv: Hypervisor, cleanup: list[str]) -> None:
    """POST /v1/vms creates (admin), POST /v1/vms/{vm}/actions/{action} queues a job (202) that a
    worker runs; a wrong state is a 409 before any job; the history says origin api."""
    from fastapi.testclient import TestClient

    from vmkeep.api.app import create_app
    from vmkeep.config import load_config
    from vmkeep.engine.core import jobs
    from vmkeep.engine.core.context import Context
    from vmkeep.engine.service import tokens
    from vmkeep.engine.service.actions import RUNNERS

    vm = f"{PREFIX}lc-api"
    cleanup.append(vm)
    config = load_config()
    ctx = Context(config)
    admin = {"Authorization": "Bearer " + tokens.create(ctx, "a", "admin")["token"]}
    viewer = {"Authorization": "Bearer " + tokens.create(ctx, "v", "viewer")["token"]}
    client = TestClient(create_app(config))
    xml = xml_of_new_vm(lab, hv, vm)
    assert client.post("/v1/vms", json={"xml": xml}, headers=viewer).status_code == 403
    made = client.post("/v1/vms", json={"xml": xml, "hold": True}, headers=admin)
    assert made.status_code == 201 and made.json()["state"] == "HOLD", made.text
    refused = client.post(f"/v1/vms/{vm}/actions/deploy", headers=admin)
    assert refused.status_code == 409 and "HOLD" in refused.json()["error"]["message"]
    queued = client.post(f"/v1/vms/{vm}/actions/release", json={}, headers=admin)
    assert queued.status_code == 202, queued.text
    job_id = queued.json()["job"]["id"]
    assert jobs.claim(ctx) == job_id
    jobs.execute(ctx, job_id, RUNNERS)
    done = client.get(f"/v1/jobs/{job_id}", headers=viewer).json()
    assert done["state"] == "DONE" and done["result"]["state"] == "PENDING", done
    hist = client.get(f"/v1/vms/{vm}/history", headers=viewer).json()
    assert [(h["action"], h["origin"], h["result"]) for h in hist] == [
        ("create", "api", "DONE"), ("release", "api", "DONE")
    ]  # fmt: skip
    no_host = client.post(f"/v1/vms/{vm}/actions/migrate", json={}, headers=admin)
    assert no_host.status_code == 422 and "host" in no_host.text  # the destination is required
    assert client.post(f"/v1/vms/{vm}/actions/nosuch", headers=admin).status_code in (404, 405)
    vmkeep("vm", "terminate", vm)
    assert state(vmkeep, vm) == ("DONE", "DONE")
    with pytest.raises(DomainNotFound):
        hv.domain(vm)


@pytest.mark.parametrize("driver", ["native", "exec"])
def test_cold_actions_and_imported_vms(
    driver: str, vmkeep, lab: Lab, hv: Hypervisor, tmp_path: Path, cleanup: list[str]
) -> None:
    """On a powered-off VM: resize, disk-resize, NIC attach/detach in the definition, a named disk
    snapshot reverted by its name (a file written after it is gone at the next boot); an imported
    VM refuses what [vmm] imported_vms_actions does not list."""
    use_driver(driver)
    vm = f"{PREFIX}lc-cold-{driver}"
    cleanup.append(vm)
    xml = tmp_path / "vm.xml"
    xml.write_text(xml_of_new_vm(lab, hv, vm))
    vmkeep("vm", "create", "--xml", str(xml))
    fresh_log(lab, vm)
    vmkeep("vm", "deploy", vm)
    booted(lab, vm)
    vmkeep("vm", "resize", vm, "--vcpus", "2", check=4)  # needs POWEROFF
    assert ">2</vcpu>" not in hv.domain_xml(vm, inactive=True)  # refused: nothing changed
    vmkeep("vm", "poweroff", vm, "--hard")
    assert state(vmkeep, vm) == ("POWEROFF", "POWEROFF")

    vmkeep("vm", "resize", vm, "--vcpus", "2", "--memory", "256")
    vmkeep("vm", "disk-resize", vm, "--disk", "vda", "--size", "192M")
    nic = vmkeep("vm", "nic", "attach", vm, "--mac", "52:54:00:aa:bb:cc", "--json").json()
    assert nic["mac"] == "52:54:00:aa:bb:cc"
    defined = hv.domain_xml(vm, inactive=True)
    assert "52:54:00:aa:bb:cc" in defined and ">2</vcpu>" in defined and "262144" in defined
    vmkeep("vm", "nic", "detach", vm, "--mac", "52:54:00:aa:bb:cc")
    assert "52:54:00:aa:bb:cc" not in hv.domain_xml(vm, inactive=True)
    vmkeep("vm", "nic", "detach", vm, "--mac", "52:54:00:aa:bb:cc", check=9)

    snap = vmkeep("vm", "disk-snapshot", "create", vm, "clean", "--disk", "vda", "--json").json()
    assert (snap["name"], snap["hypervisor_name"]) == ("clean", f"disk-snap-{snap['snapshot']}")
    fresh_log(lab, vm)
    vmkeep("vm", "resume", vm)
    booted(lab, vm)
    size = int(lab.sh(vm, "cat /sys/block/vda/size").strip()) * 512
    assert size == 192 << 20
    lab.sh(vm, "echo x > /mnt/vda/after-snap && sync")
    vmkeep("vm", "poweroff", vm, "--hard")
    vmkeep("vm", "disk-snapshot", "revert", vm, "clean")
    fresh_log(lab, vm)
    vmkeep("vm", "resume", vm)
    booted(lab, vm)
    with pytest.raises(LabError):
        lab.sh(vm, "test -e /mnt/vda/after-snap")
    vmkeep("vm", "poweroff", vm, "--hard")
    vmkeep("vm", "terminate", vm, "--keep-disks")
    assert (lab.vm_dir(vm) / "disk0.qcow2").is_file()
    assert state(vmkeep, vm) == ("DONE", "DONE")

    # a VM vmkeep did not create: only the imported_vms_actions
    other = f"{PREFIX}lc-imported-{driver}"
    cleanup.append(other)
    lab.create(other, [64 << 20], start=False)
    vmkeep("vm", "import", other)
    refused = vmkeep("vm", "terminate", other, check=25)
    assert "imported" in refused.err and "imported_vms_actions" in refused.err
    vmkeep("vm", "poweroff", other, check=4)  # allowed for imported VMs, but it is off
