"""An SSH datastore whose host is a ``Host`` alias of the user's ~/.ssh/config (the test's HOME,
tests/conftest.py: clean_env) that names the contract sshd's address, port, user and key: added
as users add it (``stores.add``: the host key is learned from the aliased address), then a
store/fetch round trip over the real sshd; ``--opt`` values win over the config."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from vmkeep.checksums import digest_file
from vmkeep.config import load_config
from vmkeep.datastores import make_driver
from vmkeep.engine.core import stores
from vmkeep.engine.core.context import Context
from vmkeep.errors import DatastoreError, DatastoreUnreachable
from vmkeep.lab.sshd import Sshd, free_port

ALIAS = "backup-nas"
KINDS = ["rsync", "restic-sftp"]


def alias_config(s: Sshd) -> None:
    """~/.ssh/config of the test's HOME: ALIAS is the contract sshd."""
    folder = Path.home() / ".ssh"
    folder.mkdir(mode=0o700, exist_ok=True)
    (folder / "config").write_text(
        f"Host {ALIAS}\n"
        f"    HostName {s.host}\n"
        f"    Port {s.port}\n"
        f"    User {s.user}\n"
        f"    IdentityFile {s.client_key}\n"
    )


def options(kind: str, where: Path, password_file: Path) -> tuple[str, dict[str, Any]]:
    """(driver, options) naming the host by its alias only: no port, user or key given."""
    if kind == "rsync":
        return "rsync", {"host": ALIAS, "path": str(where / "remote")}
    return "restic", {
        "repo": f"sftp:{ALIAS}:{where / 'repo'}",
        "password_file": str(password_file),
        "init": True,
    }


@pytest.mark.parametrize("kind", KINDS)
def test_a_datastore_added_by_its_ssh_config_alias_stores_and_fetches(
    kind: str, sshd: Sshd, password_file: Path, tmp_path: Path
) -> None:
    alias_config(sshd)
    ctx = Context(load_config())
    driver, opts = options(kind, tmp_path, password_file)
    added = stores.add(ctx, "far", driver, opts)
    # the host key was fetched from the address the alias names, and is the sshd's own
    assert any("ED25519" in k for k in added["host_keys_learned"]), added
    known = (ctx.config.data_dir / "known_hosts" / "far").read_text().split()
    pub = sshd.host_key.with_suffix(".pub").read_text().split()
    assert known[:3] == [f"[{sshd.host}]:{sshd.port}", pub[0], pub[1]], known
    # the catalog keeps the alias (resolved again on every use), no port or user made up
    shown = added["options"]
    assert ALIAS in (shown.get("host") or shown["repo"]) and shown.get("port") is None
    assert added["error"] is None and added["total_bytes"] > 0

    with ctx.catalog.session() as s:
        drv = stores.driver_of(stores.find_datastore(s, "far"))
    staged = tmp_path / "staged"
    staged.mkdir()
    files = []
    for name, size in (("0.vda.qcow2", 3 << 20), ("0.domain.xml", 300)):
        (staged / name).write_bytes(os.urandom(size))
        files.append(staged / name)
    want = {p.name: digest_file(p) for p in files}
    drv.backup("vm1/7", files)
    assert "vm1/7" in drv.chains()
    got = drv.restore("vm1/7", sorted(want), tmp_path / "out")
    assert {n: digest_file(p) for n, p in got.items()} == want
    if kind == "rsync":  # the files are where the alias points: the sshd's file system
        assert sorted(p.name for p in (tmp_path / "remote" / "vm1" / "7").iterdir()) == sorted(want)


@pytest.mark.parametrize("kind", KINDS)
def test_options_given_win_over_the_alias_on_the_real_sshd(
    kind: str, sshd: Sshd, password_file: Path, tmp_path: Path
) -> None:
    alias_config(sshd)
    driver, opts = options(kind, tmp_path, password_file)
    opts |= {"known_hosts": str(sshd.known_hosts), "retries": 0}
    make_driver(driver, "far", opts).check()  # the alias alone logs in
    other_key = tmp_path / "other_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)], check=True
    )
    with pytest.raises(DatastoreError, match="login refused"):
        make_driver(driver, "far", opts | {"identity": str(other_key)}).check()
    # nothing listens on the port given (ssh's "connection refused" reaches restic's output only
    # sometimes: the error kind is the check); with the config's port the check would pass
    with pytest.raises(DatastoreUnreachable, match="'far' is unreachable"):
        make_driver(driver, "far", opts | {"port": free_port()}).check()
