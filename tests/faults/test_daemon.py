"""The service on a real loopback socket: a real ``vmkeep daemon`` process, real lab VM, httpx.

A backup through the API is a 202 job that ends DONE and restores bit-identical; a wrong state is a
409 before any job is queued; DELETE cancels a running backup job cleanly; SIGKILL of the daemon
mid-backup leaves no frozen guest, the job FAILED after restart, and the next backup VALID.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from .conftest import Harness, Result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def daemon(
    h: Harness, extra: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], httpx.Client]]:
    port = _free_port()
    proc = h.popen("daemon", "--listen", f"127.0.0.1:{port}", "--workers", "2", extra=extra)
    if not h.token:
        h.token = h.run("token", "create", "ops", "--role", "operator", "--json").json()["token"]
    client = httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        timeout=30,
        headers={"Authorization": f"Bearer {h.token}"},
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            if client.get("/healthz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None, h.stderr_file.read_text()
        assert time.monotonic() < deadline, "daemon did not come up"
        time.sleep(0.2)
    try:
        yield proc, client
    finally:
        client.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 0, h.stderr_file.read_text()


def wait_job(
    client: httpx.Client, job_id: int, states: set[str], timeout: float = 300
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.3)


def test_backup_through_the_api_restores_bit_identical(harness: Harness) -> None:
    h = harness
    h.backup_and_check()  # a chain to extend
    with daemon(h) as (_proc, client):
        h.write()
        r = client.post(f"/v1/vms/{h.vm}/backup", json={"datastore": "ds"})
        assert r.status_code == 202, r.text
        job = r.json()["job"]
        assert r.headers["location"] == f"/v1/jobs/{job['id']}" and job["state"] == "QUEUED"
        seen = []  # the job's states as /v1/events streams them
        with client.stream("GET", "/v1/events", params={"max_seconds": 300}) as events:
            for line in events.iter_lines():
                if not line.startswith("data: "):
                    continue
                row = json.loads(line.removeprefix("data: "))
                if row.get("id") == job["id"] and "kind" in row:
                    seen.append(row["state"])
                    if row["state"] in ("DONE", "FAILED"):
                        break
        assert seen[-1] == "DONE" and ("RUNNING" in seen or "QUEUED" in seen), seen
        done = wait_job(client, job["id"], {"DONE", "FAILED"})
        assert done["state"] == "DONE", (done["error"], h.stderr_file.read_text()[-2000:])
        assert done["origin"] == "api" and done["done_bytes"] == done["total_bytes"]
        result = done["result"]
        assert result["status"] == "VALID" and result["increment"] >= 1
        p = h.record(Result(0, json.dumps(result), ""))
        h.restore_matches(p)
        listed = {j["id"]: j for j in h.run("jobs", "list", "--json").json()}
        assert listed[job["id"]]["state"] == "DONE" and listed[job["id"]]["origin"] == "api"
        # the CLI restore just above is a job too, newer than the API's: the CLI handed it to
        # the daemon over its socket
        newest = max(listed.values(), key=lambda j: j["id"])
        assert newest["kind"] == "restore" and newest["who"] == "@local", newest
        # bad input: 404 / 422, never 500
        assert client.post("/v1/vms/nope/backup", json={"datastore": "ds"}).status_code == 404
        assert client.post(f"/v1/vms/{h.vm}/backup", json={"datastore": "nope"}).status_code == 404
        assert client.post(f"/v1/vms/{h.vm}/backup", json={"x": 1}).status_code == 422
        assert client.get("/v1/jobs/999999").status_code == 404
        assert client.get("/v1/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
    # the token's secret is in no log line, job row or response
    assert h.token not in h.stderr_file.read_text()
    assert h.token not in h.run("jobs", "list", "--json").out
    assert h.token.encode() not in (h.data / "catalog.db").read_bytes()
    h.assert_healthy()


def test_quiesce_of_a_quiesced_vm_is_409(harness: Harness) -> None:
    h = harness
    with daemon(h) as (_proc, client):
        r = client.post(f"/v1/vms/{h.vm}/quiesce")
        assert r.status_code == 202, r.text
        assert wait_job(client, r.json()["job"]["id"], {"DONE", "FAILED"})["state"] == "DONE"
        assert h.freeze_status() == "frozen"
        r = client.post(f"/v1/vms/{h.vm}/quiesce")
        assert r.status_code == 409 and r.json()["error"]["code"] == "WrongState", r.text
        r = client.post(f"/v1/vms/{h.vm}/unquiesce")
        assert r.status_code == 202
        assert wait_job(client, r.json()["job"]["id"], {"DONE", "FAILED"})["state"] == "DONE"
    h.assert_healthy()


def test_cancel_a_running_backup_job(harness: Harness) -> None:
    h = harness
    with daemon(h, {"VMKEEP_FAILPOINTS": "copy=sleep:4"}) as (proc, client):
        h.write()
        job = client.post(f"/v1/vms/{h.vm}/backup", json={"datastore": "ds"}).json()["job"]
        wait_job(client, job["id"], {"RUNNING"})
        r = client.delete(f"/v1/jobs/{job['id']}")
        assert r.status_code == 200 and r.json()["cancel_requested"], r.text
        end = wait_job(client, job["id"], {"DONE", "FAILED", "CANCELLED"})
        assert end["state"] == "CANCELLED", end
        assert client.delete(f"/v1/jobs/{job['id']}").status_code == 409
        h.assert_healthy()
        # `vmkeep backup cancel VM` of a backup the daemon runs: the job is cancelled, the
        # daemon itself is not signalled and keeps serving
        job = client.post(f"/v1/vms/{h.vm}/backup", json={"datastore": "ds"}).json()["job"]
        wait_job(client, job["id"], {"RUNNING"})
        out = h.run("backup", "cancel", h.vm, "--json").json()
        assert out["cancelled"] and out["job"] == job["id"] and out["pid"] == proc.pid, out
        end = wait_job(client, job["id"], {"DONE", "FAILED", "CANCELLED"})
        assert end["state"] == "CANCELLED" and proc.poll() is None, end
        assert client.get("/healthz").status_code == 200
    h.assert_healthy()
    h.backup_and_check()


def test_cli_backup_and_restore_run_as_the_daemons_jobs(harness: Harness) -> None:
    """With a daemon on its catalog, `vmkeep backup` and `vmkeep restore` hand it their action
    (a job over its socket) and follow it: same output as when they run it themselves; Ctrl-C
    of the command cancels the job and the daemon cleans up."""
    h = harness
    h.backup_and_check()  # in this process (no daemon): the output to compare with
    direct = h.backup("--reset").json()
    with daemon(h, {"VMKEEP_FAILPOINTS": "copy=sleep:3"}) as (proc, client):
        before = max(j["id"] for j in client.get("/v1/jobs").json())
        p = h.backup_and_check()  # backup and restore, each through the daemon
        ran = [j for j in client.get("/v1/jobs").json() if j["id"] > before]
        assert [(j["kind"], j["who"], j["state"]) for j in ran] == [
            ("restore", "@local", "DONE"),
            ("backup", "@local", "DONE"),
        ], ran
        assert ran[1]["result"]["id"] == p.backup and ran[1]["result"]["increment"] == p.increment
        res = h.backup("--reset").json()
        assert res["increment"] == 0 and set(res) == set(direct), (sorted(res), sorted(direct))
        assert set(res["increments"][0]) == set(direct["increments"][0])
        # the human line, as printed without a daemon
        line = h.run("backup", h.vm, "-d", "ds").out
        assert re.fullmatch(
            rf"backup {res['id']} increment 1 \(increment of 0\) of {h.vm}: VALID, \d+ bytes, "
            r"\S+, [\d.]+ s\n",
            line,
        ), line
        # a relative --path is the command's, not the daemon's working directory
        restored = subprocess.run(
            [*h.argv("restore", str(res["id"]), "--disk", "vda", "--path", "rel.qcow2")],
            cwd=h.work, env=h.env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert restored.returncode == 0 and (h.work / "rel.qcow2").stat().st_size > 0, restored
        (h.work / "rel.qcow2").unlink()
        # errors: the engine's message and exit code, through the daemon as without it
        for args in (("backup", "nope", "-d", "ds"), ("backup", h.vm, "-d", "nope")):
            via, own = h.run(*args, check=None), h.run(*args, check=None, extra=NO_DAEMON)
            assert (via.code, via.err) == (own.code, own.err) and via.code != 0, (via, own)
        # Ctrl-C of the command: the daemon's job is cancelled, the VM left as it was
        h.write()
        cli = subprocess.Popen(
            h.argv("backup", h.vm, "-d", "ds", "--json"),
            env=h.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=ctrl_c_as_at_a_terminal,
        )  # fmt: skip
        job = wait_for_running(client, before)
        cli.send_signal(signal.SIGINT)
        out, err = cli.communicate(timeout=120)
        assert cli.returncode == 130 and f"cancelling job {job['id']}" in err, (out, err)
        end = wait_job(client, job["id"], {"DONE", "FAILED", "CANCELLED"})
        assert end["state"] == "CANCELLED" and proc.poll() is None, end
        h.assert_healthy()
    h.backup_and_check()


NO_DAEMON = {"VMKEEP_NO_DAEMON": "1"}


def ctrl_c_as_at_a_terminal() -> None:
    """In the child before exec: SIGINT's default action, as a command typed at a terminal has.
    A test run started in the background by a shell (``cmd &``) ignores SIGINT, the child
    would inherit that, and Python keeps an ignored SIGINT ignored (it is the convention for
    background jobs): the Ctrl-C this test sends would be lost."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_log(h: Harness, line: str, timeout: float = 120) -> None:
    """Until the daemon (started by ``daemon``) wrote ``line`` to its stderr."""
    deadline = time.monotonic() + timeout
    while line not in h.stderr_file.read_text():
        assert time.monotonic() < deadline, f"the daemon never logged {line!r}"
        time.sleep(0.1)


def wait_for_running(client: httpx.Client, after: int, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        running = [j for j in client.get("/v1/jobs", params={"state": "RUNNING"}).json()]
        if any(j["id"] > after for j in running):
            return next(j for j in running if j["id"] > after)
        assert time.monotonic() < deadline, "no job started"
        time.sleep(0.1)


def test_sigkill_of_the_daemon_mid_backup(harness: Harness) -> None:
    h = harness
    with daemon(h, {"VMKEEP_FAILPOINTS": "copy=sleep:6"}) as (proc, client):
        h.write()
        job = client.post(f"/v1/vms/{h.vm}/backup", json={"datastore": "ds"}).json()["job"]
        wait_job(client, job["id"], {"RUNNING"})
        wait_log(h, "fail point copy: sleep:6")  # in the copy, for 6 s: killed there
        proc.kill()
        proc.wait()
    h.wait_recovered()  # the guard alone: guest thawed, attempt cleaned up
    with daemon(h) as (_proc, client):
        failed = client.get(f"/v1/jobs/{job['id']}").json()
        assert failed["state"] == "FAILED" and "daemon restarted" in failed["error"]["message"]
        h.assert_healthy()
        h.write()
        nxt = client.post(f"/v1/vms/{h.vm}/backup", json={"datastore": "ds"}).json()["job"]
        done = wait_job(client, nxt["id"], {"DONE", "FAILED"})
        assert done["state"] == "DONE", done
        p = h.record(Result(0, json.dumps(done["result"]), ""))
        h.restore_matches(p)
    h.assert_healthy()


def test_monitor_loop_polls_the_vm_through_the_vmm_driver(harness: Harness) -> None:
    """The daemon's monitor thread polls every ``[monitor] interval`` s: the VM's usage figures
    (the seed's poll record) appear in GET /v1/vms/{vm} and are refreshed."""
    h = harness
    with daemon(h, extra={"VMKEEP_MONITOR_INTERVAL": "1"}) as (_proc, client):
        seen: list[str] = []
        deadline = time.monotonic() + 60
        while len(set(seen)) < 2:
            usage = client.get(f"/v1/vms/{h.vm}").json()["usage"]
            if "polled_at" in usage:
                seen.append(usage["polled_at"])
                assert usage["MEMORY"] > 0 and "CPU" in usage and "DISKWRBYTES" in usage, usage
            assert time.monotonic() < deadline, f"no two polls within 60 s: {seen}"
            time.sleep(0.5)
        row = client.get(f"/v1/vms/{h.vm}").json()
        assert (row["state"], row["lcm_state"]) == ("ACTIVE", "RUNNING")
        metrics = client.get("/metrics").text
        assert f'vmkeep_vm_usage{{key="MEMORY",vm="{h.vm}"}}' in metrics
    h.assert_healthy()
