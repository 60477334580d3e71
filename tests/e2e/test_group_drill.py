"""Group drills on two real lab VMs, db and app, each with its "production" network set-up on its
own disk (``/mnt/vda/vmkeep-rc``, run by the lab's /init): db listens on 10.77.0.2:5432, app
has 10.77.0.3. Production never ran it (each guest's NIC is on its own user-mode network):
only the drill VMs, booted from the group backup on their shared isolated network, do.

One group backup, then: a drill whose cross-member probe (app reaches db's port) PASSes; a drill
killed midway, whose marked leftovers ``group drill-clean`` removes; a drill through a daemon whose
cross-probe targets a closed port and FAILs naming it. After each: no drill domain, no overlay,
no drill network.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkeep.hypervisor import Hypervisor
from vmkeep.hypervisor.domain_xml import mac_addresses
from vmkeep.lab import Lab

from .conftest import PREFIX, running_daemon

DB, APP = f"{PREFIX}db", f"{PREFIX}app"
RC = {
    DB: "ip link set lo up; ip addr add 10.77.0.2/24 dev eth0; ip link set eth0 up\n"
    "nc -ll -p 5432 -e /bin/echo ok </dev/null >/dev/null 2>&1 &\n",
    APP: "ip link set lo up; ip addr add 10.77.0.3/24 dev eth0; ip link set eth0 up\n",
}
REACH = "echo | nc -w 5 10.77.0.2 {port} | grep -qx ok"


@pytest.fixture(scope="module")
def pair(lab: Lab) -> Iterator[list[str]]:
    for name in (DB, APP):
        lab.create(name, [64 << 20])
        lab.sh(name, f"printf %s '{RC[name]}' > /mnt/vda/vmkeep-rc && sync")
    yield [DB, APP]
    for name in (DB, APP):
        lab.remove(name)


def drill_domains(hv: Hypervisor) -> list[str]:
    return [d.name for d in hv.list_domains() if "-gdrill-" in d.name]


def drill_networks() -> list[str]:
    out = subprocess.run(
        ["virsh", "-c", "qemu:///system", "net-list", "--all", "--name"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [n for n in out.split() if n.startswith("vmkeep-gdrill-")]


def assert_no_leftovers(hv: Hypervisor, data: Path) -> None:
    assert drill_domains(hv) == []
    assert drill_networks() == []
    drills = data / "drills"
    assert not drills.exists() or not any(drills.iterdir()), list(drills.rglob("*"))


def test_group_drill_passes_fails_on_a_closed_port_and_leaves_nothing(
    vmkeep, hv: Hypervisor, pair: list[str], qemu_reachable_data_dir: Path
) -> None:
    data = qemu_reachable_data_dir
    for name in pair:
        vmkeep("vm", "import", name)
    ds = data / "ds"  # QEMU reads the backup files through the drill's overlays
    vmkeep("datastore", "add", "ds", "--driver", "dir", "--path", str(ds))
    vmkeep("group", "create", "shop", DB, APP)
    gb = vmkeep("group", "backup", "shop", "-d", "ds", "--json").json()
    assert gb["status"] == "VALID", gb
    gb_id = str(gb["id"])
    # production never ran its rc: no address on eth0 (the drill is what brings the cut up)
    assert "10.77.0.2" not in hv.guest_exec(DB, ["/bin/sh", "-c", "ip addr"], 30).stdout

    # 1. PASS: each member's steps, both booted in start order, app reaches db's port; in the
    # drill VM, db's NIC has the production MAC (its own config works as in production)
    macs = {name: mac_addresses(hv.domain_xml(name))[0] for name in pair}
    assert all(macs.values()), macs
    same_mac = f"grep -qx {macs[DB]} /sys/class/net/eth0/address"
    ok = vmkeep(
        "group", "drill", gb_id, "--probe", f"{DB}=test -f /mnt/vda/vmkeep-rc && {same_mac}",
        "--cross-probe", f"{APP}={REACH.format(port=5432)}", "--json",
    ).json()  # fmt: skip
    assert ok["result"] == "PASS" and ok["reason"] is None, ok
    steps = [(c["member"], c["step"]) for c in ok["checks"]]
    assert steps == [
        (DB, "checksums"), (DB, "fsck vda"), (APP, "checksums"), (APP, "fsck vda"),
        (None, "network"), (DB, "define"), (APP, "define"), (DB, "boot"), (APP, "boot"),
        (DB, "probe"), (APP, "cross-probe"),
    ], steps  # fmt: skip
    assert all(c["ok"] for c in ok["checks"])
    by = {(c["member"], c["step"]): c["detail"] for c in ok["checks"]}
    assert "no <forward>, no <ip>, no host address" in by[(None, "network")]
    for name in pair:
        assert macs[name] in by[(name, "define")], by[(name, "define")]
    assert_no_leftovers(hv, data)

    # 2. killed midway: its marked domains, network and overlays stay; drill-clean removes them
    env = dict(os.environ)
    killed = subprocess.Popen(
        [sys.executable, "-m", "vmkeep.cli.main", "group", "drill", gb_id], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while len(drill_domains(hv)) < 2 and time.monotonic() < deadline:
        assert killed.poll() is None, "the drill ended before it could be killed"
        time.sleep(0.5)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    left = sorted([*drill_domains(hv), *drill_networks()])
    assert len(left) == 3, f"killed before it made its VMs and network, proving nothing: {left}"
    assert (data / "drills" / f"group-{gb_id}").is_dir()  # its overlays
    removed = vmkeep("group", "drill-clean", "--json").json()["removed"]
    assert sorted(removed) == sorted([*left, str(data / "drills" / f"group-{gb_id}")])
    assert_no_leftovers(hv, data)

    # 3. FAIL, through a daemon: the cross-probe names a port nothing listens on
    with running_daemon():
        bad = vmkeep(
            "group", "drill", gb_id, "--cross-probe", f"{APP}={REACH.format(port=5439)}",
            check=26,
        )  # fmt: skip
    assert f"FAILED at {APP}: cross-probe" in bad.err and "5439" in bad.err, bad.err
    assert f"FAIL {APP}: cross-probe: " in bad.out and f"ok   {DB}: boot: " in bad.out, bad.out
    assert_no_leftovers(hv, data)

    rows = vmkeep("group", "backups", "--json").json()
    res = rows[0]["last_drill"]
    assert len(rows) == 1 and res["result"] == "FAIL" and res["group_drill"] > ok["group_drill"]
    assert res["reason"].startswith(f"{APP}: cross-probe: ") and "5439" in res["reason"], res
    assert [c["ok"] for c in res["checks"]][-1] is False
    assert all(c["ok"] for c in res["checks"][:-1])  # both booted: only the cut's probe failed
    assert f"FAIL (drill {res['group_drill']}" in vmkeep("group", "backups").out
    jobs = vmkeep("jobs", "list", "--json").json()
    states = sorted(j["state"] for j in jobs if j["kind"] == "group-drill")
    assert "DONE" in states and "FAILED" in states, jobs
