"""A tour of the README commands no other real-guest test runs, on ONE small lab guest shared by
the module (each test imports it into its own catalog and brings it to the state it needs):
pools, backup jobs, hosts, jobs show, protect/unprotect, disk-snapshot delete, shell completion
in a real bash, notify test to a real webhook on loopback, audit list of a real daemon's
requests, and lab up / lab down with a prefix of this module's own."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from vmkeep.config import IMPORTED_VMS_ACTIONS
from vmkeep.hypervisor import Hypervisor
from vmkeep.lab import Lab

from .conftest import PREFIX, Webhook, running_daemon

EVERY_ACTION = [*IMPORTED_VMS_ACTIONS, "disk-snapshot-create", "disk-snapshot-revert",
                "disk-snapshot-delete"]  # fmt: skip


def _wait(what: str, cond: Any, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)
    return got


def domstate(vm: str) -> str:
    return subprocess.run(["virsh", "domstate", vm], capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip


def bring_up(lab: Lab, vm: str) -> None:
    """The shared guest running with its agent answering, whatever a test before left."""
    state = domstate(vm)
    if state == "paused":
        subprocess.run(["virsh", "resume", vm], check=True, capture_output=True)
    elif state != "running":
        lab.start(vm)
    _wait("the guest agent", lambda: lab.hv.guest_ping(vm, 2))


@pytest.fixture(scope="module")
def guest(lab: Lab) -> str:
    """The module's one lab guest (a 64 MiB data disk)."""
    return lab.create(f"{PREFIX}tour", [64 << 20])


@pytest.fixture
def vm(vmkeep, lab: Lab, hv: Hypervisor, guest: str) -> str:
    """The guest running, without checkpoints, imported into this test's catalog."""
    bring_up(lab, guest)
    for cp in hv.checkpoints(guest):
        hv.delete_checkpoint(guest, cp)
    vmkeep("vm", "import", guest)
    return guest


@pytest.fixture
def ds(vmkeep, qemu_reachable_data_dir: Path) -> str:
    vmkeep(
        "datastore", "add", "ds", "--driver", "dir", "--path", str(qemu_reachable_data_dir / "ds")
    )
    return "ds"


def test_pool_list_show_set_delete(vmkeep, vm: str) -> None:
    """vmkeep pool create | list | show | set | delete, and vm config --pool / --no-pool: the VM
    inherits the pool's keys; a pool in use is not deleted."""
    vmkeep("pool", "create", "web", "--keep-last", "14", "--fs-freeze", "agent")
    listed = vmkeep("pool", "list", "--json").json()
    assert [p["name"] for p in listed] == ["web"], listed
    shown = vmkeep("pool", "show", "web", "--json").json()
    assert shown["backup_config"] == {"keep_last": 14, "fs_freeze": "AGENT"}, shown
    vmkeep("vm", "config", vm, "--pool", "web")
    vmkeep("pool", "set", "web", "--keep-last", "7")
    shown = vmkeep("pool", "show", "web", "--json").json()
    assert shown["backup_config"]["keep_last"] == 7 and vm in json.dumps(shown["vms"]), shown
    effective = vmkeep("vm", "show", vm, "--json").json()
    assert effective["pool"] == "web" and effective["backup_config"]["keep_last"] == 7
    assert effective["backup_config_sources"]["keep_last"] == "pool web", effective
    refused = vmkeep("pool", "delete", "web", check=25)
    assert vm in refused.err and "refused" in refused.err, refused.err
    vmkeep("vm", "config", vm, "--no-pool")
    vmkeep("pool", "delete", "web")
    assert vmkeep("pool", "list", "--json").json() == []
    vmkeep("pool", "show", "web", check=6)


def test_backupjob_list_and_delete(vmkeep, vm: str, ds: str) -> None:
    """vmkeep backupjob list | delete: the job is listed, then gone (show exits 6)."""
    vmkeep("backupjob", "create", "nightly", "--vm", vm, "--datastore", ds,
           "--schedule", "0 2 * * *")  # fmt: skip
    listed = vmkeep("backupjob", "list", "--json").json()
    assert [(j["name"], j["datastore"], j["schedule"]) for j in listed] == [
        ("nightly", ds, "0 2 * * *")
    ], listed
    vmkeep("backupjob", "delete", "nightly")
    assert vmkeep("backupjob", "list", "--json").json() == []
    vmkeep("backupjob", "show", "nightly", check=6)


def test_jobs_show_and_unprotect(vmkeep, lab: Lab, vm: str, ds: str, tmp_path: Path) -> None:
    """vmkeep jobs show ID (the backup's job: DONE, its result the backup) and vmkeep backups
    unprotect: a protected chain refuses delete (exit 25) until it is unprotected."""
    lab.write_random(vm, "/mnt/vda/tour", 1)
    bid = vmkeep("backup", vm, "-d", ds, "--json").json()["id"]
    job = next(j for j in vmkeep("jobs", "list", "--json").json() if j["kind"] == "backup")
    shown = vmkeep("jobs", "show", str(job["id"]), "--json").json()
    assert (shown["id"], shown["kind"], shown["state"]) == (job["id"], "backup", "DONE"), shown
    assert json.dumps(shown).count(vm) >= 1 and shown["result"]["id"] == bid, shown
    text = vmkeep("jobs", "show", str(job["id"])).out
    assert "DONE" in text and "backup" in text, text

    vmkeep("backups", "protect", str(bid))
    vmkeep("backups", "delete", str(bid), check=25)
    lifted = vmkeep("backups", "unprotect", str(bid), "--json").json()
    assert (lifted["backup"], lifted["protected"]) == (bid, False), lifted
    point = vmkeep("backups", "show", str(bid), "--json").json()["increments"][0]
    assert point["protected"] is False
    vmkeep("backups", "delete", str(bid))
    assert vmkeep("backups", "list", "--json").json() == []


def test_host_show_disable_enable_remove(vmkeep, vm: str) -> None:
    """vmkeep host add | show | disable [--offline] | enable | remove: each state as show says."""
    vmkeep("host", "add", "spare", "--uri", "qemu+tcp://10.99.0.9/system", "--max-backups", "2")
    shown = vmkeep("host", "show", "spare", "--json").json()
    assert (shown["name"], shown["uri"], shown["state"]) == (
        "spare", "qemu+tcp://10.99.0.9/system", "INIT"
    ), shown  # fmt: skip
    vmkeep("host", "disable", "spare")
    assert vmkeep("host", "show", "spare", "--json").json()["state"] == "DISABLED"
    vmkeep("host", "disable", "spare", "--offline")
    assert vmkeep("host", "show", "spare", "--json").json()["state"] == "OFFLINE"
    vmkeep("host", "enable", "spare")
    assert vmkeep("host", "show", "spare", "--json").json()["state"] == "INIT"  # not monitored yet
    vmkeep("host", "remove", "spare")
    assert "spare" not in [h["name"] for h in vmkeep("host", "list", "--json").json()]
    vmkeep("host", "show", "spare", check=6)


def test_disk_snapshot_delete(vmkeep, lab: Lab, vm: str) -> None:
    """vmkeep vm disk-snapshot create | delete on the powered-off guest: qemu-img no longer
    lists the internal snapshot in the disk image; the guest boots again with its data."""
    config = Path(os.environ["VMKEEP_CONFIG"])
    config.write_text(f"version = 1\n[vmm]\nimported_vms_actions = {json.dumps(EVERY_ACTION)}\n")
    digest = lab.write_random(vm, "/mnt/vda/kept", 1)
    lab.sh(vm, "sync")
    vmkeep("vm", "poweroff", vm, "--hard")
    disk = lab.vm_dir(vm) / "disk0.qcow2"

    def internal() -> str:
        return subprocess.run(["qemu-img", "snapshot", "-l", "-U", str(disk)],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip

    snap = vmkeep("vm", "disk-snapshot", "create", vm, "tour", "--disk", "vda", "--json").json()
    assert snap["hypervisor_name"] in internal()
    vmkeep("vm", "disk-snapshot", "delete", vm, "tour")
    assert snap["hypervisor_name"] not in internal()
    listed = vmkeep("vm", "snapshot", "list", vm, "--json").json()["snapshots"]
    assert [s for s in listed if s["name"] == "tour"] == []
    vmkeep("vm", "disk-snapshot", "delete", vm, "tour", check=6)
    lab.serial_log(vm).write_text("")
    vmkeep("vm", "resume", vm)
    lab.wait_ready(vm)
    assert lab.sha256(vm, "/mnt/vda/kept") == digest


def test_completion_in_bash_offers_the_vm(vmkeep, vm: str, tmp_path: Path) -> None:
    """vmkeep completion bash, sourced in a real bash: Tab after `vmkeep vm show <start of the
    name>` offers the imported VM's name, and `vmkeep pool s` the pool subcommands."""
    script = vmkeep("completion", "bash").out
    assert "_VMKEEP_COMPLETE" in script
    (tmp_path / "completion.bash").write_text(script)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "vmkeep"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m vmkeep.cli.main "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)

    def tab(*words: str) -> list[str]:
        line = " ".join(f"'{w}'" for w in words)
        prog = (f"source {tmp_path / 'completion.bash'}\n"
                f"COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}\n"
                "_vmkeep_completion vmkeep\n"
                'printf "%s\\n" "${COMPREPLY[@]}"\n')  # fmt: skip
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
        out = subprocess.run(["bash", "--norc", "--noprofile", "-c", prog], capture_output=True,
                             text=True, env=env, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        return [w for w in out.stdout.split("\n") if w]

    assert tab("vmkeep", "vm", "show", vm[:-2]) == [vm]
    assert tab("vmkeep", "vm", "show", "no-such-") == []
    assert tab("vmkeep", "pool", "s") == ["set", "show"]


def test_notify_test_reaches_a_webhook(vmkeep, webhook: Webhook) -> None:
    """vmkeep notify test: one signed POST at the configured webhook; the URL's token is never
    printed; a target that refuses makes it exit 30."""
    config = Path(os.environ["VMKEEP_CONFIG"])
    config.write_text(
        f'version = 1\n[notify]\nwebhook_url = "{webhook.url}"\nwebhook_secret = "tour-secret"\n'
    )
    res = vmkeep("notify", "test", "--json")
    assert webhook.token not in res.out + res.err
    assert [t["ok"] for t in res.json()["targets"]] == [True], res.out
    assert len(webhook.got) == 1
    got = webhook.got[0]
    assert got.json()["event"] == "notify.test"
    want = hmac.new(b"tour-secret", got.body, hashlib.sha256).hexdigest()
    assert got.signature == f"sha256={want}"
    webhook.close()
    failed = vmkeep("notify", "test", check=30)
    assert "webhook" in failed.err and webhook.token not in failed.err, failed.err


def test_audit_list_shows_api_requests(vmkeep, vm: str) -> None:
    """vmkeep audit list: a request of a token through a real daemon is listed with its token
    name, method, path and status; a refused login shows as well."""
    token = vmkeep("token", "create", "auditor", "--role", "admin", "--json").json()["token"]
    with running_daemon() as (_proc, c):
        auth = {"Authorization": f"Bearer {token}"}
        made = c.post("/v1/pools", json={"name": "audited"}, headers=auth)
        assert made.status_code == 201, made.text
        assert c.post("/v1/pools", json={"name": "x"}, headers={"Authorization": "Bearer no"}
                      ).status_code == 401  # fmt: skip
        rows = vmkeep("audit", "list", "--json").json()
    mine = [r for r in rows if r["path"] == "/v1/pools"]
    assert [(r["actor"], r["method"], r["status"]) for r in mine] == [
        ("-", "POST", 401), ("auditor", "POST", 201)
    ], rows  # fmt: skip
    assert "audited" not in json.dumps(rows) and token not in json.dumps(rows)  # never the body
    assert "auditor" in vmkeep("audit", "list", "--limit", "5").out


def test_lab_up_and_down(vmkeep, hv: Hypervisor) -> None:
    """vmkeep lab up --prefix P --vms 1 | lab exec | lab down --prefix P: a guest of this
    module's own prefix boots and answers, then nothing with the prefix is left."""
    prefix = f"{PREFIX}up-"
    try:
        up = vmkeep("lab", "up", "--vms", "1", "--disk-size", "32M", "--prefix", prefix, "--json")
        names = [v if isinstance(v, str) else v["name"] for v in up.json()]
        assert len(names) == 1 and names[0].startswith(prefix), up.out
        out = vmkeep("lab", "exec", names[0], "--", "cat", "/proc/mounts").out
        assert "/mnt/vda" in out
    finally:
        vmkeep("lab", "down", "--prefix", prefix)
    assert not [d.name for d in hv.list_domains() if d.name.startswith(prefix)]
