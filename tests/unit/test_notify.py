"""Notifications of finished jobs (engine/service/notify.py) against real components: a real HTTP
server on loopback that records what it gets, real jobs run through jobs.execute on a real SQLite
catalog, apprise's own json:// plugin; time is advanced by passing ``now``, never by sleeping."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import select

from vmkeep.api.app import create_app
from vmkeep.catalog.tables import Backup, BackupJob, BackupJobRun, Datastore, Notification, Vm
from vmkeep.cli.main import cli
from vmkeep.config import CatalogConfig, load_config
from vmkeep.engine.core import jobs
from vmkeep.engine.core.context import Context
from vmkeep.engine.service import notify, tokens
from vmkeep.engine.service.notify_send import redact, scrub, url_name
from vmkeep.errors import BackupFailed, NotificationFailed

TOKEN = "T0KEN-in-the-path-9f8e7d6c"  # a Slack-style hook's token, part of the URL
SECRET = "hmac-secret-5b4a39"  # [notify] webhook_secret
PASSWORD = "pa55-word-71c2"  # in an apprise URL


class Receiver:
    """A real HTTP server on 127.0.0.1 that records each request and answers from ``codes``
    (then 200)."""

    def __init__(self, codes: list[int] | None = None, delay: float = 0.0) -> None:
        self.codes = list(codes or [])
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                threading.Event().wait(delay)  # a slow receiver: senders overlap
                with receiver.lock:
                    receiver.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body}
                    )
                    code = receiver.codes.pop(0) if receiver.codes else 200
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"no" if code >= 300 else b"ok")

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = f"/hooks/{TOKEN}") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(codes: list[int] | None = None, delay: float = 0.0) -> Receiver:
        made.append(Receiver(codes, delay))
        return made[-1]

    yield make
    for r in made:
        r.close()


def context(clean_env: Path, notify_toml: str = "", **env: str) -> Context:
    """A Context over the test's SQLite catalog with ``[notify]`` from the config file and the
    environment (``VMKEEP_NOTIFY_*``)."""
    config = clean_env.parent / "home" / "config.toml"
    config.write_text(f"version = 1\n[notify]\n{notify_toml}\n")
    import os

    return Context(load_config(environ={**os.environ, **env}))


def webhook_ctx(clean_env: Path, url: str, toml: str = "", secret: bool = True) -> Context:
    env = {"VMKEEP_NOTIFY_WEBHOOK_URL": url}
    if secret:
        env["VMKEEP_NOTIFY_WEBHOOK_SECRET"] = SECRET
    return context(clean_env, toml, **env)


def finished_job(
    ctx: Context,
    kind: str = "backup",
    target: str = "web1",
    fail: bool = False,
    warnings: list[str] | None = None,
    run_id: int | None = None,
) -> dict[str, Any]:
    """A job queued, claimed and run to its end by the real job queue (a runner that succeeds,
    with ``warnings``, or raises BackupFailed)."""

    def runner(_ctx: Context, _params: dict[str, Any], _progress: Any) -> Any:
        if fail:
            raise BackupFailed(target, "no space left on the datastore")
        return {"backup": 7}, list(warnings or [])

    queued = jobs.enqueue(ctx, kind, target, {"vm": target}, "api", "alice")
    if run_id is not None:
        from vmkeep.catalog.tables import Job

        with ctx.catalog.session() as s:
            row = s.get(Job, queued["id"])
            assert row is not None
            row.run_id = run_id
    assert jobs.claim(ctx) == queued["id"]
    return jobs.execute(ctx, queued["id"], {kind: runner})


def rows(ctx: Context) -> list[Notification]:
    with ctx.catalog.session() as s:
        return list(s.execute(select(Notification).order_by(Notification.id)).scalars())


def test_a_failed_backup_is_posted_signed_with_its_backup_job(
    clean_env: Path, receiver: Callable[..., Receiver]
) -> None:
    rx = receiver()
    ctx = webhook_ctx(clean_env, rx.url())
    with ctx.catalog.session() as s:
        bj = BackupJob(name="nightly", datastore="local", schedule="0 2 * * *")
        s.add(bj)
        s.flush()
        run = BackupJobRun(backup_job_id=bj.id, slot_at=datetime.now(UTC), origin="schedule",
                           state="FIRED")  # fmt: skip
        s.add(run)
        s.flush()
        run_id = run.id
    job = finished_job(ctx, fail=True, run_id=run_id)
    assert job["state"] == "FAILED"

    assert notify.job_ended(ctx, job) == 1
    assert [r.state for r in rows(ctx)] == ["PENDING"]
    assert rx.requests == []  # job_ended only writes the row
    assert notify.deliver_due(ctx) == 1

    (req,) = rx.requests
    assert req["path"] == f"/hooks/{TOKEN}"
    assert req["headers"]["Content-Type"] == "application/json"
    expected = "sha256=" + hmac.new(SECRET.encode(), req["body"], hashlib.sha256).hexdigest()
    assert req["headers"]["X-Vmkeep-Signature"] == expected
    sent = json.loads(req["body"])
    assert sent["event"] == "job.finished"
    assert sent["status"] == "failed"
    assert (sent["job"], sent["kind"], sent["target"], sent["vm"]) == (job["id"], "backup",
                                                                      "web1", "web1")  # fmt: skip
    assert (sent["backupjob"], sent["run"]) == ("nightly", run_id)
    assert sent["error"] == {"code": "BackupFailed", "message": job["error"]["message"]}
    assert "no space left" in sent["error"]["message"]
    assert sent["warnings"] == []
    assert isinstance(sent["duration_s"], float) and sent["duration_s"] >= 0
    assert datetime.fromisoformat(sent["finished"]) >= datetime.fromisoformat(sent["started"])
    assert sent["host"] == job["host"]
    (row,) = rows(ctx)
    assert (row.state, row.attempts, row.error) == ("SENT", 1, None)
    assert row.sent_at is not None


def test_warnings_are_reported_and_no_signature_without_a_secret(
    clean_env: Path, receiver: Callable[..., Receiver]
) -> None:
    rx = receiver()
    ctx = webhook_ctx(clean_env, rx.url(), secret=False)
    job = finished_job(ctx, warnings=["the guest agent did not answer: crash-consistent"])
    assert notify.job_ended(ctx, job) == 1
    assert notify.deliver_due(ctx) == 1
    (req,) = rx.requests
    assert "X-Vmkeep-Signature" not in req["headers"]
    sent = json.loads(req["body"])
    assert sent["status"] == "warnings"
    assert sent["warnings"] == ["the guest agent did not answer: crash-consistent"]
    assert (sent["error"], sent["backupjob"], sent["run"]) == (None, None, None)


def test_a_verify_names_the_vm_of_its_backup(
    clean_env: Path, receiver: Callable[..., Receiver]
) -> None:
    rx = receiver()
    ctx = webhook_ctx(clean_env, rx.url())
    with ctx.catalog.session() as s:
        vm = Vm(name="db1", uuid="0f6c3f1e-1111-4a4a-9b9b-000000000001", host_uri="test:///",
                state="ACTIVE", lcm_state="RUNNING")  # fmt: skip
        store = Datastore(name="local", driver="dir", options={})
        s.add_all([vm, store])
        s.flush()
        backup = Backup(vm_id=vm.id, datastore_id=store.id, chain="db1/1", mode="full",
                        status="VALID")  # fmt: skip
        s.add(backup)
        s.flush()
        backup_id = backup.id
    assert notify.job_ended(ctx, finished_job(ctx, kind="verify", target=str(backup_id))) == 1
    assert notify.deliver_due(ctx) == 1
    sent = json.loads(rx.requests[0]["body"])
    assert (sent["kind"], sent["target"], sent["vm"]) == ("verify", str(backup_id), "db1")


def test_a_500_is_retried_with_back_off_until_it_is_sent(
    clean_env: Path, receiver: Callable[..., Receiver]
) -> None:
    rx = receiver([500, 500])
    ctx = webhook_ctx(clean_env, rx.url(), "retry_after = 5\nmax_attempts = 4\n")
    notify.job_ended(ctx, finished_job(ctx, fail=True))
    t0 = datetime.now(UTC)

    assert notify.deliver_due(ctx, t0) == 0
    (row,) = rows(ctx)
    assert (row.state, row.attempts) == ("PENDING", 1)
    assert row.next_at == t0 + timedelta(seconds=5)
    assert row.error is not None and "HTTP 500" in row.error

    assert notify.deliver_due(ctx, t0 + timedelta(seconds=4)) == 0  # not due yet
    assert len(rx.requests) == 1
    assert notify.deliver_due(ctx, t0 + timedelta(seconds=5)) == 0
    (row,) = rows(ctx)
    assert row.attempts == 2
    assert row.next_at == t0 + timedelta(seconds=5 + 10)  # doubled

    assert notify.deliver_due(ctx, t0 + timedelta(seconds=14)) == 0
    assert len(rx.requests) == 2
    assert notify.deliver_due(ctx, t0 + timedelta(seconds=15)) == 1
    (row,) = rows(ctx)
    assert (row.state, row.attempts, row.error) == ("SENT", 3, None)
    assert len(rx.requests) == 3
    assert len({r["body"] for r in rx.requests}) == 1  # the same payload each time


def test_a_target_that_never_works_fails_after_max_attempts(
    clean_env: Path, receiver: Callable[..., Receiver], caplog: pytest.LogCaptureFixture
) -> None:
    rx = receiver()
    dead = rx.url()
    rx.close()  # nobody listens there any more: every attempt is refused
    ctx = webhook_ctx(clean_env, dead, "retry_after = 1\nmax_attempts = 3\n")
    notify.job_ended(ctx, finished_job(ctx))
    now = datetime.now(UTC)
    for _ in range(5):
        assert notify.deliver_due(ctx, now) == 0  # never raises
        now += timedelta(hours=2)
    (row,) = rows(ctx)
    assert (row.state, row.attempts) == ("FAILED", 3)
    assert row.error is not None and "ConnectError" in row.error
    failed = [r for r in caplog.records if "FAILED after 3 attempts" in r.getMessage()]
    assert failed and failed[0].levelno == logging.WARNING


def test_the_retry_delay_doubles_up_to_an_hour(clean_env: Path) -> None:
    cfg = context(clean_env, "retry_after = 5\n").config.notify
    assert [notify.retry_delay(cfg, n) for n in (1, 2, 3, 4)] == [5, 10, 20, 40]
    assert notify.retry_delay(cfg, 30) == notify.MAX_DELAY == 3600


def test_unreported_kinds_and_on_failure(
    clean_env: Path, receiver: Callable[..., Receiver]
) -> None:
    rx = receiver()
    ctx = webhook_ctx(clean_env, rx.url())
    assert notify.job_ended(ctx, finished_job(ctx, kind="quiesce")) == 0
    assert notify.job_ended(ctx, finished_job(ctx, kind="quiesce", run_id=9)) == 1  # in a run
    assert notify.job_ended(ctx, finished_job(ctx)) == 1

    only_failures = webhook_ctx(clean_env, rx.url(), 'on = "failure"\n')
    assert notify.job_ended(only_failures, finished_job(only_failures)) == 0
    warned = finished_job(only_failures, warnings=["crash-consistent"])
    assert notify.job_ended(only_failures, warned) == 0
    assert notify.job_ended(only_failures, finished_job(only_failures, fail=True)) == 1
    assert len(rows(ctx)) == 3

    running = jobs.get(ctx, jobs.enqueue(ctx, "backup", "web1", {}, "api", "alice")["id"])
    assert notify.job_ended(ctx, running) == 0  # not finished: nothing to report


def test_no_target_writes_nothing(clean_env: Path) -> None:
    ctx = context(clean_env)
    assert notify.job_ended(ctx, finished_job(ctx, fail=True)) == 0
    assert rows(ctx) == []


def test_job_ended_never_raises(clean_env: Path, receiver: Callable[..., Receiver]) -> None:
    ctx = webhook_ctx(clean_env, receiver().url())
    job = finished_job(ctx)
    assert notify.job_ended(ctx, {**job, "id": "not a number"}) == 0
    nowhere = CatalogConfig(url="sqlite:////proc/no-such-folder/catalog.db")  # cannot open
    broken = Context(ctx.config.model_copy(update={"catalog": nowhere}))
    assert notify.job_ended(broken, job) == 0
    assert notify.deliver_due(broken) == 0


def test_an_apprise_url_is_delivered_and_its_password_never_shows(
    clean_env: Path, receiver: Callable[..., Receiver], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every library's log, as a daemon with -vv writes it
    rx, bad = receiver(), receiver([500] * 10)
    urls = [
        f"json://alice:{PASSWORD}@127.0.0.1:{rx.port}/apprise/{TOKEN}",
        f"json://alice:{PASSWORD}@127.0.0.1:{bad.port}/apprise/{TOKEN}",
    ]
    ctx = webhook_ctx(
        clean_env, rx.url(), "max_attempts = 1\nurls = [" + ", ".join(f'"{u}"' for u in urls) + "]"
    )
    assert notify.job_ended(ctx, finished_job(ctx, fail=True)) == 3
    assert notify.deliver_due(ctx) == 2

    got = {r["path"]: json.loads(r["body"]) for r in rx.requests}
    assert set(got) == {f"/hooks/{TOKEN}", f"/apprise/{TOKEN}"}
    message = got[f"/apprise/{TOKEN}"]
    assert message["title"] == "vmkeep: backup of web1 failed"
    assert message["message"].startswith("vmkeep: backup of web1 failed: Backup of VM 'web1'")
    assert message["type"] == "failure"
    by_target = {r.target: r for r in rows(ctx)}
    url0, url1 = (url_name(u.get_secret_value()) for u in ctx.config.notify.urls)
    assert [by_target[t].state for t in ("webhook", url0, url1)] == ["SENT", "SENT", "FAILED"]
    assert by_target[url1].error and "json://…@127.0.0.1" in by_target[url1].error

    stored = json.dumps([[r.target, r.payload, r.error] for r in rows(ctx)])
    listed = json.dumps(notify.list_rows(ctx), default=str)
    for text in (caplog.text, stored, listed):
        for secret in (TOKEN, PASSWORD, SECRET):
            assert secret not in text
    assert "127.0.0.1" in caplog.text  # the logs were there, redacted


def test_concurrent_senders_send_each_row_once(
    clean_env: Path, receiver: Callable[..., Receiver]
) -> None:
    rx = receiver(delay=0.05)
    ctx = webhook_ctx(clean_env, rx.url())
    for _ in range(12):
        notify.job_ended(ctx, finished_job(ctx))
    other = Context(ctx.config)  # a second daemon: its own engine on the same catalog file
    counts: list[int] = []
    start = threading.Barrier(2)

    def sender(c: Context) -> None:
        start.wait()
        counts.append(notify.deliver_due(c))

    threads = [threading.Thread(target=sender, args=(c,)) for c in (ctx, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(counts) == 12
    assert min(counts) > 0  # both sent: they really competed for the same due rows
    assert len(rx.requests) == 12
    assert len({json.loads(r["body"])["job"] for r in rx.requests}) == 12
    assert {(r.state, r.attempts) for r in rows(ctx)} == {("SENT", 1)}


def test_a_claimed_row_is_not_sent_again(
    clean_env: Path, receiver: Callable[..., Receiver]
) -> None:
    rx = receiver()
    ctx = webhook_ctx(clean_env, rx.url())
    notify.job_ended(ctx, finished_job(ctx))
    (row,) = rows(ctx)
    now = datetime.now(UTC)
    assert notify._claim(ctx, row.id, 0, now) is not None
    assert notify._claim(ctx, row.id, 0, now) is None  # the attempts moved on: someone has it
    assert notify.deliver_due(ctx, now) == 0  # leased: not due
    assert rx.requests == []


def test_the_loop_sends_when_woken(clean_env: Path, receiver: Callable[..., Receiver]) -> None:
    rx = receiver()
    ctx = webhook_ctx(clean_env, rx.url())
    stop, wake = threading.Event(), threading.Event()
    t = threading.Thread(target=notify.loop, args=(ctx.config, stop, wake), daemon=True)
    t.start()
    try:
        notify.job_ended(ctx, finished_job(ctx))
        wake.set()
        for _ in range(100):
            if rows(ctx)[0].state == "SENT":
                break
            stop.wait(0.05)
        assert rows(ctx)[0].state == "SENT"
    finally:
        stop.set()
        wake.set()
        t.join(timeout=5)
    assert not t.is_alive()


def test_the_loop_survives_a_catalog_it_cannot_open(
    clean_env: Path, caplog: pytest.LogCaptureFixture
) -> None:
    nowhere = CatalogConfig(url="sqlite:////proc/no-such-folder/catalog.db")
    config = load_config().model_copy(update={"catalog": nowhere})
    stop, wake = threading.Event(), threading.Event()
    t = threading.Thread(target=notify.loop, args=(config, stop, wake), daemon=True)
    t.start()
    try:
        for _ in range(100):
            if len([r for r in caplog.records if "outbox" in r.getMessage()]) >= 2:
                break
            wake.set()
            stop.wait(0.05)
        assert len([r for r in caplog.records if "cannot read the outbox" in r.getMessage()]) >= 2
        assert t.is_alive()  # it went on after each error
    finally:
        stop.set()
        wake.set()
        t.join(timeout=5)
    assert not t.is_alive()


def test_redact() -> None:
    assert redact(f"https://hooks.example.com/services/{TOKEN}") == "https://hooks.example.com/…"
    assert redact(f"mailto://bob:{PASSWORD}@smtp.example.com") == "mailto://…@smtp.example.com"
    assert redact("json://127.0.0.1:8080/x?token=abc") == "json://127.0.0.1:8080/…"
    assert redact("slack://TokenA/TokenB/TokenC/#general") == "slack://…/…"
    assert redact("tgram://123456:ABCDEF/987") == "tgram://…"
    assert redact("https://example.com") == "https://example.com"
    said = f"error at https://hooks.example.com/services/{TOKEN}?x=1 (retry)"
    assert scrub(said) == "error at https://hooks.example.com/… (retry)"


def test_the_cli_tests_and_lists_targets(
    clean_env: Path, receiver: Callable[..., Receiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMKEEP_NO_DAEMON", "1")
    rx = receiver()
    runner = CliRunner()

    r = runner.invoke(cli, ["notify", "test"])
    assert r.exit_code != 0
    assert "VMKEEP_NOTIFY_WEBHOOK_URL" in str(r.exception) and "[notify] webhook_url" in str(
        r.exception
    )

    monkeypatch.setenv("VMKEEP_NOTIFY_WEBHOOK_URL", rx.url())
    monkeypatch.setenv("VMKEEP_NOTIFY_WEBHOOK_SECRET", SECRET)
    r = runner.invoke(cli, ["notify", "test", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == {
        "targets": [
            {"target": "webhook", "to": f"http://127.0.0.1:{rx.port}/…", "ok": True, "error": None}
        ]  # fmt: skip
    }
    assert json.loads(rx.requests[0]["body"])["event"] == "notify.test"

    bad = receiver([503])
    monkeypatch.setenv("VMKEEP_NOTIFY_WEBHOOK_URL", bad.url())
    r = runner.invoke(cli, ["notify", "test"])
    assert isinstance(r.exception, NotificationFailed)
    assert r.exception.exit_code == 30
    assert "HTTP 503" in r.output and TOKEN not in r.output + str(r.exception)

    ctx = Context(load_config())
    notify.job_ended(ctx, finished_job(ctx, fail=True))
    r = runner.invoke(cli, ["notify", "list", "--state", "pending", "--json"])
    assert r.exit_code == 0, r.output
    (listed,) = json.loads(r.output)
    assert (listed["target"], listed["state"], listed["attempts"]) == ("webhook", "PENDING", 0)
    assert listed["to"] == f"http://127.0.0.1:{bad.port}/…"
    r = runner.invoke(cli, ["notify", "list"])
    assert "PENDING" in r.output and TOKEN not in r.output


def test_the_api_lists_notifications_to_viewers(
    clean_env: Path, receiver: Callable[..., Receiver]
) -> None:
    ctx = webhook_ctx(clean_env, receiver().url())
    notify.job_ended(ctx, finished_job(ctx))
    viewer = tokens.create(ctx, "v", "viewer")["token"]
    client = TestClient(create_app(ctx.config))
    auth = {"Authorization": f"Bearer {viewer}"}
    answer = client.get("/v1/notifications", headers=auth)
    assert answer.status_code == 200
    (row,) = answer.json()
    assert (row["target"], row["state"]) == ("webhook", "PENDING")
    assert TOKEN not in answer.text and SECRET not in answer.text
    assert client.get("/v1/notifications?state=SENT", headers=auth).json() == []
    assert client.get("/v1/notifications?state=nope", headers=auth).status_code == 422
    assert client.get("/v1/notifications").status_code == 401
