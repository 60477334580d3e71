"""The web dashboard (``vmkeep.web``) on the real app and a real SQLite catalog, the
FakeHypervisor in place of libvirt: the session cookie, CSRF, the server's role checks, an
action queued through the action table, every page with an empty catalog and with rows, and
escaping. The real browser's test is tests/e2e (Selenium + Chromium)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html import unescape
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from vmkeep.api import app as app_module
from vmkeep.api.app import create_app
from vmkeep.catalog.tables import (
    Backup,
    BackupJob,
    Datastore,
    Drill,
    Group,
    GroupBackup,
    GroupBackupMember,
    GroupMember,
    Host,
    Increment,
    Job,
    Pool,
    Vm,
)
from vmkeep.config import load_config
from vmkeep.engine.core import stores
from vmkeep.engine.core.context import Context
from vmkeep.engine.service import tokens
from vmkeep.hypervisor.fake import SAMPLE_XML, FakeHypervisor
from vmkeep.model import ROLES
from vmkeep.web import session

NOW = datetime.now(UTC)
PAGES = ["/", "/vms", "/backups", "/jobs", "/groups", "/datastores", "/schedules", "/pools",
         "/hosts"]  # fmt: skip
EVIL = "<script>alert(1)</script>"


@dataclass
class Site:
    ctx: Context
    hv: FakeHypervisor
    client: TestClient
    secrets: dict[str, str]

    def login(self, role: str) -> TestClient:
        r = self.client.post("/login", data={"token": self.secrets[role]}, follow_redirects=False)
        assert r.status_code == 303, r.text
        return self.client

    def csrf(self, page: str = "/") -> str:
        found = re.search(r'name="csrf" value="([0-9a-f]+)"', self.client.get(page).text)
        assert found, "the page has no csrf field"
        return found.group(1)


@pytest.fixture
def site(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> Site:
    config = load_config()
    hv = FakeHypervisor()
    monkeypatch.setattr(app_module, "Context", lambda c: Context(c, _hv=hv))
    ctx = Context(config, _hv=hv)
    secrets = {role: tokens.create(ctx, f"t-{role}", role)["token"] for role in ROLES}
    return Site(ctx, hv, TestClient(create_app(config)), secrets)


def running_vm(site: Site, name: str, tmp_path: Path) -> None:
    """A VM libvirt (the fake) runs and the catalog knows."""
    disk = tmp_path / f"{name}.qcow2"
    disk.write_bytes(b"")
    site.hv.define(SAMPLE_XML.replace("<name>web</name>", f"<name>{name}</name>").format(disk=disk))
    site.hv.start(name)
    with site.ctx.catalog.session() as s:
        s.add(Vm(name=name, uuid=site.hv.record(name).uuid, host_uri="qemu:///system",
                 state="ACTIVE", lcm_state="RUNNING"))  # fmt: skip


def some_rows(site: Site, tmp_path: Path) -> None:
    """A datastore, two VMs (one named like a script), points, a drill, jobs, a group with a
    group backup, a pool and a backup job."""
    (tmp_path / "store").mkdir()
    stores.add(site.ctx, "local", "dir", {"path": str(tmp_path / "store")})
    running_vm(site, "web", tmp_path)
    with site.ctx.catalog.session() as s:
        ds = s.execute(select(Datastore)).scalar_one()
        web = s.execute(select(Vm).where(Vm.name == "web")).scalar_one()
        evil = Vm(name=EVIL, uuid="uuid-evil", host_uri="qemu:///system", state="POWEROFF",
                  lcm_state="POWEROFF")  # fmt: skip
        s.add(evil)
        s.flush()
        for vm, chain in ((web, "web/1"), (evil, "evil/1")):
            b = Backup(vm_id=vm.id, datastore_id=ds.id, chain=chain, mode="INCREMENT",
                       status="VALID", created_at=NOW - timedelta(days=3))  # fmt: skip
            s.add(b)
            s.flush()
            for seq in range(3):
                at = NOW - timedelta(days=2 - seq)
                s.add(Increment(backup_id=b.id, seq=seq, parent=seq - 1 if seq else None,
                                status="VALID", size=(seq + 1) << 20, files=[], freeze_ms=40,
                                started_at=at, finished_at=at + timedelta(seconds=30 + seq)))  # fmt: skip
        s.flush()
        inc = s.execute(select(Increment).where(Increment.seq == 2)).scalars().first()
        assert inc is not None
        s.add(Drill(increment_id=inc.id, result="PASS", reason="booted, probe answered",
                    started_at=NOW - timedelta(hours=2), finished_at=NOW - timedelta(hours=1)))  # fmt: skip
        for state, error in (("DONE", None), ("FAILED", f"disk full {EVIL}"), ("RUNNING", None)):
            s.add(Job(kind="backup", target="web", state=state, host="h", pid=1, origin="api",
                      who="t-operator", params={"vm": "web", "datastore": "local"}, error=error,
                      error_code="BackupFailed" if error else None, done_bytes=5, total_bytes=10,
                      created_at=NOW - timedelta(hours=1),
                      finished_at=NOW if state != "RUNNING" else None))  # fmt: skip
        g = Group(name="pair")
        s.add(g)
        s.flush()
        s.add_all([GroupMember(group_id=g.id, vm_id=web.id, position=0),
                   GroupMember(group_id=g.id, vm_id=evil.id, position=1)])  # fmt: skip
        gb = GroupBackup(group_id=g.id, datastore_id=ds.id, status="VALID", freeze_window_ms=120,
                         finished_at=NOW)  # fmt: skip
        s.add(gb)
        s.flush()
        s.add(GroupBackupMember(group_backup_id=gb.id, vm_id=web.id, vm_name="web", position=0,
                                status="VALID", freeze_ms=55))  # fmt: skip
        s.add(Pool(name="gold", backup_config={"keep_daily": 7}))
        s.add(Host(name="h1", uri="qemu+tcp://h1/system", vmm="native", state="MONITORED",
                   monitor={"cpus": 2, "free_memory_kib": 4 << 20}, daemon={},
                   heartbeat_at=datetime.now(UTC)))  # fmt: skip
        s.add(BackupJob(name="nightly", task="backup", selector={"all": True}, datastore="local",
                        schedule="0 2 * * *", options={}, enabled=True, owner="t-admin",
                        role="admin"))  # fmt: skip


# --- the session --------------------------------------------------------------------------------
def test_login_sets_an_httponly_strict_cookie_and_logout_clears_it(site: Site) -> None:
    r = site.client.post("/login", data={"token": site.secrets["viewer"], "next": "/vms"},
                         follow_redirects=False)  # fmt: skip
    assert r.status_code == 303 and r.headers["location"] == "/vms"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{session.COOKIE}={site.secrets['viewer']};")
    for part in ("HttpOnly", "SameSite=strict", "Path=/", f"Max-Age={session.MAX_AGE}"):
        assert part in cookie, cookie
    assert "Secure" not in cookie  # no TLS here; test_secure_cookie_with_tls
    assert site.client.get("/vms").status_code == 200
    r = site.client.post("/logout", data={"csrf": site.csrf()}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert f'{session.COOKIE}=""' in r.headers["set-cookie"]
    site.client.cookies.clear()
    assert site.client.get("/vms", follow_redirects=False).status_code == 303


def test_secure_cookie_with_tls(clean_env: Path, tmp_path: Path) -> None:
    home = clean_env.parent / "home"
    for f in ("cert.pem", "key.pem"):
        (tmp_path / f).write_text("x")
    (home / "config.toml").write_text(
        f'version = 1\n[api]\ntls_cert = "{tmp_path / "cert.pem"}"\ntls_key = "{tmp_path / "key.pem"}"\n'
    )
    config = load_config()
    secret = tokens.create(Context(config), "v", "viewer")["token"]
    client = TestClient(create_app(config), base_url="https://testserver")
    r = client.post("/login", data={"token": secret}, follow_redirects=False)
    assert "Secure" in r.headers["set-cookie"]


def test_a_bad_token_stays_on_the_login_page_and_next_stays_on_this_site(site: Site) -> None:
    r = site.client.post("/login", data={"token": "vmk_nope"})
    assert r.status_code == 401
    assert "Unknown or revoked token" in r.text and session.COOKIE not in r.headers.get(
        "set-cookie", ""
    )
    r = site.client.post("/login", data={"token": site.secrets["viewer"], "next": "//evil.example/"},
                         follow_redirects=False)  # fmt: skip
    assert r.headers["location"] == "/"
    # a browser drops a tab or newline from a URL: "/<TAB>/evil.example" would be "//evil..."
    for odd in (
        "/\t/evil.example/",
        "/\n/evil.example/",
        "/\x7f/evil.example/",
        "https://e.example",
    ):
        r = site.client.post("/login", data={"token": site.secrets["viewer"], "next": odd},
                             follow_redirects=False)  # fmt: skip
        assert r.headers["location"] == "/", odd
    assert session.safe_next("/vms?state=stale") == "/vms?state=stale"


def test_logout_of_a_revoked_session_clears_its_cookie(site: Site) -> None:
    site.login("viewer")
    r = site.client.post("/logout", data={}, follow_redirects=False)  # no csrf: refused
    assert r.status_code == 403 and site.client.get("/vms").status_code == 200
    tokens.revoke(site.ctx, "t-viewer")
    r = site.client.post("/logout", data={}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert f'{session.COOKIE}=""' in r.headers["set-cookie"]


@pytest.mark.parametrize("page", [*PAGES, "/tokens", "/vms/web", "/jobs/1"])
def test_a_page_without_a_session_redirects_to_login(site: Site, page: str) -> None:
    r = site.client.get(page, follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"].startswith("/login?next=")
    site.client.cookies.set(session.COOKIE, "vmk_revoked")
    assert site.client.get(page, follow_redirects=False).status_code == 303


def test_the_api_takes_the_cookie_for_reads_only(site: Site) -> None:
    site.login("operator")
    assert site.client.get("/v1/jobs").status_code == 200
    r = site.client.get("/v1/events", params={"max_seconds": 0.1})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    # a mutating API call needs the bearer header: the cookie alone changes nothing (no CSRF)
    r = site.client.post("/v1/vms/web/backup", json={"datastore": "local"})
    assert r.status_code == 401
    r = site.client.delete("/v1/jobs/1")
    assert r.status_code == 401


# --- CSRF and roles -----------------------------------------------------------------------------
def test_a_post_without_a_valid_csrf_is_refused(site: Site, tmp_path: Path) -> None:
    some_rows(site, tmp_path)
    site.login("operator")
    good = site.csrf()
    for data in ({"vm": "web", "datastore": "local"},
                 {"vm": "web", "datastore": "local", "csrf": "0" * 64}):  # fmt: skip
        r = site.client.post("/act/backup", data=data)
        assert r.status_code == 403, r.text
        assert 'role="alert"' in r.text and "security token" in r.text
    r = site.client.post("/act/backup", data={"vm": "web", "datastore": "local", "csrf": good},
                         headers={"Origin": "https://evil.example"})  # fmt: skip
    assert r.status_code == 403 and "another site" in r.text
    with site.ctx.catalog.session() as s:
        assert s.execute(select(Job).where(Job.state == "QUEUED")).first() is None


def test_a_viewer_sees_no_buttons_and_its_post_is_refused(site: Site, tmp_path: Path) -> None:
    some_rows(site, tmp_path)
    site.login("viewer")
    for page in [*PAGES, "/vms/web", "/jobs/3"]:
        html = site.client.get(page).text
        actions = set(re.findall(r'data-action="([^"]+)"', html)) - {"logout"}
        assert not actions, (page, actions)
    assert site.client.get("/tokens").status_code == 403
    csrf = site.csrf()
    r = site.client.post("/act/backup", data={"vm": "web", "datastore": "local", "csrf": csrf})
    assert r.status_code == 403
    assert "Token 't-viewer' has role viewer; backup needs operator." in unescape(r.text)
    r = site.client.post("/jobs/3/cancel", data={"csrf": csrf})
    assert r.status_code == 403
    with site.ctx.catalog.session() as s:
        assert s.execute(select(Job).where(Job.state == "QUEUED")).first() is None
        assert not s.get(Job, 3).cancel_requested


def test_an_operator_backs_up_now_through_the_action_table(site: Site, tmp_path: Path) -> None:
    some_rows(site, tmp_path)
    site.login("operator")
    html = site.client.get("/vms").text
    assert re.search(r'<tr data-vm="web">.*?data-action="backup"', html, re.S)
    r = site.client.post("/act/backup", data={"vm": "web", "datastore": "local", "csrf": site.csrf()},
                         follow_redirects=False)  # fmt: skip
    assert r.status_code == 303, r.text
    with site.ctx.catalog.session() as s:
        job = s.execute(select(Job).where(Job.state == "QUEUED")).scalar_one()
        assert (job.kind, job.target, job.who) == ("backup", "web", "t-operator")
        assert job.params["datastore"] == "local" and job.params["actor_role"] == "operator"
    assert r.headers["location"] == f"/jobs/{job.id}"
    page = site.client.get(r.headers["location"])
    assert f'<progress data-job="{job.id}"' in page.text
    assert f'data-job-state="{job.id}"' in page.text and "Queued backup of web" in page.text


def test_an_engine_refusal_is_shown_in_words(site: Site, tmp_path: Path) -> None:
    some_rows(site, tmp_path)
    site.login("operator")
    r = site.client.post(
        "/act/backup", data={"vm": "web", "datastore": "nope", "csrf": site.csrf()}
    )
    assert r.status_code == 404
    assert re.search(r'<div role="alert" class="error">[^<]*nope', r.text), r.text
    r = site.client.post("/act/backup", data={"vm": "web", "csrf": site.csrf()})
    assert r.status_code == 422 and "datastore" in r.text
    assert site.client.get("/vms/nosuchvm").status_code == 404


def test_admin_creates_shows_once_and_revokes_a_token(site: Site) -> None:
    site.login("admin")
    r = site.client.post("/tokens", data={"name": "ci", "role": "viewer", "csrf": site.csrf()})
    assert r.status_code == 200
    secret = re.search(r"<pre data-secret>(vmk_[^<]+)</pre>", r.text)
    assert secret and tokens.authenticate(site.ctx, f"Bearer {secret.group(1)}") == ("ci", "viewer")
    assert "data-secret" not in site.client.get("/tokens").text
    r = site.client.post("/tokens/ci/revoke", data={"csrf": site.csrf()}, follow_redirects=False)
    assert r.status_code == 303
    assert "ci" not in [t["name"] for t in tokens.list_tokens(site.ctx)]


def test_an_operator_cannot_manage_tokens(site: Site) -> None:
    site.login("operator")
    assert "/tokens" not in site.client.get("/").text
    r = site.client.post("/tokens", data={"name": "x", "role": "admin", "csrf": site.csrf()})
    assert r.status_code == 403
    assert "x" not in [t["name"] for t in tokens.list_tokens(site.ctx)]


# --- pages --------------------------------------------------------------------------------------
@pytest.mark.parametrize("role", ["viewer", "admin"])
def test_every_page_renders_empty_with_a_next_step(site: Site, role: str) -> None:
    site.login(role)
    for page in PAGES + (["/tokens"] if role == "admin" else []):
        r = site.client.get(page)
        assert r.status_code == 200, (page, r.text)
        assert '<main id="main"' in r.text
        if page != "/tokens":
            assert 'class="empty"' in r.text, page


def test_every_page_renders_rows(site: Site, tmp_path: Path) -> None:
    some_rows(site, tmp_path)
    site.login("admin")
    expect = {
        "/": ["Failed in the last 24 hours", "disk full", "<progress data-job="],
        "/vms": ['<tr data-vm="web">', 'data-action="vm-poweroff"', 'data-action="quiesce"'],
        "/vms/web": ["<svg", "<polyline", "Chain", "booted, probe answered", "40 ms"],
        "/backups": [
            'href="/restore?backup=',
            'data-action="verify"',
            'data-action="drill"',
            'data-action="delete"',
            'data-action="backup-protect"',
        ],
        "/jobs": ['data-job-state="', 'data-action="cancel-job"'],
        "/jobs/2": ["BackupFailed", "disk full"],
        "/groups": ["web</a> → ", "120 ms", 'data-action="group-backup"'],
        "/datastores": ["local", 'data-action="scan"', "<svg"],
        "/schedules": ["nightly", "0 2 * * *"],
        "/pools": ["gold", "keep_daily=7"],
        "/hosts": ['<tr data-host="h1">', "MONITORED", "alive", "4.0 GiB", "qemu+tcp://h1/system"],
        "/tokens": ["t-operator", 'data-action="token-revoke"'],
    }
    for page, wanted in expect.items():
        r = site.client.get(page)
        assert r.status_code == 200, (page, r.text)
        for text in wanted:
            assert text in r.text, (page, text)
    times = re.findall(r'<time datetime="([^"]+)">', site.client.get("/jobs").text)
    assert times and all(datetime.fromisoformat(t).tzinfo for t in times)


def test_a_vm_row_offers_only_what_its_state_allows(site: Site, tmp_path: Path) -> None:
    some_rows(site, tmp_path)
    site.login("operator")
    html = site.client.get("/vms").text
    row = re.search(r'<tr data-vm="web">(.*?)</tr>', html, re.S)
    assert row
    kinds = set(re.findall(r'data-action="([^"]+)"', row.group(1)))
    assert {"backup", "quiesce", "vm-poweroff", "vm-reboot", "vm-suspend"} <= kinds
    assert not kinds & {"vm-deploy", "vm-resume", "unquiesce", "vm-terminate"}  # terminate: admin


def test_buttons_and_posts_follow_the_configured_policy(
    clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """[api.policy] quiesce = "admin": an operator sees no Quiesce and its POST is refused, the
    same rule the API applies (tokens.authorize); an admin sees it."""
    (clean_env.parent / "home" / "config.toml").write_text(
        'version = 1\n[api.policy]\nquiesce = "admin"\n'
    )
    config = load_config()
    hv = FakeHypervisor()
    monkeypatch.setattr(app_module, "Context", lambda c: Context(c, _hv=hv))
    ctx = Context(config, _hv=hv)
    secrets = {role: tokens.create(ctx, f"t-{role}", role)["token"] for role in ROLES}
    site = Site(ctx, hv, TestClient(create_app(config)), secrets)
    running_vm(site, "web", tmp_path)
    site.login("operator")
    assert 'data-action="quiesce"' not in site.client.get("/vms/web").text
    r = site.client.post("/act/quiesce", data={"vm": "web", "csrf": site.csrf()})
    assert r.status_code == 403 and "admin" in r.text
    site.login("admin")
    assert 'data-action="quiesce"' in site.client.get("/vms/web").text


def test_a_downloaded_guest_file_never_runs_as_a_page(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/files/download streams a guest's file from this origin: attachment, octet-stream, and
    nosniff with a sandboxing CSP, so an .html file of the guest cannot script the dashboard."""
    from fastapi.responses import StreamingResponse

    from vmkeep.web import files_pages

    async def fake_download(*_args: object) -> StreamingResponse:  # the point's bytes: a page
        return StreamingResponse(iter([EVIL.encode()]), media_type="application/octet-stream",
                                 headers={"Content-Disposition": 'attachment; filename="x.html"'})  # fmt: skip

    monkeypatch.setattr(files_pages, "file_download", fake_download)
    site.login("viewer")
    assert site.client.get("/files/download?backup=1&path=/x.html").status_code == 403
    site.login("operator")
    r = site.client.get("/files/download?backup=1&path=/x.html")
    assert r.status_code == 200 and r.content == EVIL.encode()
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["content-security-policy"].startswith("sandbox")
    assert r.headers["content-disposition"].startswith("attachment")


def test_names_are_escaped(site: Site, tmp_path: Path) -> None:
    some_rows(site, tmp_path)
    site.login("admin")
    for page in ["/", "/vms", "/backups", "/groups", "/jobs/2"]:
        html = site.client.get(page).text
        assert EVIL not in html, page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in site.client.get("/vms").text


def test_static_assets_are_served_without_a_session(site: Site) -> None:
    for asset, kind in (("vmkeep.css", "text/css"), ("vmkeep.js", "javascript")):
        r = site.client.get(f"/static/{asset}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
    assert "/login" not in site.client.get("/openapi.json").json()["paths"]


def test_the_session_key_is_private_and_kept(site: Site) -> None:
    key = site.ctx.config.data_dir / session.KEY_FILE
    assert key.stat().st_mode & 0o777 == 0o600
    assert session.key(site.ctx.config.data_dir) == key.read_bytes()
    key.chmod(0o644)  # e.g. a data dir copied without its modes: the next start makes it private
    assert session.key(site.ctx.config.data_dir) == key.read_bytes()
    assert key.stat().st_mode & 0o777 == 0o600


def test_long_lists_come_in_pages(
    site: Site, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from vmkeep.web import pages_points, pages_vms

    monkeypatch.setattr(pages_vms, "PAGE", 2)
    monkeypatch.setattr(pages_points, "JOBS_PAGE", 2)
    with site.ctx.catalog.session() as s:
        for n in range(5):
            s.add(Vm(name=f"vm{n}", uuid=f"u{n}", host_uri="qemu:///system", state="POWEROFF",
                     lcm_state="POWEROFF"))  # fmt: skip
            s.add(Job(kind="backup", target=f"vm{n}", state="DONE", host="h", pid=1, origin="api"))
    asked: list[object] = []
    real = pages_vms.overview.vm_states

    def spy(ctx: Context, names: list[str] | None = None) -> dict[str, dict[str, object]]:
        asked.append(names)
        return real(ctx, names)

    monkeypatch.setattr(pages_vms.overview, "vm_states", spy)
    site.login("viewer")
    seen, url = [], "/vms"
    while url:
        page = site.client.get(url).text
        seen += re.findall(r'<tr data-vm="([^"]+)">', page)
        found = re.search(r'rel="next" href="([^"]+)"', page)
        url = unescape(found.group(1)) if found else ""
    assert seen == [f"vm{n}" for n in range(5)]
    # an unfiltered page reads the facts of its own VMs only, not of every VM
    assert asked == [["vm0", "vm1"], ["vm2", "vm3"], ["vm4"]]
    assert "unprotected" in site.client.get("/vms?state=unprotected").text and asked[-1] is None
    jobs, url = [], "/jobs"
    while url:
        page = site.client.get(url).text
        jobs += re.findall(r'<td><a href="/jobs/(\d+)">', page)
        found = re.search(r'rel="next" href="([^"]+)"', page)
        url = unescape(found.group(1)) if found else ""
    assert jobs == ["5", "4", "3", "2", "1"]


def test_pages_are_not_cached_framed_or_open_to_inline_scripts(site: Site) -> None:
    site.login("viewer")
    for page in ("/", "/login"):
        h = site.client.get(page).headers
        assert h["cache-control"] == "no-store" and h["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in h["content-security-policy"]
        assert "default-src 'self'" in h["content-security-policy"]


def test_page_posts_and_failed_logins_are_audited(site: Site, tmp_path: Path) -> None:
    from vmkeep.engine.service import audit

    some_rows(site, tmp_path)
    site.client.post("/login", data={"token": "vmk_wrong"})
    site.login("operator")
    site.client.post("/act/backup", data={"vm": "web", "datastore": "local", "csrf": site.csrf()})
    rows = [
        (e["actor"], e["method"], e["path"], e["status"]) for e in audit.list_entries(site.ctx, 10)
    ]
    assert ("t-operator", "POST", "/act/backup", 303) in rows
    assert ("t-operator", "POST", "/login", 303) in rows
    assert ("-", "POST", "/login", 401) in rows
    assert all(site.secrets["operator"] not in str(r) for r in rows)
