"""A real browser for the web dashboard's tests: Debian's headless Chromium driven by Selenium
through Debian's chromedriver (no browser download), a screenshot per step into
``.pytest-screens/<run>/``, and a real ``vmkeep daemon`` on loopback over a catalog of the
module's own (the tests share one daemon and one lab guest).

Without Chromium the tests fail with the packages to install: they never skip."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .conftest import LAB_DIR, Result, running_daemon

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENS = Path(__file__).resolve().parents[2] / ".pytest-screens"
DESKTOP = (1280, 800)
PHONE = (390, 844)


@dataclass
class Screens:
    """Numbered screenshots of one run: ``shot(driver, "vm-page")`` -> ``03-vm-page.png``."""

    folder: Path
    taken: list[Path] = field(default_factory=list)

    def shot(self, driver: Any, name: str) -> Path:
        path = self.folder / f"{len(self.taken) + 1:02d}-{re.sub(r'[^a-z0-9-]', '-', name)}.png"
        driver.save_screenshot(str(path))
        self.taken.append(path)
        return path


def screens_folder() -> Screens:
    run = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    folder = SCREENS / run
    folder.mkdir(parents=True, exist_ok=True)
    return Screens(folder)


def start_chromium(download_dir: Path) -> Any:
    """Headless Chromium at 1280x800 whose downloads land in ``download_dir``."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(
            f"the web tests need Debian's Chromium: {', '.join(missing)} missing "
            "(apt-get install chromium chromium-driver, or run scripts/setup.sh)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={DESKTOP[0]},{DESKTOP[1]}", "--lang=en-US"):  # fmt: skip
        opts.add_argument(arg)
    opts.add_experimental_option(
        "prefs",
        {
            "download.default_directory": str(download_dir),
            "download.prompt_for_download": False,
            "safebrowsing.enabled": False,
        },
    )
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    driver.set_window_size(*DESKTOP)
    driver.set_page_load_timeout(120)
    # headless Chromium writes downloads only where it is told to
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)}
    )
    return driver


def wait_for(what: Callable[[], Any], timeout: float, message: Callable[[], str]) -> Any:
    """Poll ``what`` until it returns something true; its value."""
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(message())
        time.sleep(0.25)


@dataclass
class Host:
    """The module's own vmkeep: its environment (catalog, data dir, config), the CLI run in it,
    and the daemon's address."""

    env: dict[str, str]
    data: Path
    url: str = ""

    def cli(self, *args: str, check: int | None = 0, timeout: float = 600) -> Result:
        proc = subprocess.run(
            [sys.executable, "-m", "vmkeep.cli.main", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
        )
        res = Result(proc.returncode, proc.stdout, proc.stderr)
        if check is not None:
            assert res.code == check, f"vmkeep {' '.join(args)} -> {res.code}\n{res.out}\n{res.err}"
        return res

    def token(self, name: str, role: str) -> str:
        made: Any = self.cli("token", "create", name, "--role", role, "--json").json()
        return str(made["token"])


@contextmanager
def host_with_daemon(tmp: Path, log: Path, *daemon_args: str) -> Iterator[Host]:
    """A fresh catalog in a data dir QEMU can reach, and ``vmkeep daemon [daemon_args]`` serving
    it on a free loopback port (its stderr in ``log``). The test functions' own isolated environment
    (``clean_env``) does not touch it: the daemon and ``Host.cli`` carry theirs."""
    home = tmp / "home"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "config.toml"
    config.write_text("version = 1\n")
    data = LAB_DIR.parent / "e2e-data" / f"web-{uuid.uuid4().hex[:8]}"
    data.mkdir(parents=True)
    data.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMKEEP_")}
    env |= {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_DATA_HOME": str(home / ".local/share"), "VMKEEP_DATA_DIR": str(data),
            "VMKEEP_CONFIG": str(config)}  # fmt: skip
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        with running_daemon(*daemon_args, log=log) as (_proc, api):
            os.environ.clear()
            os.environ.update(saved)
            yield Host(env, data, str(api.base_url).rstrip("/"))
    finally:
        os.environ.clear()
        os.environ.update(saved)
        subprocess.run(["rm", "-rf", str(data)], check=False)
