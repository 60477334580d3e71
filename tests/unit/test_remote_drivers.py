"""Remote driver logic without a network: option validation, the retry wrapper, error
classification and URLs (the real round trips are in tests/contract and tests/e2e)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmkeep.datastores import make_driver
from vmkeep.datastores.base import DatastoreDriver
from vmkeep.datastores.restic import ResticDriver
from vmkeep.datastores.retry import Retrying
from vmkeep.datastores.ssh import classify, parse_df
from vmkeep.engine.points.copy import parse_url
from vmkeep.errors import DatastoreError, DatastoreUnreachable, InvalidValue


def test_a_restic_password_is_never_an_option(tmp_path: Path) -> None:
    with pytest.raises(InvalidValue, match="password_file") as err:
        make_driver("restic", "r", {"repo": str(tmp_path), "password": "hunter2"})
    assert "hunter2" not in str(err.value)  # the refusal never echoes the secret
    with pytest.raises(InvalidValue, match="exactly one"):
        make_driver("restic", "r", {"repo": str(tmp_path)})


def test_restic_argv_has_the_password_file_not_the_password(tmp_path: Path) -> None:
    pf = tmp_path / "p"
    pf.write_text("hunter2")
    drv = make_driver(
        "restic",
        "r",
        {"repo": "sftp:backup@nas:/srv/repo", "password_file": str(pf), "port": 2222},
    )
    assert isinstance(drv, Retrying) and isinstance(drv.inner, ResticDriver)
    argv = drv.inner._argv(["snapshots"])
    assert "hunter2" not in " ".join(argv) and str(pf) not in argv  # restic's environment has it
    assert drv.inner._env()["RESTIC_PASSWORD_FILE"] == str(pf)
    sftp = next(a for a in argv if a.startswith("sftp.command="))
    assert "-p 2222" in sftp and "StrictHostKeyChecking=yes" in sftp and "backup@nas" in sftp


@pytest.mark.parametrize(
    "repo", ["sftp:nas", "sftp:user@nas:relative", "s3:host/bucket", "rest:http://x/"]
)
def test_bad_restic_repos_are_refused(repo: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidValue, match="repo"):
        make_driver("restic", "r", {"repo": repo, "password_file": str(tmp_path / "p")})


def test_rsync_options_refuse_what_breaks_atomic_stores() -> None:
    with pytest.raises(InvalidValue, match="--inplace"):
        make_driver("rsync", "s", {"host": "h", "path": "/srv", "args": "-a --inplace"})
    with pytest.raises(InvalidValue, match="absolute"):
        make_driver("rsync", "s", {"host": "h", "path": "srv"})
    with pytest.raises(InvalidValue, match="absolute"):
        make_driver("rsync", "s", {"host": "h", "path": "/"})


class Flaky(DatastoreDriver):
    """Fails ``failures`` times with ``error``, then works."""

    driver = "flaky"
    options_model = ResticDriver.options_model
    capabilities = frozenset({"remote"})

    def __init__(self, failures: int, error: Exception) -> None:
        self.name, self.calls, self.failures, self.error = "flaky", 0, failures, error

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error

    def monitor(self) -> tuple[int, int]:
        self._maybe_fail()
        return 10, 5

    def backup(self, chain: str, staged: list[Path]) -> None:
        self._maybe_fail()

    def restore(self, chain: str, names: list[str], workdir: Path) -> dict[str, Path]:
        self._maybe_fail()
        return {}

    def rm(self, chain: str, names: list[str] | None = None) -> None:
        self._maybe_fail()

    def chains(self) -> list[str]:
        self._maybe_fail()
        return []


def _wrap(inner: Flaky, attempts: int = 4) -> tuple[Retrying, list[float]]:
    sleeps: list[float] = []
    inner.options = None  # type: ignore[assignment]
    return Retrying(inner, attempts=attempts, first_delay=0.5, sleep=sleeps.append), sleeps


def test_transient_errors_are_retried_with_exponential_back_off() -> None:
    inner = Flaky(2, DatastoreUnreachable("flaky", "connection refused", 0))
    drv, sleeps = _wrap(inner)
    assert drv.monitor() == (10, 5)
    assert inner.calls == 3 and sleeps == [0.5, 1.0]


def test_retries_run_out_and_the_error_says_how_many() -> None:
    inner = Flaky(99, DatastoreUnreachable("flaky", "connection refused", 0))
    drv, sleeps = _wrap(inner, attempts=4)
    with pytest.raises(DatastoreUnreachable, match="retried 3 times"):
        drv.backup("vm/1", [])
    assert inner.calls == 4 and sleeps == [0.5, 1.0, 2.0]


def test_a_final_error_is_not_retried() -> None:
    inner = Flaky(99, DatastoreError("flaky", "login refused"))
    drv, sleeps = _wrap(inner)
    with pytest.raises(DatastoreError, match="login refused"):
        drv.rm("vm/1")
    assert inner.calls == 1 and sleeps == []


@pytest.mark.parametrize(
    ("stderr", "kind", "text"),
    [
        ("ssh: connect to host 10.0.0.9 port 22: Connection refused", DatastoreUnreachable, ""),
        ("root@h: Permission denied (publickey).", DatastoreError, "--opt identity"),
        ("Host key verification failed.", DatastoreError, "known_hosts"),
        ("rsync error: some files could not be transferred", DatastoreError, "rsync error"),
    ],
)
def test_ssh_failures_are_classified(stderr: str, kind: type, text: str) -> None:
    err = classify("ds1", "store", stderr)
    assert type(err) is kind and "ds1" in str(err) and text in str(err)


def test_remote_df_and_urls() -> None:
    out = "Filesystem 1-blocks Used Available Capacity Mounted on\n/dev/sda1 1000 400 600 40% /\n"
    assert parse_df("d", out) == (1000, 600)
    with pytest.raises(DatastoreError):
        parse_df("d", "garbage")
    assert parse_url("restic://r1/vm-a/7/1.vda.qcow2") == ("restic", "r1", "vm-a/7", "1.vda.qcow2")
    for bad in ("restic://r1/vm-a/1.vda.qcow2", "r1/vm-a/7/x", "rsync:///vm/7/x"):
        with pytest.raises(InvalidValue, match="URL"):
            parse_url(bad)


def test_an_rsync_store_clears_the_folder_a_store_broken_with_the_host_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store whose host died mid-transfer could not remove its .partial-* folder; the next
    store into the chain does (ssh and rsync run here, on local folders)."""
    import shutil
    import subprocess

    store = tmp_path / "store"
    drv = make_driver("rsync", "s", {"host": "h", "path": str(store)})
    inner = getattr(drv, "inner", drv)

    def ssh(command: list[str], what: str, timeout: float | None = 600) -> str:
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout

    def rsync(sources: list[str], dest: str, what: str) -> None:
        for src in sources:
            shutil.copy(src, dest.split(":", 1)[1])

    monkeypatch.setattr(inner, "_ssh", ssh)
    monkeypatch.setattr(inner, "_rsync", rsync)
    chain = store / "vm-a" / "7"
    (chain / ".partial-0123456789ab").mkdir(parents=True)
    (chain / ".partial-0123456789ab" / "1.vda.qcow2").write_bytes(b"half")
    (chain / "0.vda.qcow2").write_bytes(b"full")
    staged = tmp_path / "1.vda.qcow2"
    staged.write_bytes(b"increment")
    inner.backup("vm-a/7", [staged])
    assert sorted(p.name for p in chain.iterdir()) == ["0.vda.qcow2", "1.vda.qcow2"]
    assert (chain / "1.vda.qcow2").read_bytes() == b"increment"


def test_restic_whose_ssh_died_mid_transfer_is_unreachable() -> None:
    """Seen when the SFTP server was killed in the middle of a backup: retried, exit 24."""
    from vmkeep.datastores.ssh import classify
    from vmkeep.errors import DatastoreUnreachable

    err = classify(
        "rs",
        "store",
        "Fatal: unable to save snapshot: ssh command exited: exit status 255\n"
        "error in cleanup handler: ssh command exited: exit status 255",
    )
    assert isinstance(err, DatastoreUnreachable) and err.exit_code == 24
    refused = classify(
        "rs", "store", "Permission denied (publickey).\nssh command exited: exit status 255"
    )
    assert not isinstance(refused, DatastoreUnreachable)
