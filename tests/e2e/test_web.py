"""The web dashboard in a real browser (Debian's headless Chromium through Selenium) against a
real ``vmkeep daemon`` and a real lab VM: an operator logs in, backs the VM up from its page and
watches the job's bar reach 100 % live, restores the point as a new VM through the wizard,
finds it in the VM list and downloads a file the guest wrote from the point's file browser; a
viewer sees no action buttons and gets 403 when it posts a form anyway; a form without its CSRF
token is refused; the session cookie is HttpOnly and SameSite=Strict. Every step leaves a
screenshot in ``.pytest-screens/<run>/`` (docs/screenshots/ holds a few of them).

The tests of this module share one daemon, one guest (with the CLI's backup) and one browser;
each starts from a browser with no session (``signed_out``) or an operator's (``as_operator``),
so each stands alone, in any order."""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from vmkeep.lab import Lab

from .conftest import PREFIX
from .web_browser import (
    DESKTOP,
    PHONE,
    Host,
    Screens,
    host_with_daemon,
    screens_folder,
    start_chromium,
    wait_for,
)

VM = f"{PREFIX}web"
RESTORED = f"{PREFIX}web-new"
NOTE = "/mnt/vda/web/note.bin"  # written in the guest before the backup; downloaded after
HOLD = "/web/hold.bin"  # 48 MiB: its download, held open, holds the daemon's one work slot
JOB_TIMEOUT = 600  # s: a backup or restore of the lab guest under TCG


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    tmp = tmp_path_factory.mktemp("web")
    # one worker: a files download the test holds open keeps a job QUEUED (they share slots)
    with host_with_daemon(tmp, tmp / "daemon.log", "--workers", "1") as h:
        h.cli("datastore", "add", "ds", "--driver", "dir", "--path", str(h.data / "ds"))
        yield h


@pytest.fixture(scope="module")
def guest(lab: Lab, host: Host) -> Iterator[str]:
    """The lab VM with NOTE and HOLD written, imported into the module's catalog, and last
    night's backup of it (the CLI's): NOTE's sha256."""
    lab.create(VM, [128 << 20])
    try:
        lab.sh(VM, f"mkdir -p /mnt/vda/web && dd if=/dev/zero of=/mnt/vda{HOLD} bs=1M count=48 "
                   "2>/dev/null && sync")  # fmt: skip
        want = lab.write_random(VM, NOTE, 1)
        host.cli("vm", "import", VM)
        state["backup"] = host.cli("backup", VM, "-d", "ds", "--json").json()["id"]  # type: ignore[index]
        yield want
    finally:
        for name in (RESTORED, VM):
            with contextlib.suppress(Exception):  # not there: a test failed before making it
                lab.remove(name)


@pytest.fixture(scope="module")
def screens() -> Screens:
    return screens_folder()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(host: Host, downloads: Path) -> Iterator[Any]:
    """Closed before the daemon stops (a page's open /v1/events stream would hold it up)."""
    driver = start_chromium(downloads)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def tokens(host: Host) -> dict[str, str]:
    return {role: host.token(f"web-{role}", role) for role in ("operator", "viewer")}


# the point the tests restore and browse: the guest fixture's backup (the backup test's newer
# one once it ran: both hold NOTE)
state: dict[str, Any] = {}


@pytest.fixture
def signed_out(browser: Any, host: Host) -> Any:
    """The module's browser with no session: whatever an earlier test left, its cookies go."""
    browser.get(f"{host.url}/login")
    browser.delete_all_cookies()
    browser.set_window_size(*DESKTOP)
    return browser


@pytest.fixture
def as_operator(signed_out: Any, host: Host, tokens: dict[str, str]) -> Any:
    """The module's browser signed in as an operator."""
    login(signed_out, host, tokens["operator"])
    return signed_out


def css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def one(driver: Any, selector: str, timeout: float = 30) -> Any:
    return wait_for(
        lambda: css(driver, selector)[:1] and css(driver, selector)[0],
        timeout,
        lambda: f"no {selector} on {driver.current_url}:\n{driver.page_source[:3000]}",
    )


def alerts(driver: Any) -> str:
    return " | ".join(a.text for a in css(driver, '[role="alert"]'))


def login(driver: Any, host: Host, token: str) -> None:
    driver.get(f"{host.url}/login")
    one(driver, "#token").send_keys(token)
    one(driver, 'button[data-action="login"]').click()
    wait_for(lambda: "/login" not in driver.current_url, 30, lambda: alerts(driver))


def logout(driver: Any) -> None:
    one(driver, 'button[data-action="logout"]').click()
    wait_for(lambda: "/login" in driver.current_url, 30, lambda: driver.current_url)


def backup_form(driver: Any, host: Host) -> tuple[str, dict[str, str]]:
    """The VM page's backup form as the signed-in operator sees it: its address and fields
    (what a viewer or a forged page will try to post)."""
    driver.get(f"{host.url}/vms/{VM}")
    form = one(driver, 'form[data-action="backup"]')
    fields = {
        i.get_attribute("name"): i.get_attribute("value") or ""
        for i in form.find_elements("css selector", "input[name], select[name]")
    }
    return str(form.get_attribute("action")), fields


def post_status(driver: Any, url: str, fields: dict[str, str]) -> int:
    """POST ``fields`` as a form from the page (its cookie and origin): the answer's status."""
    status: int = driver.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {method: 'POST', body: new URLSearchParams(arguments[1]),"
        " redirect: 'manual'}).then(function (r) { done(r.status); },"
        " function (e) { done(String(e)); });",
        url,
        fields,
    )
    return status


def get_status(driver: Any, url: str) -> int:
    status: int = driver.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(function (r) { done(r.status); },"
        " function (e) { done(String(e)); });",
        url,
    )
    return status


def domain_xml(name: str) -> str:
    return subprocess.run(
        ["virsh", "-c", "qemu:///system", "dumpxml", name],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def job_state(driver: Any, job: str) -> str:
    return str(css(driver, f'[data-job-state="{job}"]')[0].text.strip())


def watch_job(driver: Any) -> str:
    """On a job's page: start noting what its bar and state show, in sessionStorage (a reload
    once the job ended does not wipe it); the job's id."""
    job = str(one(driver, "progress[data-job]").get_attribute("data-job"))
    driver.execute_script(
        """
        sessionStorage.removeItem('seen');
        var bar = document.querySelector('progress[data-job="' + arguments[0] + '"]');
        var text = document.querySelector('[data-job-state="' + arguments[0] + '"]');
        var seen = {values: [], states: []};
        function note() {
          var v = bar.value, t = text.textContent.trim();
          var n = seen.states.length;
          if (n && seen.states[n - 1] === t && seen.values[n - 1] === v) return;
          seen.values.push(v);
          seen.states.push(t);
          sessionStorage.setItem('seen', JSON.stringify(seen));
        }
        note();
        new MutationObserver(note).observe(text, {childList: true, characterData: true,
                                                  subtree: true});
        new MutationObserver(note).observe(bar, {attributes: true});
        """,
        job,
    )
    return job


def follow_job(driver: Any, screens: Screens, job: str, name: str) -> None:
    """The page ``watch_job`` watches: its bar and state follow the job live (from
    /v1/events, no reload of the page) from a state that is not final to DONE at 100."""

    def seen() -> Any:
        raw = driver.execute_script("return sessionStorage.getItem('seen')")
        got = json.loads(raw) if raw else {"states": [], "values": []}
        return got if {"DONE", "FAILED", "CANCELLED"} & set(got["states"]) else None

    got = wait_for(seen, JOB_TIMEOUT, lambda: f"job {job} did not end: {driver.page_source}")
    assert got["states"][0] in ("QUEUED", "RUNNING"), got  # what the page was served with
    # noted by the page it was served as (a reload does not run the watcher): live, to DONE
    assert got["states"][-1] == "DONE" and got["values"][-1] == 100, got
    wait_for(lambda: settled_state(driver, job) == "DONE", 30, lambda: driver.page_source)
    screens.shot(driver, f"{name}-done")


def settled_state(driver: Any, job: str) -> str | None:
    """The job's state on the page, None while it reloads (or is still to reload: a page made
    while the job ran reloads once it ended, and a navigation started before that reload would
    lose to it)."""
    from selenium.common.exceptions import WebDriverException

    try:
        if css(driver, "[data-reload-when-ended]"):
            return None
        return job_state(driver, job) if css(driver, f'[data-job-state="{job}"]') else None
    except WebDriverException:
        return None


# --- the tests --------------------------------------------------------------------------------
def test_operator_logs_in_and_sees_the_vm(signed_out, host, guest, tokens, screens) -> None:
    browser = signed_out
    browser.get(f"{host.url}/")
    wait_for(lambda: "/login" in browser.current_url, 30, lambda: browser.current_url)
    screens.shot(browser, "login")
    login(browser, host, tokens["operator"])
    screens.shot(browser, "overview")
    cookie = browser.get_cookie("vmkeep_session")
    assert cookie is not None and cookie["httpOnly"] is True, cookie
    assert cookie["sameSite"] == "Strict", cookie
    assert browser.execute_script("return document.cookie").find("vmkeep_session") == -1

    browser.get(f"{host.url}/vms")
    row = one(browser, f'tr[data-vm="{VM}"]')
    assert VM in row.text
    assert css(browser, f'tr[data-vm="{VM}"] [data-action]'), "an operator has action buttons"
    screens.shot(browser, "vms")


def test_backup_from_the_vm_page_shows_live_progress(
    as_operator, host, guest, tokens, screens
) -> None:
    browser = as_operator
    browser.get(f"{host.url}/vms/{VM}")
    form = one(browser, 'form[data-action="backup"]')
    screens.shot(browser, "vm-page")
    # another client's download, held open, holds the daemon's one work slot (files requests
    # and jobs share them): the backup waits QUEUED until it is let go, in front of the page
    with httpx.Client(base_url=host.url, timeout=60) as api, api.stream(
        "GET", f"/v1/backups/{state['backup']}/files/content", params={"path": HOLD},
        headers={"Authorization": f"Bearer {tokens['operator']}"},
    ) as held:  # fmt: skip
        assert held.status_code == 200, held.read()
        received = held.iter_raw(1 << 16)  # kept: a dropped iterator closes the download
        next(received)
        form.find_element("css selector", 'button[data-action="backup"]').click()
        wait_for(lambda: "/jobs/" in browser.current_url, 60, lambda: alerts(browser))
        job = watch_job(browser)
        assert job_state(browser, job) == "QUEUED"
        screens.shot(browser, "backup-job-queued")
    follow_job(browser, screens, job, "backup-job")

    backups: Any = host.cli("backups", "list", "--json").json()
    newest = max(backups, key=lambda b: b["id"])
    assert newest["id"] != state["backup"] or len(newest["increments"]) == 2, backups
    assert newest["vm"] == VM and newest["increments"][-1]["status"] == "VALID", newest
    state["backup"] = newest["id"]  # the page's: restored and browsed below
    browser.get(f"{host.url}/jobs")
    one(browser, "progress[data-job]")
    screens.shot(browser, "jobs")


def test_restore_as_a_new_vm_through_the_wizard(as_operator, host, guest, screens) -> None:
    browser = as_operator
    bid = state["backup"]
    browser.get(f"{host.url}/restore?backup={bid}&increment=99")  # no such point: pick again
    assert f"Backup {bid} has no point 99" in alerts(browser)
    browser.get(f"{host.url}/restore")
    one(browser, f'tr[data-backup="{bid}"] a[data-step="backup"]').click()
    point = one(browser, 'input[name="increment"]:checked').get_attribute("value")
    screens.shot(browser, "restore-1-point")
    one(browser, 'button[data-step="point"]').click()
    one(browser, "#kind-new").click()
    screens.shot(browser, "restore-2-how")
    one(browser, 'button[data-step="kind"]').click()

    # a name that is taken: refused in words, the form keeps what was typed
    one(browser, "#f-name").send_keys(VM)
    one(browser, "#f-no_nic").click()
    one(browser, 'button[data-action="restore"]').click()
    said = wait_for(lambda: alerts(browser), 60, lambda: browser.page_source[:3000])
    assert VM in said and "exist" in said, said
    assert one(browser, "#f-name").get_attribute("value") == VM
    assert one(browser, "#f-no_nic").is_selected()
    screens.shot(browser, "restore-refused")

    # in place, while the VM runs: the state is refused in words, nothing is queued
    jobs_before = len(host.cli("jobs", "list", "--json").json())  # type: ignore[arg-type]
    browser.get(f"{host.url}/restore?backup={bid}&increment={point}&kind=in-place")
    one(browser, 'button[data-action="restore"]').click()
    browser.switch_to.alert.accept()  # "Roll ... back to this point?"
    said = wait_for(lambda: alerts(browser), 60, lambda: browser.page_source[:3000])
    assert "RUNNING" in said and "restore in place" in said, said
    assert len(host.cli("jobs", "list", "--json").json()) == jobs_before  # type: ignore[arg-type]
    screens.shot(browser, "restore-in-place-refused")
    browser.get(f"{host.url}/restore?backup={bid}&increment={point}&kind=new")
    one(browser, "#f-no_nic").click()

    name = one(browser, "#f-name")
    name.clear()
    name.send_keys(RESTORED)
    screens.shot(browser, "restore-3-options")
    one(browser, 'button[data-action="restore"]').click()
    wait_for(lambda: "/jobs/" in browser.current_url, 60, lambda: alerts(browser))
    job = watch_job(browser)
    wait_for(
        lambda: settled_state(browser, job) == "DONE", JOB_TIMEOUT, lambda: browser.page_source
    )
    screens.shot(browser, "restore-job-done")

    browser.get(f"{host.url}/vms")
    one(browser, f'tr[data-vm="{RESTORED}"]')
    screens.shot(browser, "vms-with-restored")
    # the options ticked in the wizard reached the restore: --no-nic dropped the guest's NIC
    assert "<interface" in domain_xml(VM)
    assert "<interface" not in domain_xml(RESTORED)


def test_download_a_file_of_the_point(as_operator, host, guest, screens, downloads) -> None:
    browser = as_operator
    bid = state["backup"]
    browser.get(f"{host.url}/files?backup={bid}")
    one(browser, 'tr[data-file="/web"] a').click()
    link = one(browser, 'a[data-download="/web/note.bin"]')
    screens.shot(browser, "files")
    link.click()
    got = downloads / "note.bin"
    wait_for(
        lambda: got.exists() and not list(downloads.glob("*.crdownload")),
        120,
        lambda: f"no download in {downloads}: {list(downloads.iterdir())}",
    )
    assert hashlib.sha256(got.read_bytes()).hexdigest() == guest

    # a path the point does not hold: said in words, with the folder's page
    browser.get(f"{host.url}/files?backup={bid}&path=/nowhere")
    assert "no such file" in alerts(browser)


def test_a_form_without_its_csrf_token_is_refused(as_operator, host, guest) -> None:
    browser = as_operator
    url, fields = backup_form(browser, host)
    jobs_before = len(host.cli("jobs", "list", "--json").json())  # type: ignore[arg-type]
    without = {k: v for k, v in fields.items() if k != "csrf"}
    assert post_status(browser, url, without) == 403
    assert post_status(browser, url, without | {"csrf": "0" * 64}) == 403
    assert len(host.cli("jobs", "list", "--json").json()) == jobs_before  # type: ignore[arg-type]


def test_a_viewer_sees_no_buttons_and_gets_403(as_operator, host, guest, tokens, screens) -> None:
    browser = as_operator
    url, fields = backup_form(browser, host)  # the operator's form, that the viewer posts
    logout(browser)
    login(browser, host, tokens["viewer"])
    browser.get(f"{host.url}/vms")
    one(browser, f'tr[data-vm="{VM}"]')
    assert css(browser, "tr[data-vm] [data-action]") == []
    screens.shot(browser, "vms-viewer")
    browser.get(f"{host.url}/vms/{VM}")
    one(browser, "h1")
    assert css(browser, 'form[data-action="backup"], button[data-action="backup"]') == []
    # the viewer's own valid CSRF token (its logout form has it), on the operator's form
    csrf = one(browser, 'form[action="/logout"] input[name="csrf"]').get_attribute("value")
    jobs_before = len(host.cli("jobs", "list", "--json").json())  # type: ignore[arg-type]
    assert post_status(browser, url, fields | {"csrf": csrf}) == 403
    assert len(host.cli("jobs", "list", "--json").json()) == jobs_before  # type: ignore[arg-type]
    # a viewer sees no file contents: the browser and the download answer 403
    files = f"/files?backup={state['backup']}"
    assert get_status(browser, files) == 403
    assert get_status(browser, f"/files/download?backup={state['backup']}&path={NOTE}") == 403
    logout(browser)


def test_pages_at_phone_width(as_operator, host, guest, screens) -> None:
    browser = as_operator
    browser.set_window_size(*PHONE)
    try:
        for page, name in (("/", "phone-overview"), ("/vms", "phone-vms"),
                           (f"/restore?backup={state['backup']}", "phone-restore")):  # fmt: skip
            browser.get(f"{host.url}{page}")
            one(browser, "main h1")
            width = browser.execute_script("return document.documentElement.scrollWidth")
            assert width <= PHONE[0] + 1, f"{page} is {width} px wide at phone width"
            screens.shot(browser, name)
    finally:
        browser.set_window_size(*DESKTOP)
