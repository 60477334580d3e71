"""A remote datastore's host may be a ``Host`` alias of the ssh config: ``ssh -G`` (the real
binary: it reads the config and never connects) says what ssh would use, and ``--opt`` values win.
The test's HOME (tests/conftest.py: clean_env) holds the ~/.ssh/config. The round trip through a
real sshd is in tests/contract/test_ssh_alias.py."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from vmkeep.config import load_config
from vmkeep.datastores import make_driver
from vmkeep.datastores.ssh import SshLogin, SshTarget, parse_ssh_g
from vmkeep.engine.core import stores
from vmkeep.engine.core.context import Context
from vmkeep.errors import DatastoreError, DatastoreUnreachable
from vmkeep.lab.sshd import free_port

NAS = """\
Host nas
    HostName 10.1.2.3
    Port 2200
    User backup
    IdentityFile ~/.ssh/nas_key
    IdentityFile %d/.ssh/%r-at-%h
"""


def ssh_config(text: str) -> Path:
    """``text`` as the ~/.ssh/config of the test's HOME."""
    folder = Path.home() / ".ssh"
    folder.mkdir(mode=0o700, exist_ok=True)
    config = folder / "config"
    config.write_text(text)
    config.chmod(0o600)
    return config


def test_ssh_g_output_is_read_keyword_by_keyword() -> None:
    out = "host nas\nuser backup\nhostname 10.1.2.3\nport 2200\n"
    out += "identityfile ~/.ssh/a\nidentityfile /k/b c\n\n"
    assert parse_ssh_g(out) == {
        "host": ["nas"],
        "user": ["backup"],
        "hostname": ["10.1.2.3"],
        "port": ["2200"],
        "identityfile": ["~/.ssh/a", "/k/b c"],
    }


def test_an_alias_resolves_to_its_host_name_port_user_and_keys() -> None:
    ssh_config(NAS)
    home = Path.home()
    assert SshTarget(host="nas").resolve("far") == SshLogin(
        host="10.1.2.3",
        user="backup",
        port=2200,
        identities=(home / ".ssh/nas_key", home / ".ssh/backup-at-10.1.2.3"),
    )


def test_options_given_win_over_the_ssh_config(tmp_path: Path) -> None:
    ssh_config(NAS)
    key = tmp_path / "other_key"
    target = SshTarget(host="nas", user="root", port=22, identity=key, known_hosts=tmp_path / "k")
    login = target.resolve("far")
    assert login == SshLogin("10.1.2.3", "root", 22, (key,), tmp_path / "k")
    argv = login.ssh_argv()
    assert argv[argv.index("-p") + 1] == "22" and argv.count("-i") == 1 and str(key) in argv
    assert "nas_key" not in " ".join(argv)


def test_a_host_that_is_no_alias_is_itself_with_ssh_defaults() -> None:
    ssh_config(NAS)
    login = SshTarget(host="backup.example.org").resolve("far")
    assert (login.host, login.port) == ("backup.example.org", 22)
    assert login.user == pwd.getpwuid(os.getuid()).pw_name  # ssh's default: the local user
    # no IdentityFile configured: vmkeep passes none and ssh tries its own keys, as before
    assert login.identities == () and "-i" not in login.ssh_argv()


def test_both_drivers_connect_to_what_the_alias_names(tmp_path: Path) -> None:
    ssh_config(NAS)
    rsync = make_driver("rsync", "far", {"host": "nas", "path": "/srv/vmkeep"})
    assert rsync.options.host == "nas"  # the catalog keeps the alias: resolved on every use
    login = rsync.ssh_target()
    assert login.login == "backup@10.1.2.3" and "-p 2200" in login.ssh_command()
    assert rsync._remote_name("/srv/vmkeep/x") == "backup@10.1.2.3:/srv/vmkeep/x"  # type: ignore[attr-defined]
    pf = tmp_path / "pass"
    pf.write_text("x")
    restic = make_driver("restic", "off", {"repo": "sftp:nas:/srv/repo", "password_file": str(pf)})
    sftp = next(a for a in restic._argv(["snapshots"]) if a.startswith("sftp.command="))  # type: ignore[attr-defined]
    assert sftp.endswith("backup@10.1.2.3 -s sftp") and "-p 2200" in sftp
    assert str(Path.home() / ".ssh/nas_key") in sftp
    given = make_driver(
        "restic",
        "off",
        {"repo": "sftp:root@nas:/srv/repo", "password_file": str(pf), "port": 2222},
    )
    sftp = next(a for a in given._argv(["snapshots"]) if a.startswith("sftp.command="))  # type: ignore[attr-defined]
    assert sftp.endswith("root@10.1.2.3 -s sftp") and "-p 2222" in sftp


@pytest.mark.parametrize(
    ("config", "text"),
    [
        ("Host nas\n    Bogus yes\n", "Bad configuration option: bogus"),
        ("Host nas\n    HostName -oProxyCommand=id\n", "a host is a name or address"),
        ("Host nas\n    User a;b\n", "a user is"),
        ("Host nas\n    IdentityFile ~/.ssh/%C\n", "does not expand; give --opt identity"),
    ],
)
def test_an_ssh_config_vmkeep_cannot_use_is_named(config: str, text: str) -> None:
    ssh_config(config)
    with pytest.raises(DatastoreError) as err:
        SshTarget(host="nas").resolve("far")
    assert "'nas'" in str(err.value) and text in str(err.value), str(err.value)


def test_datastore_add_looks_up_the_host_key_of_the_aliased_address(tmp_path: Path) -> None:
    ctx = Context(load_config())
    ssh_config("Host bad\n    Bogus yes\n")
    with pytest.raises(DatastoreError, match="'ssh -G bad' failed") as err:
        stores.add(ctx, "far", "rsync", {"host": "bad", "path": "/srv"})
    assert not isinstance(err.value, DatastoreUnreachable)  # a config to fix: never retried
    port = free_port()  # nothing listens there
    ssh_config(f"Host nas\n    HostName 127.0.0.1\n    Port {port}\n")
    with pytest.raises(DatastoreUnreachable, match=f"no SSH host key from 127.0.0.1:{port}"):
        stores.add(ctx, "far", "rsync", {"host": "nas", "path": "/srv"})
    assert stores.list_all(ctx) == []
