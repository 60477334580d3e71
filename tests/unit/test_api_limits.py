"""The API's limits (issue 23, "Limits") on the real app and a real SQLite catalog: the body
bound before any byte is read, the token check before the body, the per-token bound on waits and
event streams (and their end when the token is revoked), queued jobs per token, files requests
sharing the workers' slots, no SQL in errors, the audit log. The daemon-level cases (a real
uvicorn, a 200 MB body, RSS, /healthz under 45 waits) are in tests/faults/test_limits.py."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import text

from vmkeep.api import stream_routes
from vmkeep.api.app import create_app
from vmkeep.catalog.tables import Token
from vmkeep.cli.main import cli
from vmkeep.config import load_config
from vmkeep.engine.core import jobs
from vmkeep.engine.core.context import Context
from vmkeep.engine.service import audit, runners, tokens
from vmkeep.engine.service.workers import WorkSlots
from vmkeep.errors import CatalogError, TooManyRequests
from vmkeep.model import JobState

ROLES = ("viewer", "operator", "admin")


@pytest.fixture
def env(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Context, dict[str, str]]:
    monkeypatch.setenv("VMKEEP_API_MAX_BODY_BYTES", "4096")
    monkeypatch.setenv("VMKEEP_API_MAX_STREAMS_PER_TOKEN", "2")
    ctx = Context(load_config())
    secrets = {r: tokens.create(ctx, f"t-{r}", r)["token"] for r in ROLES}
    return ctx, secrets


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def asgi_call(app: Any, method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
    """One request straight through the ASGI app: the status it answers and whether the app
    asked for any of the body (``receive``)."""
    read: list[int] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        read.append(len(body))
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": raw,
        "client": ("203.0.113.9", 40000),
        "server": ("127.0.0.1", 8700),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(payload or b"null"), bool(read)


# --- request bodies ------------------------------------------------------------------------------
def test_a_body_over_the_declared_limit_is_413_before_it_is_read(
    env: tuple[Context, dict[str, str]],
) -> None:
    ctx, secrets = env
    app = create_app(ctx.config)
    big = b"x" * 5000
    headers = auth(secrets["admin"]) | {
        "content-length": "5000",
        "content-type": "application/json",
    }
    status, data, read = asgi_call(app, "POST", "/v1/datastores", headers, big)
    assert status == 413 and not read
    assert data["error"]["code"] == "RequestTooLarge"
    assert "[api] max_body_bytes" in data["error"]["message"]


def test_a_streamed_body_is_counted_and_refused_past_the_limit(
    env: tuple[Context, dict[str, str]],
) -> None:
    ctx, secrets = env
    client = TestClient(create_app(ctx.config))

    def chunks() -> Any:
        yield b'{"name": "ds", "options": {"path": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}}'

    r = client.post(
        "/v1/datastores",
        content=chunks(),
        headers=auth(secrets["admin"]) | {"content-type": "application/json"},
    )
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "RequestTooLarge"
    # under the limit it is read and parsed as before
    small = client.post("/v1/datastores", json={"name": "d"}, headers=auth(secrets["admin"]))
    assert small.status_code != 413


def test_a_body_without_a_valid_token_is_401_before_it_is_read(
    env: tuple[Context, dict[str, str]],
) -> None:
    ctx, secrets = env
    app = create_app(ctx.config)
    body = json.dumps({"datastore": "d"}).encode()
    base = {"content-length": str(len(body)), "content-type": "application/json"}
    for headers in (base, base | auth("vmk_wrong")):
        status, data, read = asgi_call(app, "POST", "/v1/vms/web/backup", headers, body)
        assert status == 401 and data["error"]["code"] == "Unauthorized"
        assert not read, "the body was read before the token was checked"
    # a valid token: the body is read, and the route's own check still applies (viewer: 403)
    status, _data, read = asgi_call(
        app, "POST", "/v1/vms/web/backup", base | auth(secrets["viewer"]), body
    )
    assert status == 403 and read


# --- waits and event streams ---------------------------------------------------------------------
def _queued_job(ctx: Context) -> int:
    return int(jobs.enqueue(ctx, "verify", "1", {"backup": 1}, "api", "someone")["id"])


async def _gather(app: Any, calls: list[tuple[str, dict[str, str]]]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c:
        return list(await asyncio.gather(*(c.get(url, headers=h) for url, h in calls)))


def test_waits_are_bounded_per_token_and_hold_no_thread(
    env: tuple[Context, dict[str, str]],
) -> None:
    ctx, secrets = env
    job = _queued_job(ctx)
    app = create_app(ctx.config)
    viewer, admin = auth(secrets["viewer"]), auth(secrets["admin"])
    calls = [(f"/v1/jobs/{job}?wait=1.5", viewer)] * 5 + [(f"/v1/jobs/{job}?wait=1.5", admin)]
    start = time.monotonic()
    answers = asyncio.run(_gather(app, calls))
    statuses = sorted(r.status_code for r in answers[:5])
    assert statuses == [200, 200, 429, 429, 429], [r.text for r in answers]
    refused = next(r for r in answers if r.status_code == 429).json()["error"]
    assert refused["code"] == "TooManyRequests"
    assert "t-viewer" in refused["message"] and "[api] max_streams_per_token" in refused["message"]
    assert answers[5].status_code == 200  # another token has its own slots
    assert time.monotonic() - start < 10
    # the slots were given back: the next waits are served
    again = asyncio.run(_gather(app, [(f"/v1/jobs/{job}?wait=0.2", viewer)] * 2))
    assert [r.status_code for r in again] == [200, 200]


def test_a_wait_and_a_stream_end_when_the_token_is_revoked(
    env: tuple[Context, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx, secrets = env
    monkeypatch.setattr(stream_routes, "TOKEN_RECHECK", 0.2)
    monkeypatch.setattr(stream_routes, "EVENT_POLL", 0.05)
    job = _queued_job(ctx)
    app = create_app(ctx.config)
    viewer = auth(secrets["viewer"])

    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c:
            wait = asyncio.create_task(c.get(f"/v1/jobs/{job}?wait=20", headers=viewer))
            stream = asyncio.create_task(c.get("/v1/events", headers=viewer))
            await asyncio.sleep(0.5)
            await asyncio.to_thread(tokens.revoke, ctx, "t-viewer")
            return list(await asyncio.wait_for(asyncio.gather(wait, stream), 10))

    start = time.monotonic()
    wait, stream = asyncio.run(scenario())
    assert time.monotonic() - start < 5
    assert wait.status_code == 401, wait.text
    assert stream.status_code == 200
    assert "event: job" in stream.text  # it streamed, then ended
    assert stream.text.rstrip().endswith('data: {"reason": "token revoked"}')


def test_a_stream_gives_its_slot_back() -> None:
    from vmkeep.api.limits import StreamSlots
    from vmkeep.engine.core.trust import Actor

    slots = StreamSlots(1)
    who = Actor("t", "viewer")
    release = slots.take(who)
    with pytest.raises(TooManyRequests):
        slots.take(who)
    release()
    release()  # idempotent: the slot is given back once
    with slots.holding(who):
        assert slots.held == {"t": 1}
    assert slots.held == {}
    assert slots.take(who, exempt=True) and slots.held == {}  # the local admin


# --- queued jobs per token -----------------------------------------------------------------------
def test_queued_jobs_are_bounded_per_token(env: tuple[Context, dict[str, str]]) -> None:
    ctx, _ = env
    for _ in range(3):
        jobs.enqueue(ctx, "verify", "1", {}, "api", "ops", max_queued=3)
    with pytest.raises(TooManyRequests, match=r"queued jobs for token 'ops': 3 at most \(\[api\] max_queued_per_token\)"):  # fmt: skip
        jobs.enqueue(ctx, "verify", "1", {}, "api", "ops", max_queued=3)
    jobs.enqueue(ctx, "verify", "1", {}, "api", "other", max_queued=3)  # another token
    jobs.enqueue(ctx, "verify", "1", {}, "api", "ops")  # no bound given (the local admin)
    first = jobs.list_jobs(ctx, JobState.QUEUED)[-1]["id"]
    jobs.cancel(ctx, first)  # an ended job no longer counts
    while jobs.claim(ctx) not in (None,):  # running jobs do not count either
        pass
    jobs.enqueue(ctx, "verify", "1", {}, "api", "ops", max_queued=1)


def test_the_api_passes_the_queue_bound(
    env: tuple[Context, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx, secrets = env
    seen: list[int | None] = []

    def enqueue(*args: Any, **_job: Any) -> dict[str, Any]:
        seen.append(args[6] if len(args) > 6 else None)
        raise TooManyRequests("queued jobs", args[5], 50, "[api] max_queued_per_token")

    monkeypatch.setattr(jobs, "enqueue", enqueue)
    monkeypatch.setattr(runners.inventory, "check_action", lambda _c, vm, _a: vm)
    monkeypatch.setattr(runners.stores, "check_exists", lambda _c, _d: None)
    client = TestClient(create_app(ctx.config))
    r = client.post(
        "/v1/vms/web/backup", json={"datastore": "d"}, headers=auth(secrets["operator"])
    )
    assert r.status_code == 429, r.text
    assert "[api] max_queued_per_token" in r.json()["error"]["message"]
    assert seen == [ctx.config.api.max_queued_per_token]


# --- files requests and the workers' slots -------------------------------------------------------
def test_files_requests_hold_a_work_slot(
    env: tuple[Context, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx, secrets = env
    monkeypatch.setattr(stream_routes, "FILES_WAIT", 0.3)
    slots = WorkSlots(1)
    client = TestClient(create_app(ctx.config, slots=slots))
    h = auth(secrets["operator"])
    assert slots.acquire(0)  # a job runs: every slot is taken
    for path in ("/v1/backups/7/files", "/v1/backups/7/files/content?path=/etc/hosts"):
        r = client.get(path, headers=h)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "WorkersBusy"
        assert "[jobs] workers" in r.json()["error"]["message"]
    assert client.get("/v1/backups/7/files", headers=auth("vmk_bad")).status_code == 401
    slots.release()
    # refused requests (bad parameters, no token) never keep a slot (a schemathesis run found
    # every slot taken by 422s when the slot was a dependency of the route)
    for bad in ("/v1/backups/7/files?partition=0", "/v1/backups/7/files/content?path="):
        assert client.get(bad, headers=h).status_code == 422
    assert client.get("/v1/backups/0/files", headers=h).status_code == 422
    for path in ("/v1/backups/7/files", "/v1/backups/7/files/content?path=/etc/hosts"):
        assert client.get(path, headers=h).status_code == 404  # served (no such backup)
        assert slots.acquire(0), "the request kept its slot"
        slots.release()


def test_a_daemon_worker_runs_a_job_only_with_a_free_slot(
    env: tuple[Context, dict[str, str]],
) -> None:
    from vmkeep.api.daemon import _worker

    ctx, _ = env
    slots = WorkSlots(1)
    assert slots.acquire(0)  # a files request holds the only slot
    job = jobs.enqueue(ctx, "no-such-kind", "x", {}, "api", "ops")["id"]
    stop = threading.Event()
    worker = threading.Thread(target=_worker, args=(ctx.config, stop, slots), daemon=True)
    worker.start()
    try:
        time.sleep(0.8)
        assert jobs.get(ctx, job)["state"] == JobState.QUEUED
        slots.release()
        deadline = time.monotonic() + 10
        while jobs.get(ctx, job)["state"] not in jobs.FINAL:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        stop.set()
        jobs.WAKE.set()
        worker.join(5)
    assert slots.acquire(0), "the worker kept its slot after the job"


# --- no SQL in errors ----------------------------------------------------------------------------
def test_a_catalog_error_carries_no_sql_and_no_parameters(
    env: tuple[Context, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx, secrets = env
    with pytest.raises(CatalogError) as caught, ctx.catalog.session() as s:
        s.add(Token(name="t-viewer", role="viewer", digest="sekrit-digest-value"))
    message = str(caught.value)
    assert "UNIQUE constraint failed" in message
    for leak in ("INSERT", "[SQL", "[parameters", "sekrit", "sqlalche.me"):
        assert leak not in message, message

    def failing(c: Context, *_args: Any) -> Any:  # list_jobs(ctx, state, limit, after)
        with c.catalog.session() as s:
            s.execute(text("SELECT * FROM no_such_table WHERE x = :p"), {"p": "hunter2"})

    monkeypatch.setattr(jobs, "list_jobs", failing)
    r = TestClient(create_app(ctx.config)).get("/v1/jobs", headers=auth(secrets["viewer"]))
    assert r.status_code == 500 and r.json()["error"]["code"] == "CatalogError"
    assert "no such table" in r.text
    for leak in ("SELECT", "hunter2", "[SQL", "[parameters"):
        assert leak not in r.text, r.text


# --- the audit log -------------------------------------------------------------------------------
def test_mutating_requests_and_failed_logins_are_audited(
    env: tuple[Context, dict[str, str]], tmp_path: Path
) -> None:
    ctx, secrets = env
    client = TestClient(create_app(ctx.config))
    admin = auth(secrets["admin"])
    body = {"name": "ds", "options": {"path": str(tmp_path), "password": "pw-in-body"}}
    client.post("/v1/datastores", json=body, headers=admin)
    client.post("/v1/vms/web/reset-state", headers=auth(secrets["operator"]))  # 403
    client.get("/v1/jobs", headers=auth("vmk_not-a-token"))  # a failed login (GET)
    client.post("/v1/vms/web/backup", json={"datastore": "d"})  # no token: 401 before the body
    client.get("/v1/jobs", headers=admin)  # a read: not audited
    client.post("/v1/datastores", content=b"z" * 5000, headers=admin)  # 413
    rows = audit.list_entries(ctx)
    got = [(e["actor"], e["role"], e["method"], e["path"], e["status"]) for e in rows]
    assert got == [
        ("-", "-", "POST", "/v1/datastores", 413),
        ("-", "-", "POST", "/v1/vms/web/backup", 401),
        ("-", "-", "GET", "/v1/jobs", 401),
        ("t-operator", "operator", "POST", "/v1/vms/web/reset-state", 403),
        ("t-admin", "admin", "POST", "/v1/datastores", rows[-1]["status"]),
    ]
    assert rows[-1]["status"] in (201, 422, 502)
    assert all(e["client"] == "testclient:50000" for e in rows)
    dumped = json.dumps([{k: str(v) for k, v in e.items()} for e in rows])
    for secret in (*secrets.values(), "pw-in-body", "vmk_not-a-token", "Bearer"):
        assert secret not in dumped

    # admins read it; a viewer or an operator may not
    assert client.get("/v1/audit", headers=auth(secrets["operator"])).status_code == 403
    listed = client.get("/v1/audit?limit=2", headers=admin)
    assert listed.status_code == 200
    assert [e["status"] for e in listed.json()] == [413, 401]  # a read's 403 is not audited
    assert audit.wanted("DELETE", 200) and audit.wanted("GET", 401)
    assert not audit.wanted("GET", 200) and not audit.wanted("GET", 403)


def test_audit_list_command(env: tuple[Context, dict[str, str]]) -> None:
    ctx, _ = env
    audit.record(
        ctx, actor="ops", role="operator", method="POST", path="/v1/x", status=202, client="c:1"
    )
    audit.record(ctx, actor="", role="", method="GET", path="/v1/y", status=401, client="c:2")
    runner = CliRunner()
    out = runner.invoke(cli, ["audit", "list", "--json", "--limit", "1"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert [(r["actor"], r["path"], r["status"]) for r in rows] == [("-", "/v1/y", 401)]
    out = runner.invoke(cli, ["audit", "list"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split() == ["AT", "ACTOR", "ROLE", "METHOD", "PATH", "STATUS", "CLIENT"]
    assert "ops" in lines[2] and "202" in lines[2] and "c:1" in lines[2]


def test_files_requests_leave_one_work_slot_for_jobs() -> None:
    """Two slow downloads must not keep the daemon's two workers from claiming a backup."""
    slots = WorkSlots(2)
    assert slots.acquire_files()
    assert not slots.acquire_files()  # the second slot stays for jobs
    assert slots.acquire(0)  # a worker claims a job
    slots.release()
    slots.release_files()
    assert slots.acquire_files() and slots.acquire(0)
