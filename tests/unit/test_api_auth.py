"""The API's auth matrix and error shapes, on the real app and a real SQLite catalog (no VMs:
the routes used here answer before any hypervisor call)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from vmkeep.api.app import create_app
from vmkeep.config import load_config
from vmkeep.engine.core.context import Context
from vmkeep.engine.service import tokens


@pytest.fixture
def setup(clean_env: Path) -> tuple[TestClient, dict[str, str]]:
    config = load_config()
    ctx = Context(config)
    secrets = {r: tokens.create(ctx, f"t-{r}", r)["token"] for r in ("viewer", "operator", "admin")}
    return TestClient(create_app(config)), secrets


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_health_needs_no_token(setup: tuple[TestClient, dict[str, str]]) -> None:
    client, _ = setup
    assert client.get("/healthz").json()["ok"] is True


def test_missing_or_bad_token_is_401(setup: tuple[TestClient, dict[str, str]]) -> None:
    client, secrets = setup
    for headers in ({}, {"Authorization": "Basic x"}, auth("vmk_wrong"), auth("")):
        r = client.get("/v1/jobs", headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["code"] == "Unauthorized"


@pytest.mark.parametrize(
    ("role", "method", "path", "body", "status"),
    [
        ("viewer", "GET", "/v1/jobs", None, 200),
        ("viewer", "GET", "/v1/datastores", None, 200),
        ("viewer", "POST", "/v1/vms/web/backup", {"datastore": "d"}, 403),
        ("viewer", "DELETE", "/v1/jobs/1", None, 403),
        ("operator", "POST", "/v1/vms/web/backup", {"datastore": "d"}, 404),  # allowed; no VM
        ("operator", "POST", "/v1/vms/web/quiesce", None, 404),
        ("operator", "POST", "/v1/datastores", {"name": "d", "options": {"path": "/x"}}, 403),
        ("operator", "POST", "/v1/vms/web/reset-state", None, 403),
        ("admin", "POST", "/v1/vms/web/reset-state", None, 404),
        ("admin", "DELETE", "/v1/jobs/1", None, 404),
    ],
)
def test_role_matrix(
    setup: tuple[TestClient, dict[str, str]],
    role: str,
    method: str,
    path: str,
    body: dict[str, object] | None,
    status: int,
) -> None:
    client, secrets = setup
    r = client.request(method, path, json=body, headers=auth(secrets[role]))
    assert r.status_code == status, r.text
    assert secrets[role] not in r.text


def test_admin_adds_a_datastore_and_bad_input_is_422(
    setup: tuple[TestClient, dict[str, str]], tmp_path: Path
) -> None:
    client, secrets = setup
    h = auth(secrets["admin"])
    r = client.post(
        "/v1/datastores", json={"name": "ds", "options": {"path": str(tmp_path)}}, headers=h
    )
    assert r.status_code == 201, r.text
    for body in ({"name": "..", "options": {"path": "/x"}}, {"name": "d", "bogus": 1}, [1]):
        r = client.post("/v1/datastores", json=body, headers=h)
        assert r.status_code == 422, r.text
        assert set(r.json()["error"]) == {"code", "message"}


def test_policy_override_makes_quiesce_admin_only(clean_env: Path) -> None:
    (clean_env.parent / "home" / "config.toml").write_text(
        'version = 1\n[api.policy]\nquiesce = "admin"\n'
    )
    config = load_config()
    ctx = Context(config)
    op = tokens.create(ctx, "op", "operator")["token"]
    r = TestClient(create_app(config)).post("/v1/vms/web/quiesce", headers=auth(op))
    assert r.status_code == 403 and "quiesce needs admin" in r.json()["error"]["message"]


def test_tokens_are_stored_hashed(clean_env: Path) -> None:
    ctx = Context(load_config())
    secret = tokens.create(ctx, "t", "viewer")["token"]
    raw = (clean_env / "catalog.db").read_bytes()
    assert secret.encode() not in raw
    assert tokens.authenticate(ctx, f"Bearer {secret}") == ("t", "viewer")
    tokens.revoke(ctx, "t")
    with pytest.raises(Exception, match="unknown or revoked"):
        tokens.authenticate(ctx, f"Bearer {secret}")


def test_last_used_is_written_once_a_minute_not_per_request(
    clean_env: Path, updated_rows: Callable[[Any], list[Any]]
) -> None:
    """A read must not be a write transaction: concurrent clients queued on SQLite's lock."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    from vmkeep.catalog.tables import Token

    ctx = Context(load_config())
    secret = tokens.create(ctx, "t", "viewer")["token"]
    header = f"Bearer {secret}"
    tokens.authenticate(ctx, header)
    first = tokens.list_tokens(ctx)[0]["last_used"]
    assert first is not None
    writes = updated_rows(ctx.catalog.engine)
    for _ in range(5):
        assert tokens.authenticate(ctx, header) == ("t", "viewer")
    assert writes == [] and tokens.list_tokens(ctx)[0]["last_used"] == first
    old = datetime.now(UTC) - tokens.LAST_USED_STEP - timedelta(seconds=1)
    with ctx.catalog.session() as s:
        s.execute(update(Token).values(last_used_at=old))
    tokens.authenticate(ctx, header)
    assert tokens.list_tokens(ctx)[0]["last_used"] > old + tokens.LAST_USED_STEP


def test_metrics_need_a_token_and_show_the_queue(setup: tuple[TestClient, dict[str, str]]) -> None:
    client, secrets = setup
    assert client.get("/metrics").status_code == 401
    r = client.get("/metrics", headers=auth(secrets["viewer"]))
    assert r.status_code == 200 and 'vmkeep_jobs{state="QUEUED"} 0.0' in r.text, r.text
    assert "vmkeep_backups" in r.text
    for secret in secrets.values():
        assert secret not in r.text


def test_events_stream_jobs_as_sse(
    setup: tuple[TestClient, dict[str, str]], clean_env: Path
) -> None:
    from vmkeep.engine.core import jobs

    client, secrets = setup
    ctx = Context(load_config())
    job = jobs.enqueue(ctx, "verify", "1", {"backup": 1}, "api", "t-operator")
    with client.stream(
        "GET", "/v1/events", params={"max_seconds": 1.2}, headers=auth(secrets["viewer"])
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    assert "event: job" in text and f'"id": {job["id"]}' in text and '"state": "QUEUED"' in text
