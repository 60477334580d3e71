"""One driver contract suite, parametrized over every datastore driver (borgstore's
``pytest_generate_tests``, restic's ``test.Suite``): a new driver adds a case here, not a test file.

The SSH side is a real OpenSSH server on loopback with its own host and client keys."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vmkeep.datastores import DatastoreDriver, make_driver
from vmkeep.lab.sshd import Sshd, free_port

PASSWORD = "contract-secret-" + uuid.uuid4().hex


@dataclass
class Case:
    """How to build one driver: good options, and the variants the error tests need."""

    driver: str
    options: Callable[[], dict[str, Any]]
    remote: bool = False
    bad_credentials: dict[str, Any] | None = None  # option overrides that must be refused
    unreachable: dict[str, Any] | None = None  # option overrides for a host that is down
    secrets: list[str] = field(default_factory=list)

    def make(self, **overrides: Any) -> DatastoreDriver:
        opts = self.options() | overrides
        drv = make_driver(self.driver, f"ds-{self.driver}", opts)
        inner = getattr(drv, "inner", None)
        if inner is not None:  # retry fast in tests: the back-off itself is unit-tested
            drv.first_delay = 0.05  # type: ignore[attr-defined]
        return drv


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    with Sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture(scope="session")
def password_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("secret") / "restic-password"
    p.write_text(PASSWORD + "\n")
    p.chmod(0o600)
    wrong = p.with_name("wrong-password")
    wrong.write_text("not-the-password\n")
    return p


def _ssh_opts(s: Sshd) -> dict[str, Any]:
    return {"port": s.port, "identity": str(s.client_key), "known_hosts": str(s.known_hosts)}


CASES = ["dir", "restic-local", "restic-sftp", "rsync"]
CREDENTIAL_CASES = ["restic-local", "restic-sftp", "rsync"]  # dir: plain files, no login
REMOTE_CASES = ["restic-sftp", "rsync"]


@pytest.fixture(params=CASES)
def case(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    password_file: Path,
) -> Case:
    kind: str = request.param
    root = tmp_path_factory.mktemp(kind)
    if kind == "dir":
        return Case("dir", lambda: {"path": str(root / "store")})
    if kind == "restic-local":
        repo = root / "repo"
        c = Case(
            "restic",
            lambda: {"repo": str(repo), "password_file": str(password_file), "init": True},
            bad_credentials={"password_file": str(password_file.with_name("wrong-password"))},
            secrets=[PASSWORD],
        )
        c.make().check()  # init the repository once
        return c
    s: Sshd = request.getfixturevalue("sshd")
    other_key = root / "other_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)], check=True
    )
    down = {"port": free_port()}
    if kind == "restic-sftp":
        repo_path = root / "remote-repo"
        c = Case(
            "restic",
            lambda: {
                "repo": f"sftp:root@{s.host}:{repo_path}",
                "password_file": str(password_file),
                "init": True,
                **_ssh_opts(s),
            },
            remote=True,
            bad_credentials={"identity": str(other_key)},
            unreachable=down,
            secrets=[PASSWORD],
        )
        c.make().check()
        return c
    assert kind == "rsync"
    return Case(
        "rsync",
        lambda: {"host": s.host, "user": "root", "path": str(root / "remote"), **_ssh_opts(s)},
        remote=True,
        bad_credentials={"identity": str(other_key)},
        unreachable=down,
    )
