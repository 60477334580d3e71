"""``vmkeep lab demo``: the README's main job, on real libvirt/QEMU and the embedded defaults
(SQLite catalog, ``dir`` datastore).

Boots a lab VM, writes data in it, takes a full backup (guest frozen through qemu-guest-agent),
writes more, takes an incremental, restores the incremental as a new VM, boots it and compares the
checksums the restored guest reports with the originals; copies the chain off the host (restic
over SFTP to a real sshd on loopback) and backs up once more through the daemon's REST API, once
through the daemon's socket, and once by a backup job its scheduler fires; then logs in to the
daemon's web dashboard with the token and finds the VM there.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress

import httpx

from vmkeep.engine.core import stores
from vmkeep.engine.core.context import Context
from vmkeep.engine.points import copy, delete
from vmkeep.engine.protect.backup import run_backup
from vmkeep.engine.restore.point import RestoreOptions, restore
from vmkeep.engine.service import tokens
from vmkeep.engine.vm import inventory
from vmkeep.errors import AlreadyExists, LabError, NotFound
from vmkeep.lab.lab import Lab
from vmkeep.lab.sshd import Sshd
from vmkeep.model import JobState

DEMO_PREFIX = "vmkeep-demo-"
DEMO_DATASTORE = "demo"
OFFSITE_DATASTORE = "demo-offsite"


def run_demo(ctx: Context, say: Callable[[str], None]) -> None:
    lab = Lab(ctx.hv, ctx.config.lab.dir, prefix=DEMO_PREFIX, within=ctx.config.data_dir)
    say(f"catalog: {ctx.catalog.display_url}")
    lab.down()
    name, restored = f"{DEMO_PREFIX}1", f"{DEMO_PREFIX}restored"
    say(f"booting lab VM {name} (TCG, qemu-guest-agent, 256 MiB ext4 data disk) ...")
    lab.create(name, [256 << 20])
    inventory.import_vm(ctx, name)
    inventory.configure(ctx, name, {"mode": "increment", "fs_freeze": "agent"})
    ds_path = ctx.config.data_dir / "datastores" / DEMO_DATASTORE
    with suppress(AlreadyExists):  # a second demo run reuses it
        stores.add(ctx, DEMO_DATASTORE, "dir", {"path": str(ds_path)})
    say(f"datastore '{DEMO_DATASTORE}' (dir) at {ds_path}")

    first = lab.write_random(name, "/mnt/vda/first.bin", 16)
    say(f"wrote 16 MiB in the guest: first.bin sha256 {first}")
    full = run_backup(ctx, name, DEMO_DATASTORE)
    inc0 = full.result["increments"][-1]
    say(
        f"full backup: backup {full.result['id']} increment {inc0['id']}, {inc0['size']} bytes, "
        f"{inc0['consistency']} (guest frozen {inc0['freeze_ms']:.0f} ms)"
    )

    second = lab.write_random(name, "/mnt/vda/second.bin", 4)
    say(f"wrote 4 MiB more: second.bin sha256 {second}")
    inc = run_backup(ctx, name, DEMO_DATASTORE)
    inc1 = inc.result["increments"][-1]
    say(f"incremental: increment {inc1['id']} (parent {inc1['parent']}), {inc1['size']} bytes")

    res, _warnings = restore(
        ctx, inc.result["id"], RestoreOptions(increment=inc1["id"], name=restored, start=True)
    )
    say(f"restored increment {res['increment']} as new VM {restored} in {res['path']}; booting ...")
    deadline = time.monotonic() + 120
    while not ctx.hv.guest_ping(restored, 2):
        if time.monotonic() > deadline:
            raise LabError(f"restored VM {restored} did not come up")
        time.sleep(0.5)
    got = {f: lab.sha256(restored, f"/mnt/vda/{f}") for f in ("first.bin", "second.bin")}
    for f, want in (("first.bin", first), ("second.bin", second)):
        verdict = "MATCH" if got[f] == want else "MISMATCH"
        say(f"restored guest reports {f} sha256 {got[f]}: {verdict}")
    if got != {"first.bin": first, "second.bin": second}:
        raise LabError("restored data differs from the original")
    _off_the_host(ctx, inc.result["id"], say)
    _through_the_daemon(ctx, name, say)
    say(f"demo OK. Remove its VMs with 'vmkeep lab down --prefix {DEMO_PREFIX}'")


def _off_the_host(ctx: Context, backup_id: int, say: Callable[[str], None]) -> None:
    """A copy of the chain off the host: restic over SFTP to a real sshd on loopback."""
    work = ctx.config.data_dir / "demo-offsite"
    password = work / "restic.pass"
    work.mkdir(parents=True, exist_ok=True)
    if not password.exists():
        password.write_text(os.urandom(24).hex())
        password.chmod(0o600)
    with Sshd(work / "sshd") as sshd:
        with suppress(NotFound):  # a second demo run: the old sshd port is gone
            delete.remove_datastore(ctx, OFFSITE_DATASTORE, force=True)
        repo = f"sftp:root@{sshd.host}:{work / 'repo'}"
        added = stores.add(
            ctx,
            OFFSITE_DATASTORE,
            "restic",
            {
                "repo": repo,
                "password_file": str(password),
                "port": sshd.port,
                "identity": str(sshd.client_key),
                "init": True,
            },
        )
        for key in added.get("host_keys_learned", []):
            say(f"sshd on {sshd.host}:{sshd.port}; host key learned: {key}")
        say(f"datastore '{OFFSITE_DATASTORE}' (restic over SFTP) at {repo}")
        res = copy.copy_backup(ctx, backup_id, OFFSITE_DATASTORE)
        say(
            f"backups copy {backup_id} --to {OFFSITE_DATASTORE}: increments "
            f"{res['copied_increments']} copied, read back and verified (BLAKE3 checksums) as backup "
            f"{res['copy']}"
        )
        delete.remove_datastore(ctx, OFFSITE_DATASTORE, force=True)


def _through_the_daemon(ctx: Context, name: str, say: Callable[[str], None]) -> None:
    """The same backup through the service: ``vmkeep daemon`` on loopback, REST API, a job."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"VMKEEP_DATA_DIR": str(ctx.config.data_dir)}
    argv = [sys.executable, "-m", "vmkeep.cli.main", "daemon", "--listen", f"127.0.0.1:{port}"]
    daemon = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    token_name = f"demo-{os.getpid()}"
    secret = tokens.create(ctx, token_name, "operator")["token"]
    say(f"API token '{token_name}' (operator) created")
    try:
        auth = {"Authorization": f"Bearer {secret}"}
        with httpx.Client(base_url=base, timeout=30, headers=auth) as api:
            deadline = time.monotonic() + 30
            while True:
                with suppress(httpx.TransportError):
                    if api.get("/healthz").status_code == 200:
                        break
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise LabError("vmkeep daemon did not start")
                time.sleep(0.2)
            say(f"vmkeep daemon up on {base}; POST /v1/vms/{name}/backup ...")
            r = api.post(f"/v1/vms/{name}/backup", json={"datastore": DEMO_DATASTORE})
            job = r.json()["job"]
            say(f"  {r.status_code} Accepted, Location: {r.headers['location']}")
            while job["state"] in (JobState.QUEUED, JobState.RUNNING):
                time.sleep(0.3)
                job = api.get(f"/v1/jobs/{job['id']}").json()
            if job["state"] != JobState.DONE:
                raise LabError(f"backup job through the API ended {job['state']}: {job['error']}")
            res = job["result"]
            say(
                f"  job {job['id']} DONE: backup {res['id']} increment {res['increment']} "
                f"{res['status']} in {res['seconds']} s"
            )
            _read_through_the_daemon(ctx, name, env, say)
            _cli_backup_through_the_daemon(api, name, env, say)
            _scheduled_by_the_daemon(ctx, name, say)
            _the_dashboard(base, secret, name, say)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)
        tokens.revoke(ctx, token_name)
    say("vmkeep daemon stopped (SIGTERM)")


def _the_dashboard(base: str, secret: str, name: str, say: Callable[[str], None]) -> None:
    """The web dashboard the daemon serves at ``/`` (docs/web.md): logged in with the token,
    the overview and the VM list, as a browser gets them."""
    with httpx.Client(base_url=base, timeout=30, follow_redirects=True) as web:
        r = web.post("/login", data={"token": secret, "next": "/"})
        if r.status_code != 200 or "vmkeep_session" not in web.cookies:
            raise LabError(f"dashboard login answered HTTP {r.status_code}")
        counts = re.search(r'<span class="n">(\d+)</span> protected', r.text)
        rows = web.get("/vms")
        if counts is None or f'data-vm="{name}"' not in rows.text:
            raise LabError("the dashboard does not show the demo VM")
        say(f"dashboard {base}/ (logged in with the token): {counts.group(1)} VM(s) protected, "
            f"{name} on /vms")  # fmt: skip


def _scheduled_by_the_daemon(ctx: Context, name: str, say: Callable[[str], None]) -> None:
    """A backup job on the schedule ``now``: the daemon's scheduler fires it within a second,
    a worker runs the backup (docs/policies.md)."""
    from vmkeep.engine.service import backupjobs

    job_name = f"demo-{os.getpid()}"
    backupjobs.create(ctx, job_name, {"vms": [name]}, DEMO_DATASTORE, "now", owner="demo")
    say(f"backup job {job_name} created (--vm {name} --schedule now) ...")
    try:
        deadline = time.monotonic() + 300
        while True:
            run = backupjobs.show(ctx, job_name)["last_run"]
            if run and run["jobs"] and run["jobs"][0]["state"] not in ("QUEUED", "RUNNING"):
                break
            if time.monotonic() > deadline:
                raise LabError(f"backup job {job_name} did not run within 300 s: {run}")
            time.sleep(0.3)
        job = run["jobs"][0]
        if job["state"] != JobState.DONE:
            raise LabError(f"the scheduled backup ended {job['state']}: {job['error']}")
        say(f"  the daemon's scheduler fired it (run {run['id']}): job {job['id']} DONE")
    finally:
        backupjobs.remove(ctx, job_name)


def _cli_backup_through_the_daemon(
    api: httpx.Client, name: str, env: dict[str, str], say: Callable[[str], None]
) -> None:
    """``vmkeep backup`` while the daemon runs: the command hands the backup to the daemon as a
    job over its socket and follows it (Ctrl-C would cancel the job)."""
    argv = [sys.executable, "-m", "vmkeep.cli.main", "backup", name, "-d", DEMO_DATASTORE]
    t0 = time.monotonic()
    proc = subprocess.run([*argv, "--json"], env=env, capture_output=True, text=True)
    took = time.monotonic() - t0
    if proc.returncode:
        raise LabError(f"vmkeep backup failed: {proc.stderr.strip()[-500:]}")
    res = json.loads(proc.stdout)
    job = api.get("/v1/jobs").json()[0]  # newest first
    how = "in its own process (no daemon answered)"
    if job["who"] == "@local" and (job["result"] or {}).get("increment") == res["increment"]:
        how = f"as the daemon's job {job['id']}"
    say(
        f"  vmkeep backup {name}: increment {res['increment']} {res['status']}, run {how}, "
        f"{took:.2f} s from command start to exit"
    )


def _read_through_the_daemon(
    ctx: Context, name: str, env: dict[str, str], say: Callable[[str], None]
) -> None:
    """``vmkeep backups list`` while the daemon runs: it answers over its socket (the command
    then never imports SQLAlchemy, which ``-X importtime`` shows)."""
    argv = [sys.executable, "-X", "importtime", "-m", "vmkeep.cli.main", "backups", "list"]
    t0 = time.monotonic()
    proc = subprocess.run([*argv, "--vm", name], env=env, capture_output=True, text=True)
    took = time.monotonic() - t0
    if proc.returncode:
        raise LabError(f"vmkeep backups list failed: {proc.stderr.strip()[-500:]}")
    sock = ctx.config.socket
    how = f"answered by the daemon over {sock}"
    if "sqlalchemy" in proc.stderr:
        how = f"read the catalog itself (no daemon answered on {sock})"
    say(f"  vmkeep backups list --vm {name}: {how} in {took:.2f} s")
