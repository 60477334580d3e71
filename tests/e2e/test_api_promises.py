"""The daemon and its API keep their promises on a real guest's real points (README, "The
service"): SIGTERM while a backup runs cancels it through the engine's cancel path and exits 0
(the guest thawed and running, no checkpoint, no half point, the restarted daemon shows the job
CANCELLED); `jobs cancel` and `token revoke` from the CLI act on the daemon at once; the action
and catalog routes (verify, copy, drill, delete, scan, datastores, groups) do what they say with
real data, checked as a user would: the job's result, the files in the datastore, the lists."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from vmkeep.datastores.dir import STAGING
from vmkeep.engine.core.chains import CHECKPOINT_PREFIX
from vmkeep.errors import EXIT_INTERRUPTED
from vmkeep.lab import Lab
from vmkeep.lab.lab import read_file_from_image

from .conftest import PREFIX, running_daemon

VM = f"{PREFIX}api"
ENDED = ("DONE", "FAILED", "CANCELLED")
# The backup stops a few seconds between its start (checkpoint made, QEMU's push job begun)
# and its copy: the moment a test signals the daemon or cancels the job
SLOW_COPY = "copy=sleep:4"
SLOW_FREEZE = "freeze=sleep:4"  # the guest's file systems frozen by its agent meanwhile


@pytest.fixture(scope="module")
def guest(lab: Lab) -> Iterator[str]:
    """One running lab VM (agent, 64 MiB data disk at /mnt/vda) for the whole module."""
    lab.create(VM, [64 << 20])
    try:
        yield VM
    finally:
        lab.remove(VM)


@dataclass
class Setup:
    """A test's own catalog with the guest imported, a dir datastore ``ds`` and an admin
    token."""

    vm: str
    ds: Path
    data: Path
    admin: dict[str, str]


@pytest.fixture
def setup(vmkeep, lab: Lab, guest: str, qemu_reachable_data_dir: Path) -> Setup:
    for cp in lab.hv.checkpoints(guest):  # another test's catalog made them: not ours to keep
        lab.hv.delete_checkpoint(guest, cp)
    ds = qemu_reachable_data_dir / "ds"
    vmkeep("vm", "import", guest)
    # a checkpoint per point, the guest frozen through its agent while each begins
    vmkeep("vm", "config", guest, "--mode", "increment", "--fs-freeze", "agent")
    vmkeep("datastore", "add", "ds", "--driver", "dir", "--path", str(ds))
    token = vmkeep("token", "create", "root", "--role", "admin", "--json").json()["token"]
    return Setup(guest, ds, qemu_reachable_data_dir, {"Authorization": f"Bearer {token}"})


def wait_job(c: httpx.Client, auth: dict[str, str], job_id: int, states: tuple[str, ...]) -> Any:
    """The job once its state is one of ``states``: awaiting its end, the API's long poll
    answers as soon as it ends; awaiting its start, the state is read every 0.1 s."""
    deadline = time.monotonic() + 300
    wait = {"wait": 2} if set(states) <= set(ENDED) else {}
    while True:
        job = c.get(f"/v1/jobs/{job_id}", params=wait, headers=auth).json()
        if job["state"] in states:
            return job
        assert time.monotonic() < deadline, job
        if job["state"] == "QUEUED" or not wait:
            time.sleep(0.1)


def run_job(c: httpx.Client, auth: dict[str, str], answer: httpx.Response) -> Any:
    """The end of the job a 202 answer queued."""
    assert answer.status_code == 202, answer.text
    assert answer.headers["location"] == f"/v1/jobs/{answer.json()['job']['id']}"
    return wait_job(c, auth, answer.json()["job"]["id"], ENDED)


def begun(c: httpx.Client, auth: dict[str, str], lab: Lab, vm: str, job_id: int) -> str:
    """Wait until the backup job runs and has begun on the guest; the checkpoint it made."""
    before = set(lab.hv.checkpoints(vm))
    wait_job(c, auth, job_id, ("RUNNING",))
    deadline = time.monotonic() + 120
    while not (made := set(lab.hv.checkpoints(vm)) - before):
        job = c.get(f"/v1/jobs/{job_id}", headers=auth).json()
        assert job["state"] == "RUNNING" and time.monotonic() < deadline, job
        time.sleep(0.1)
    return made.pop()


def frozen(c: httpx.Client, auth: dict[str, str], lab: Lab, vm: str, job_id: int) -> None:
    """Wait until the backup job has frozen the guest's file systems."""
    deadline = time.monotonic() + 120
    while lab.hv.fs_freeze_status(vm, 10) != "frozen":
        job = c.get(f"/v1/jobs/{job_id}", headers=auth).json()
        assert job["state"] in ("QUEUED", "RUNNING") and time.monotonic() < deadline, job
        time.sleep(0.1)


def checksums(folder: Path, names: list[str]) -> dict[str, str]:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


def stored_chains(ds: Path) -> set[str]:
    """The chains a dir datastore holds on disk ("vm/chain")."""
    return {
        f"{vm.name}/{chain.name}"
        for vm in ds.iterdir()
        if vm.is_dir() and vm.name != STAGING
        for chain in vm.iterdir()
    }


def left_behind(vmkeep, lab: Lab, s: Setup) -> list[str]:
    """What a backup that did not end VALID left: a guest paused or frozen, the VM in a busy
    state (BACKUP while locked), a job still running, a checkpoint of no valid point, staged or partial files, a
    chain in the datastore the catalog has no valid point of."""
    found = []
    info = lab.hv.domain(s.vm)
    if info.state != "ACTIVE" or info.paused:
        found.append(f"guest {info.state}, paused {info.paused}")
    if (fs := lab.hv.fs_freeze_status(s.vm, 30)) != "thawed":
        found.append(f"guest file systems {fs}")
    if (state := vmkeep("vm", "show", s.vm, "--json").json()["lcm_state"]) != "RUNNING":
        found.append(f"lcm_state {state}")
    running = vmkeep("jobs", "list", "--state", "RUNNING", "--json").json()
    found += [f"job {j['id']} {j['kind']} RUNNING" for j in running]
    points = vmkeep("backups", "list", "--vm", s.vm, "--json").json()
    valid = [p for p in points if p["status"] == "VALID"]
    kept = {i["checkpoint"] for p in valid for i in p["increments"] if i.get("checkpoint")}
    ours = {c for c in lab.hv.checkpoints(s.vm) if c.startswith(CHECKPOINT_PREFIX)}
    found += [f"checkpoint {c}" for c in sorted(ours - kept)]
    for staging in (s.data / "staging", s.ds / STAGING):
        if staging.exists():
            found += [f"staged {p}" for p in staging.iterdir()]
    found += [f"partial {p}" for p in s.ds.rglob("*.partial")] if s.ds.exists() else []
    chains = stored_chains(s.ds) if s.ds.exists() else set()
    found += [f"chain {c} on disk" for c in sorted(chains - {p["chain"] for p in valid})]
    return found


@pytest.mark.parametrize(
    ("moment", "daemon"),
    [("frozen", ("--workers", "1")), ("copying", ("--workers", "1", "--http-workers", "2"))],
    ids=["frozen", "copying-http-workers"],
)
def test_sigterm_cancels_the_running_backup_and_exits_0(
    vmkeep,
    lab: Lab,
    setup: Setup,
    monkeypatch: pytest.MonkeyPatch,
    moment: str,
    daemon: tuple[str, ...],
) -> None:
    """SIGTERM to `vmkeep daemon` (one process, or with `--http-workers 2`) while its job backs
    up a running guest (POST /v1/vms/{vm}/backup), with the guest's file systems frozen or
    while the backup copies: the daemon cancels the job through the engine's cancel path and
    exits 0; the guest runs on, thawed, with no checkpoint and no half point in the datastore;
    the restarted daemon shows the job CANCELLED (GET /v1/jobs/{id}), not FAILED "daemon
    restarted". A scan queued behind it was not taken ("SIGTERM stops taking jobs"): the
    restarted daemon runs it (POST /v1/datastores/{ds}/scan: no chain left there). The next
    backup is VALID."""
    s = setup
    lab.write_random(s.vm, "/mnt/vda/before", 4)
    monkeypatch.setenv("VMKEEP_FAILPOINTS", SLOW_FREEZE if moment == "frozen" else SLOW_COPY)
    with running_daemon(*daemon) as (proc, c):
        monkeypatch.delenv("VMKEEP_FAILPOINTS")
        r = c.post(f"/v1/vms/{s.vm}/backup", headers=s.admin, json={"datastore": "ds"})
        assert r.status_code == 202, r.text
        job_id = r.json()["job"]["id"]
        if moment == "frozen":
            frozen(c, s.admin, lab, s.vm, job_id)
        else:
            begun(c, s.admin, lab, s.vm, job_id)
        r = c.post("/v1/datastores/ds/scan", headers=s.admin)
        assert r.status_code == 202, r.text
        queued = r.json()["job"]["id"]
        assert c.get(f"/v1/jobs/{queued}", headers=s.admin).json()["state"] == "QUEUED"
        pid = proc.pid
    # running_daemon sent SIGTERM and saw exit code 0; the job's end is in the catalog
    assert left_behind(vmkeep, lab, s) == []
    point = vmkeep("backups", "list", "--vm", s.vm, "--json").json()
    assert [(p["status"], p["error"]) for p in point] == [("CANCELLED", "cancelled")], point
    assert vmkeep("jobs", "show", str(queued), "--json").json()["state"] == "QUEUED"
    with running_daemon() as (_proc, c):
        job = c.get(f"/v1/jobs/{job_id}", headers=s.admin).json()
        assert (job["state"], job["exit_code"], job["pid"]) == (
            "CANCELLED",
            EXIT_INTERRUPTED,
            pid,
        ), job
        assert job["error"] == {"code": "Cancelled", "message": "cancelled"}, job
        scan = wait_job(c, s.admin, queued, ENDED)
        assert scan["state"] == "DONE" and scan["result"]["chains"] == [], scan
        done = run_job(
            c, s.admin, c.post(f"/v1/vms/{s.vm}/backup", headers=s.admin, json={"datastore": "ds"})
        )
        assert done["state"] == "DONE" and done["result"]["status"] == "VALID", done
    assert left_behind(vmkeep, lab, s) == []


def test_jobs_cancel_and_token_revoke_from_the_cli(
    vmkeep, lab: Lab, setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`vmkeep jobs cancel ID` of a backup the daemon runs (queued with an operator's token):
    the job ends CANCELLED, nothing is left behind, the daemon goes on and the next backup is
    VALID. `vmkeep token revoke NAME`: the daemon answers that token's next request 401 (GET
    /v1/jobs), at once, while other tokens still work."""
    s = setup
    full = vmkeep("backup", s.vm, "--datastore", "ds", "--json").json()  # a chain to extend
    made = vmkeep("token", "create", "ops", "--role", "operator", "--json").json()
    ops = {"Authorization": f"Bearer {made['token']}"}
    monkeypatch.setenv("VMKEEP_FAILPOINTS", SLOW_COPY)
    with running_daemon() as (proc, c):
        monkeypatch.delenv("VMKEEP_FAILPOINTS")
        r = c.post(f"/v1/vms/{s.vm}/backup", headers=ops, json={"datastore": "ds"})
        assert r.status_code == 202, r.text
        job_id = r.json()["job"]["id"]
        checkpoint = begun(c, ops, lab, s.vm, job_id)
        # while it writes, its datastore and its chain stay: DELETE /v1/datastores/{ds} and
        # DELETE /v1/backups/{id} are refused, even forced
        r = c.delete("/v1/datastores/ds", params={"force": "true"}, headers=s.admin)
        assert r.status_code == 409, r.text
        assert f"backups {full['id']} are being written to it" in r.text, r.text
        r = c.delete(f"/v1/backups/{full['id']}", params={"force": "true"}, headers=s.admin)
        assert r.status_code == 409, r.text  # before a job is queued
        assert "a backup of this chain is running" in r.text, r.text
        asked = vmkeep("jobs", "cancel", str(job_id), "--json").json()
        assert asked["id"] == job_id and asked["cancel_requested"], asked
        end = wait_job(c, ops, job_id, ENDED)
        assert (end["state"], end["exit_code"]) == ("CANCELLED", EXIT_INTERRUPTED), end
        assert proc.poll() is None and c.get("/healthz").status_code == 200
        assert left_behind(vmkeep, lab, s) == []
        assert checkpoint not in lab.hv.checkpoints(s.vm)
        # the chain it extended is whole: its full point alone, still VALID
        chain = vmkeep("backups", "show", str(full["id"]), "--json").json()
        assert chain["status"] == "VALID", chain
        assert [i["status"] for i in chain["increments"]] == ["VALID", "CANCELLED"], chain
        # a second cancel of an ended job: the documented refusal (wrong state, exit 4)
        again = vmkeep("jobs", "cancel", str(job_id), check=4)
        assert "CANCELLED" in again.err, again.err

        expected = lab.write_random(s.vm, "/mnt/vda/after", 4)
        done = run_job(
            c, ops, c.post(f"/v1/vms/{s.vm}/backup", headers=ops, json={"datastore": "ds"})
        )
        assert done["state"] == "DONE" and done["result"]["status"] == "VALID", done
        assert done["result"]["id"] == full["id"], done  # the same chain, extended
        increment = done["result"]["increment"]
        assert left_behind(vmkeep, lab, s) == []

        assert c.get("/v1/jobs", headers=ops).status_code == 200
        assert vmkeep("token", "revoke", "ops", "--json").json() == {
            "name": "ops",
            "revoked": True,
        }
        r = c.get("/v1/jobs", headers=ops)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "Unauthorized", r.text
        r = c.post(f"/v1/vms/{s.vm}/backup", headers=ops, json={"datastore": "ds"})
        assert r.status_code == 401, r.text
        assert c.get("/v1/jobs", headers=s.admin).status_code == 200
        assert [t["name"] for t in vmkeep("token", "list", "--json").json()] == ["root"]
    # the point the daemon made after the cancel holds the guest's bytes
    dest = s.data / "restores" / "vda.qcow2"
    vmkeep("restore", str(full["id"]), "--increment", str(increment), "--disk", "vda",
           "--path", str(dest))  # fmt: skip
    assert hashlib.sha256(read_file_from_image(dest, "/after", s.data)).hexdigest() == expected


def test_point_routes_on_real_points(vmkeep, lab: Lab, setup: Setup) -> None:
    """The action and catalog routes on a real guest's points: POST /v1/backups/{id}/verify and
    /copy (again later: only the new increment), DELETE /v1/backups/{id}?increment=N (its files
    go, the chain stays), DELETE /v1/datastores/{ds} (refused while it holds a point,
    ?force=true forgets it, the files stay), POST /v1/datastores/{ds}/scan {"import": true}
    (brings the chain back), DELETE /v1/backups/{id} (the files go), POST /v1/groups (listed by
    GET /v1/groups and `vmkeep group list`)."""
    s = setup
    vmkeep("datastore", "add", "far", "--driver", "dir", "--path", str(s.data / "far"))
    far = s.data / "far"
    sha = lab.write_random(s.vm, "/mnt/vda/data", 4)
    with running_daemon() as (_proc, c):
        auth = s.admin
        job = run_job(
            c, auth, c.post(f"/v1/vms/{s.vm}/backup", headers=auth, json={"datastore": "ds"})
        )
        assert job["state"] == "DONE", job
        bid = job["result"]["id"]
        chain = job["result"]["chain"]

        job = run_job(c, auth, c.post(f"/v1/backups/{bid}/verify", headers=auth))
        assert (job["state"], job["exit_code"], job["result"]["ok"]) == ("DONE", 0, True), job
        checked = {f["file"]: f["ok"] for f in job["result"]["files"]}
        assert checked == {"0.vda.qcow2": True, "0.domain.xml": True}, job

        job = run_job(c, auth, c.post(f"/v1/backups/{bid}/copy", headers=auth, json={"to": "far"}))
        assert job["state"] == "DONE" and job["result"]["verified"] is True, job
        assert job["result"]["copied_increments"] == [0], job
        cid = job["result"]["copy"]
        copy = c.get(f"/v1/backups/{cid}", headers=auth).json()
        assert (copy["datastore"], copy["status"]) == ("far", "VALID"), copy
        copied = copy["chain"]
        assert stored_chains(far) == {copied}

        # an increment, copied again: only what is new goes, the same bytes in both datastores
        lab.write_random(s.vm, "/mnt/vda/more", 2)
        job = run_job(
            c, auth, c.post(f"/v1/vms/{s.vm}/backup", headers=auth, json={"datastore": "ds"})
        )
        assert (job["result"]["id"], job["result"]["increment"]) == (bid, 1), job
        job = run_job(c, auth, c.post(f"/v1/backups/{bid}/copy", headers=auth, json={"to": "far"}))
        assert job["state"] == "DONE" and job["result"]["verified"] is True, job
        assert (job["result"]["copy"], job["result"]["copied_increments"]) == (cid, [1]), job
        files = ["0.vda.qcow2", "0.domain.xml", "1.vda.qcow2", "1.domain.xml"]
        assert checksums(far / copied, files) == checksums(s.ds / chain, files)

        # the newest increment deleted: its files go, the chain and its full point stay
        job = run_job(
            c, auth, c.delete(f"/v1/backups/{bid}", params={"increment": 1}, headers=auth)
        )
        assert job["state"] == "DONE", job
        assert job["result"]["deleted_files"] == ["1.vda.qcow2", "1.domain.xml"], job
        assert not (s.ds / chain / "1.vda.qcow2").exists()
        assert (s.ds / chain / "0.vda.qcow2").exists()
        shown = c.get(f"/v1/backups/{bid}", headers=auth).json()
        assert [(i["id"], i["status"]) for i in shown["increments"]] == [(0, "VALID")], shown

        # a datastore holding a point: refused (409) naming the fix; forced: forgotten
        r = c.delete("/v1/datastores/far", headers=auth)
        assert r.status_code == 409 and "--force" in r.json()["error"]["message"], r.text
        r = c.delete("/v1/datastores/far", params={"force": "true"}, headers=auth)
        assert r.status_code == 200, r.text
        assert r.json() == {"datastore": "far", "forgotten_backups": [cid]}
        assert "far" not in [d["name"] for d in c.get("/v1/datastores", headers=auth).json()]
        assert c.get(f"/v1/backups/{cid}", headers=auth).status_code == 404
        assert stored_chains(far) == {copied}  # the data stays where it is

        # added back and scanned: the chain is the catalog's again, restorable
        r = c.post(
            "/v1/datastores",
            headers=auth,
            json={"name": "far", "driver": "dir", "options": {"path": str(far)}},
        )
        assert r.status_code == 201, r.text
        job = run_job(
            c, auth, c.post("/v1/datastores/far/scan", headers=auth, json={"import": True})
        )
        assert job["state"] == "DONE", job
        found = job["result"]["chains"]
        assert [(f["chain"], f["known"]) for f in found] == [(copied, False)], job
        assert found[0]["increments"] == [0, 1], job
        back = c.get(f"/v1/backups/{found[0]['imported']}", headers=auth).json()
        assert (back["datastore"], back["chain"], back["status"]) == ("far", copied, "VALID")
        assert [i["id"] for i in back["increments"]] == [0, 1], back
        job = run_job(c, auth, c.post(f"/v1/backups/{back['id']}/verify", headers=auth))
        assert job["state"] == "DONE" and job["result"]["ok"] is True, job
        # scanned again: known now, nothing imported twice
        job = run_job(
            c, auth, c.post("/v1/datastores/far/scan", headers=auth, json={"import": True})
        )
        assert [(f["chain"], f["known"]) for f in job["result"]["chains"]] == [(copied, True)]

        # deleted: the point and its files are gone, the original stays
        job = run_job(c, auth, c.delete(f"/v1/backups/{back['id']}", headers=auth))
        assert job["state"] == "DONE", job
        assert stored_chains(far) == set()
        assert c.get(f"/v1/backups/{back['id']}", headers=auth).status_code == 404
        assert [p["id"] for p in c.get("/v1/backups", headers=auth).json()] == [bid]
        assert stored_chains(s.ds) == {chain}

        body = {"name": "app", "vms": [s.vm]}
        r = c.post("/v1/groups", headers=auth, json=body)
        assert r.status_code == 201, r.text
        groups = c.get("/v1/groups", headers=auth).json()
        assert [(g["name"], g["members"]) for g in groups] == [("app", [s.vm])], groups
        r = c.post("/v1/groups", headers=auth, json=body)
        assert r.status_code == 409, r.text
    listed = vmkeep("group", "list", "--json").json()
    assert [(g["name"], g["members"]) for g in listed] == [("app", [s.vm])], listed
    # the original point still restores the guest's bytes
    dest = s.data / "restores" / "vda.qcow2"
    vmkeep("restore", str(bid), "--disk", "vda", "--path", str(dest))
    assert hashlib.sha256(read_file_from_image(dest, "/data", s.data)).hexdigest() == sha


def test_drill_route_on_a_real_point(vmkeep, lab: Lab, setup: Setup) -> None:
    """POST /v1/backups/{id}/drill of a real guest's point: the job ends DONE with the drill's
    PASS, and its throw-away VM is gone."""
    s = setup
    with running_daemon() as (_proc, c):
        job = run_job(
            c, s.admin, c.post(f"/v1/vms/{s.vm}/backup", headers=s.admin, json={"datastore": "ds"})
        )
        assert job["state"] == "DONE", job
        bid = job["result"]["id"]
        job = run_job(
            c, s.admin, c.post(f"/v1/backups/{bid}/drill", headers=s.admin, json={"timeout": 600})
        )
        assert job["state"] == "DONE" and job["result"]["result"] == "PASS", job
        steps = {ch["step"]: ch["ok"] for ch in job["result"]["checks"]}
        assert steps == {"checksums": True, "fsck vda": True, "boot": True}, job
        shown = c.get(f"/v1/backups/{bid}", headers=s.admin).json()
        assert shown["increments"][0]["last_drill"]["result"] == "PASS", shown
    assert not [d.name for d in lab.hv.list_domains() if d.name.startswith(f"{s.vm}-drill-")]
