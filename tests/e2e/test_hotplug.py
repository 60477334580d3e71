"""Hotplug and resize on real lab guests that vmkeep created (`vm create --xml` + `vm deploy`): a
NIC attached to and detached from a running VM (the guest sees it come and go), a running VM's
disk grown (the guest sees the new size; shrinking is refused), and vCPUs and memory changed in
the states the lifecycle table allows (refused while RUNNING; applied at the next boot from
POWEROFF and from UNDEPLOYED). The lab guest has ACPI on its i440fx machine, and its kernel's
acpiphp takes PCI hotplug; each test makes its own VM and catalog."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from vmkeep.hypervisor import Hypervisor
from vmkeep.lab import Lab

from .conftest import PREFIX

MIB = 1 << 20
MAC = "52:54:00:c0:ff:ee"


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.3)


def booted(lab: Lab, vm: str) -> None:
    """Wait for this boot's READY line (the serial log is emptied before each boot)."""
    lab.wait_ready(vm)


def fresh_log(lab: Lab, vm: str) -> None:
    log = lab.serial_log(vm)
    if log.exists():
        log.write_text("")


@pytest.fixture
def new_vm(vmkeep, lab: Lab, hv: Hypervisor, request: pytest.FixtureRequest) -> Iterator[str]:
    """A running lab guest vmkeep created and deployed (its own 64 MiB data disk), in this
    test's catalog; terminated (disks deleted) afterwards."""
    vm = f"{PREFIX}hp-{request.node.name.removeprefix('test_')[:20]}".rstrip("_-")
    lab.create(vm, [64 * MIB], start=False)
    xml = lab.vm_dir(vm) / "vm.xml"
    xml.write_text(hv.domain_xml(vm, inactive=True))
    hv.undefine(vm)
    try:
        vmkeep("vm", "create", "--xml", str(xml))
        fresh_log(lab, vm)
        vmkeep("vm", "deploy", vm)
        booted(lab, vm)
        yield vm
    finally:
        lab.remove(vm)


def guest_macs(lab: Lab, vm: str) -> list[str]:
    return lab.sh(vm, "cat /sys/class/net/*/address").split()


def test_nic_attach_and_detach_on_a_running_vm(
    vmkeep, new_vm: str, lab: Lab, hv: Hypervisor
) -> None:
    """`vmkeep vm nic attach VM --mac MAC` / `vmkeep vm nic detach VM --mac MAC` while RUNNING:
    the guest sees the NIC come (virtio_net) and go, the definition keeps it across reboots
    while attached, and a second detach names the NICs the VM has (exit 9)."""
    vm = new_vm
    assert MAC not in guest_macs(lab, vm)
    added = vmkeep("vm", "nic", "attach", vm, "--mac", MAC, "--json").json()
    assert (added["mac"], added["lcm_state"]) == (MAC, "RUNNING"), added
    wait_for(lambda: MAC in guest_macs(lab, vm), "the guest sees the new NIC")
    assert MAC in hv.domain_xml(vm) and MAC in hv.domain_xml(vm, inactive=True)

    vmkeep("vm", "nic", "detach", vm, "--mac", MAC)
    wait_for(lambda: MAC not in guest_macs(lab, vm), "the NIC is gone from the guest")
    assert MAC not in hv.domain_xml(vm) and MAC not in hv.domain_xml(vm, inactive=True)
    again = vmkeep("vm", "nic", "detach", vm, "--mac", MAC, check=9)
    assert MAC in again.err and "has NICs" in again.err
    assert len(guest_macs(lab, vm)) == 2  # lo and the lab's own NIC, still there
    hist = vmkeep("vm", "history", vm, "--json").json()
    assert [(h["action"], h["result"]) for h in hist][-3:] == [
        ("nic-attach", "DONE"),
        ("nic-detach", "DONE"),
        ("nic-detach", "FAILED"),
    ]


def test_disk_resize_of_a_running_vm_is_seen_by_the_guest(
    vmkeep, new_vm: str, lab: Lab, hv: Hypervisor
) -> None:
    """`vmkeep vm disk-resize VM --disk vda --size 96M` while RUNNING: the guest's
    /sys/block/vda/size says 96 MiB at once, the data on it is intact; a smaller size is
    refused (exit 9) and changes nothing."""
    vm = new_vm
    sha = lab.write_random(vm, "/mnt/vda/data", 2)

    def guest_size() -> int:
        return int(lab.sh(vm, "cat /sys/block/vda/size")) * 512

    assert guest_size() == 64 * MIB
    res = vmkeep("vm", "disk-resize", vm, "--disk", "vda", "--size", "96M", "--json").json()
    assert (res["disk"], res["size"], res["lcm_state"]) == ("vda", 96 * MIB, "RUNNING"), res
    wait_for(lambda: guest_size() == 96 * MIB, "the guest sees vda at 96 MiB", 30)
    assert hv.disk_size(vm, "vda")[0] == 96 * MIB
    assert lab.sha256(vm, "/mnt/vda/data") == sha

    refused = vmkeep("vm", "disk-resize", vm, "--disk", "vda", "--size", "80M", check=9)
    assert "only grows" in refused.err, refused.err
    assert guest_size() == 96 * MIB and hv.disk_size(vm, "vda")[0] == 96 * MIB
    assert vmkeep("vm", "show", vm, "--json").json()["lcm_state"] == "RUNNING"
    lab.sh(vm, "sync && echo 3 > /proc/sys/vm/drop_caches")
    assert lab.sha256(vm, "/mnt/vda/data") == sha


def guest_cpus_and_memory(lab: Lab, vm: str) -> tuple[int, int]:
    """(CPUs the guest's kernel runs, its MemTotal in bytes)."""
    out = lab.sh(vm, "grep -c ^processor /proc/cpuinfo; awk '/^MemTotal/ {print $2}' /proc/meminfo")
    cpus, kib = out.split()
    return int(cpus), int(kib) * 1024


def test_resize_cpus_and_memory_where_the_state_table_allows(
    vmkeep, new_vm: str, lab: Lab, hv: Hypervisor
) -> None:
    """`vmkeep vm resize VM --vcpus N --memory MIB`: refused while RUNNING (exit 4, naming the
    states it needs); from POWEROFF and from UNDEPLOYED the guest boots with the new size."""
    vm = new_vm
    cpus, mem = guest_cpus_and_memory(lab, vm)
    assert cpus == 1 and mem <= 192 * MIB
    refused = vmkeep("vm", "resize", vm, "--vcpus", "2", "--memory", "256", check=4)
    assert "RUNNING" in refused.err and "POWEROFF or UNDEPLOYED" in refused.err, refused.err
    assert guest_cpus_and_memory(lab, vm) == (cpus, mem)

    kept = lab.write_random(vm, "/mnt/vda/kept", 1)
    vmkeep("vm", "poweroff", vm, "--hard")
    res = vmkeep("vm", "resize", vm, "--vcpus", "2", "--memory", "256", "--json").json()
    assert (res["lcm_state"], res["vcpus"], res["memory_mib"]) == ("POWEROFF", 2, 256), res
    fresh_log(lab, vm)
    vmkeep("vm", "resume", vm)  # a powered-off VM boots
    booted(lab, vm)
    cpus2, mem2 = guest_cpus_and_memory(lab, vm)
    assert cpus2 == 2 and mem + 48 * MIB < mem2 <= 256 * MIB, (mem, mem2)

    vmkeep("vm", "undeploy", vm, "--hard")
    res = vmkeep("vm", "resize", vm, "--memory", "320", "--json").json()
    assert (res["state"], res["lcm_state"]) == ("UNDEPLOYED", "UNDEPLOYED"), res
    fresh_log(lab, vm)
    vmkeep("vm", "deploy", vm)
    booted(lab, vm)
    cpus3, mem3 = guest_cpus_and_memory(lab, vm)
    assert cpus3 == 2 and mem2 + 48 * MIB < mem3 <= 320 * MIB, (mem2, mem3)
    assert lab.sha256(vm, "/mnt/vda/kept") == kept  # the same disk throughout
