"""Paged lists, cursors and ETags (``api/paging.py``) on the real app and a real SQLite catalog
(FastAPI's TestClient); the CLI's reader follows the pages to the end (``cli/remote.py``)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import pytest
from fastapi.testclient import TestClient

from vmkeep.api import paging
from vmkeep.api.app import create_app
from vmkeep.catalog.tables import AuditEntry, Backup, Datastore, Group, Increment, Job, Vm
from vmkeep.cli import remote
from vmkeep.config import load_config
from vmkeep.engine.core.context import Context
from vmkeep.engine.service import tokens

VMS = 250


@pytest.fixture
def api(clean_env: Path) -> tuple[TestClient, Context, dict[str, str]]:
    config = load_config()
    ctx = Context(config)
    with ctx.catalog.session() as s:
        ds = Datastore(name="ds", driver="dir", options={"path": str(clean_env / "nope")})
        s.add(ds)
        s.flush()
        for n in range(VMS):
            vm = Vm(name=f"pg-{n:04d}", uuid=str(uuid.uuid4()), host_uri="qemu:///system",
                    state="UNKNOWN", lcm_state="UNKNOWN", backup_config={})  # fmt: skip
            s.add(vm)
            s.flush()
            if n % 2 == 0:
                b = Backup(vm_id=vm.id, datastore_id=ds.id, chain=f"{vm.name}/1", mode="FULL",
                           status="VALID")  # fmt: skip
                s.add(b)
                s.flush()
                s.add(Increment(backup_id=b.id, seq=0, status="VALID", size=n, files=[]))
        for n in range(150):
            s.add(Job(kind="verify" if n % 3 else "backup", target=f"pg-{n:04d}",
                      state="DONE" if n % 2 else "FAILED", host="h", pid=1))  # fmt: skip
        for n in range(120):
            s.add(Group(name=f"g{n:03d}"))
        for n in range(130):
            s.add(AuditEntry(actor="a", role="admin", method="POST", path=f"/x/{n}",
                             status=200, client="c", at=datetime.now(UTC)))  # fmt: skip
    secrets = {r: tokens.create(ctx, f"t-{r}", r)["token"] for r in ("viewer", "admin")}
    return TestClient(create_app(config)), ctx, secrets


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def read_all(client: TestClient, url: str, headers: dict[str, str]) -> tuple[list[Any], int]:
    """Every row of a list, following its Link headers; and how many pages it took."""
    rows: list[Any] = []
    pages = 0
    next_url: str | None = url
    while next_url is not None:
        r = client.get(next_url, headers=headers)
        assert r.status_code == 200, r.text
        rows += r.json()
        pages += 1
        next_url = r.links.get("next", {}).get("url")
    return rows, pages


def test_vms_come_in_pages_of_100_linked_in_id_order(api: Any) -> None:
    client, _ctx, secrets = api
    h = auth(secrets["viewer"])
    first = client.get("/v1/vms", headers=h)
    assert len(first.json()) == 100
    assert first.headers["link"].startswith("</v1/vms?limit=100&cursor=")
    assert first.headers["link"].endswith('>; rel="next"')
    rows, pages = read_all(client, "/v1/vms", h)
    assert pages == 3 and [r["name"] for r in rows] == [f"pg-{n:04d}" for n in range(VMS)]
    whole = client.get("/v1/vms?limit=1000", headers=h)
    assert "link" not in whole.headers and whole.json() == rows
    exact = client.get("/v1/vms?limit=250", headers=h)  # no empty page after the last row
    assert "link" not in exact.headers and len(exact.json()) == VMS


def test_every_list_pages_and_keeps_its_filters(api: Any) -> None:
    client, _ctx, secrets = api
    viewer, admin = auth(secrets["viewer"]), auth(secrets["admin"])
    jobs, pages = read_all(client, "/v1/jobs?limit=40", viewer)
    assert pages == 4 and [j["id"] for j in jobs] == sorted((j["id"] for j in jobs), reverse=True)
    assert len(jobs) == 150
    failed = client.get("/v1/jobs?state=FAILED&limit=30", headers=viewer)
    assert "state=FAILED" in failed.headers["link"]
    rows, _ = read_all(client, "/v1/jobs?state=FAILED&limit=30", viewer)
    assert len(rows) == 75 and {j["state"] for j in rows} == {"FAILED"}
    backups, pages = read_all(client, "/v1/backups?limit=50", viewer)
    assert pages == 3 and len(backups) == VMS // 2
    assert [b["id"] for b in backups] == sorted(b["id"] for b in backups)
    assert all(len(b["increments"]) == 1 for b in backups)
    one = client.get("/v1/backups?vm=pg-0002&limit=1", headers=viewer)
    assert [b["vm"] for b in one.json()] == ["pg-0002"] and "link" not in one.headers
    groups, pages = read_all(client, "/v1/groups", viewer)
    assert pages == 2 and [g["name"] for g in groups] == [f"g{n:03d}" for n in range(120)]
    stores, pages = read_all(client, "/v1/datastores?limit=1", viewer)
    assert pages == 1 and [d["name"] for d in stores] == ["ds"]
    audit, pages = read_all(client, "/v1/audit?limit=60", admin)
    entries = [a for a in audit if a["path"].startswith("/x/")]
    assert pages == 3 and [a["path"] for a in entries] == [f"/x/{n}" for n in reversed(range(130))]


def test_a_row_removed_between_pages_skips_nothing(api: Any) -> None:
    """Keyset, not OFFSET: the next page starts after the last row shown, whatever changed."""
    client, ctx, secrets = api
    h = auth(secrets["viewer"])
    first = client.get("/v1/groups?limit=10", headers=h)
    with ctx.catalog.session() as s:  # the first page's first rows go
        for g in s.query(Group).filter(Group.name.in_(["g000", "g001", "g002"])):
            s.delete(g)
    rest, _ = read_all(client, first.links["next"]["url"], h)
    assert [g["name"] for g in rest][:2] == ["g010", "g011"] and len(rest) == 110


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=x", "limit"),
        ("cursor=ABC", "Link header"),
        ("cursor=a-b", "Link header"),
        ("cursor=" + "1" * 13, "cursor"),
        ("cursor=", "Link header"),
    ],
)
def test_bad_limit_or_cursor_is_a_clear_422(api: Any, query: str, words: str) -> None:
    client, _ctx, secrets = api
    r = client.get(f"/v1/vms?{query}", headers=auth(secrets["viewer"]))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "InvalidValue" and words in r.json()["error"]["message"]


def test_every_text_of_the_cursor_form_is_a_cursor(api: Any) -> None:
    """A cursor the API never gave but of its form is a position, not an error (a client
    generated from the schema may send one)."""
    client, _ctx, secrets = api
    h = auth(secrets["viewer"])
    assert client.get("/v1/vms?cursor=zzzzzzzzzzzz", headers=h).json() == []
    assert paging.decode("zzzzzzzzzzzz") < 2**63
    for key in (0, 1, 35, 36, 10**6, 2**63 - 1):
        assert paging.decode(paging.encode(key)) == key


def test_the_schema_shows_the_constraints(api: Any) -> None:
    client, _ctx, _secrets = api
    spec = client.get("/openapi.json").json()
    for path in ("/v1/vms", "/v1/backups", "/v1/jobs", "/v1/groups", "/v1/datastores", "/v1/audit"):
        params = {p["name"]: p["schema"] for p in spec["paths"][path]["get"]["parameters"]}
        assert params["limit"] == {"type": "integer", "maximum": 1000, "minimum": 1,
                                   "default": 100, "description": params["limit"]["description"],
                                   "title": "Limit"}, path  # fmt: skip
        cursor = params["cursor"]
        assert (
            cursor["type"] == "string"
            and cursor["maxLength"] == 12
            and cursor["pattern"] == "^[0-9a-z]{1,12}$"
        ), path


def test_etag_and_if_none_match(api: Any) -> None:
    client, ctx, secrets = api
    h = auth(secrets["viewer"])
    for url in ("/v1/vms", "/v1/overview", "/v1/jobs/1", "/v1/backups?limit=5"):
        r = client.get(url, headers=h)
        tag = r.headers["etag"]
        assert r.status_code == 200 and tag == paging.etag(r.content), url
        again = client.get(url, headers=h | {"If-None-Match": tag})
        assert again.status_code == 304 and again.content == b"", url
        assert again.headers["etag"] == tag and "content-length" not in again.headers
        for other in ('"nope"', f'"x", W/{tag}', "*"):
            status = client.get(url, headers=h | {"If-None-Match": other}).status_code
            assert status == (200 if other == '"nope"' else 304), (url, other)
        # the list split over two If-None-Match fields is still one list
        split = client.get(url, headers=[*h.items(), ("If-None-Match", '"x"'),
                                         ("If-None-Match", tag)])  # fmt: skip
        assert split.status_code == 304, url
    first = client.get("/v1/vms?limit=5", headers=h)
    assert (
        first.headers["link"]
        == client.get(
            "/v1/vms?limit=5", headers=h | {"If-None-Match": first.headers["etag"]}
        ).headers["link"]
    )
    with ctx.catalog.session() as s:
        s.query(Vm).filter_by(name="pg-0000").one().pool = None
        s.query(Vm).filter_by(name="pg-0000").one().error = "changed"
    changed = client.get("/v1/vms?limit=5", headers=h | {"If-None-Match": first.headers["etag"]})
    assert changed.status_code == 200 and changed.headers["etag"] != first.headers["etag"]
    # not JSON, or not a 200: no ETag
    assert "etag" not in client.get("/metrics", headers=h).headers
    assert "etag" not in client.get("/v1/jobs/99999", headers=h).headers


def test_overview_route_needs_read_and_answers_the_summary(api: Any) -> None:
    client, _ctx, secrets = api
    assert client.get("/v1/overview").status_code == 401
    body = client.get("/v1/overview", headers=auth(secrets["viewer"])).json()
    assert body["vms"]["total"] == VMS and body["vms"]["unprotected"] == VMS // 2
    assert [d["name"] for d in body["datastores"]] == ["ds"]


def test_the_cli_reader_follows_every_page(api: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``remote.get`` (what ``vm list``, ``jobs list`` ... read through a daemon) asks the app
    page by page, as its Link headers say, and returns every row; ``limit`` caps the rows."""
    client, _ctx, secrets = api
    asked: list[str] = []

    def ask_page(_where: Any, method: str, target: str, *_a: Any) -> tuple[int, Any, str | None]:
        asked.append(target)
        r = client.request(method, target, headers=auth(secrets["admin"]))
        return r.status_code, r.json(), r.links.get("next", {}).get("url")

    monkeypatch.setattr(remote, "_where", lambda _c: object())
    monkeypatch.setattr(remote, "_ask_page", ask_page)
    c = click.Context(click.Command("x"))
    rows = remote.get(c, "/v1/vms")
    assert [r["name"] for r in rows] == [f"pg-{n:04d}" for n in range(VMS)]
    assert asked[0] == "/v1/vms" and "limit=1000" in asked[1] and len(asked) == 2
    asked.clear()
    newest = remote.get(c, "/v1/jobs", state=None, limit="120")
    assert len(newest) == 120 and asked == ["/v1/jobs?limit=120"]
    asked.clear()
    audit = remote.get(c, "/v1/audit", limit="1500")
    assert len(audit) == 130 and asked == ["/v1/audit?limit=1000"]
    assert remote.get(c, "/v1/jobs/1")["id"] == 1  # a show: one answer as it is


def test_the_api_list_reuses_libvirts_states_until_a_vm_row_changes(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``GET /v1/vms`` (``reuse``) asks libvirt for the domains' states once per ``LIVE_TTL``
    while no VM row changes; an action's write to a VM row is seen by the next page at once."""
    from vmkeep.engine.vm import inventory
    from vmkeep.hypervisor.fake import FakeHypervisor

    hv = FakeHypervisor()
    asked = []
    real = hv.states
    monkeypatch.setattr(hv, "states", lambda: asked.append(1) or real())
    ctx = Context(load_config(), _hv=hv)
    with ctx.catalog.session() as s:
        for n in range(5):
            s.add(Vm(name=f"v{n}", uuid=f"u{n}", host_uri="fake:///system", state="UNKNOWN",
                     lcm_state="UNKNOWN", backup_config={}))  # fmt: skip
    first = inventory.list_vms(ctx, 2, None, reuse=True)  # writes nothing: all stay UNKNOWN
    assert inventory.list_vms(ctx, 2, first[-1]["id"], reuse=True) and len(asked) == 1
    inventory.list_vms(ctx)  # the CLI's read asks every time
    assert len(asked) == 2
    with ctx.catalog.session() as s:
        s.query(Vm).filter_by(name="v0").one().lcm_state = "HOLD"
    inventory.list_vms(ctx, 2, None, reuse=True)
    assert len(asked) == 3
    monkeypatch.setattr(inventory, "LIVE_TTL", 0.0)
    inventory.list_vms(ctx, 2, None, reuse=True)
    assert len(asked) == 4


def test_job_completion_reads_one_page_of_the_newest(
    api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tab on a job id asks the daemon for the newest ``MAX_PAGE`` jobs in one request (what
    ``refs`` offers without a daemon), not every page of the job history."""
    from vmkeep.cli import complete

    client, _ctx, secrets = api
    asked: list[str] = []

    def ask_page(_where: Any, method: str, target: str, *_a: Any) -> tuple[int, Any, str | None]:
        asked.append(target)
        r = client.request(method, target, headers=auth(secrets["viewer"]))
        return r.status_code, r.json(), r.links.get("next", {}).get("url")

    monkeypatch.setattr(remote, "_where", lambda _c: object())
    monkeypatch.setattr(remote, "_ask_page", ask_page)
    offered = complete.jobs(click.Context(click.Command("x")), None, "14")
    assert offered == ["149", "148", "147", "146", "145", "144", "143", "142", "141", "140", "14"]
    assert asked == [f"/v1/jobs?limit={paging.MAX_PAGE}"] and remote.MAX_PAGE == paging.MAX_PAGE
