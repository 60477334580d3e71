"""Hypothesis over the CLI's names, paths, sizes and config values: never a traceback, only
documented exit codes, and never a write outside the example's own folder.

The real CLI runs in-process (``vmkeep.cli.main.main``) against a real SQLite catalog in a fresh
folder per example; only commands that need no libvirtd are driven here (e2e covers the rest).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from vmkeep.cli.main import main
from vmkeep.errors import all_error_classes

DOCUMENTED = {0, 1, 2, 130} | {cls.exit_code for cls in all_error_classes()}
# Places a stray write would land (the shared temp folder is left out: other processes write
# there; what this test makes is checked inside its sandbox instead).
SENTINELS = [Path("/"), Path("/var/lib/libvirt/qemu")]

# Names: anything a user could type, with the nasty cases made likely.
nasty = st.sampled_from(
    ["", ".", "..", "/", "12345", "0", "a/b", "../x", "-x", " ", "x" * 300, "é", "a\x00b", "~"]
    + ["afile", "afile/x", "../afile", "../afile/", "/proc/vmkeep", "newdir/"]
)
names = st.one_of(nasty, st.text(min_size=0, max_size=80))
segment = st.one_of(
    st.sampled_from(["..", ".", "d", "sub dir", "x.qcow2", "é", "-", "afile", "afile"]),
    st.text(st.characters(blacklist_characters="/\x00"), min_size=1, max_size=12),
)
rel_paths = st.lists(segment, min_size=1, max_size=3).map(
    lambda parts: "/".join(parts) if parts.count("..") < 2 else "d"  # stays inside the sandbox
)
numbers = st.one_of(
    st.sampled_from(["", "0", "-1", "1e9", "abc", "nan", "inf", "all", "3", " 7 ", "99999999999"]),
    st.integers().map(str),
    st.text(max_size=12),
)


# what libvirtd makes there itself, coming and going with the tests running at the same time:
# a domain's runtime folder (``domain-N-NAME``) and a capabilities probe's (``qmp-XXXXXX``)
LIBVIRT_OWN = ("domain-", "qmp-")


def snapshot() -> dict[Path, set[str]]:
    """The folders' entries, without libvirtd's own comings and goings (``LIBVIRT_OWN``)."""
    return {
        p: {e for e in os.listdir(p) if not e.startswith(LIBVIRT_OWN)}
        for p in SENTINELS
        if p.is_dir()
    }


@contextlib.contextmanager
def sandbox(env: dict[str, str]) -> Iterator[Path]:
    """A fresh folder as cwd, HOME and data dir; VMKEEP_* from ``env`` only."""
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    with tempfile.TemporaryDirectory(prefix="vmkeep-fuzz-") as tmp:
        root = Path(tmp)
        (root / "cwd").mkdir()
        (root / "afile").write_text("a file where a folder may be expected\n")
        (root / "cwd" / "afile").write_text("a file where a folder may be expected\n")
        for key in [k for k in os.environ if k.startswith("VMKEEP_")]:
            del os.environ[key]
        os.environ.update(
            {
                "HOME": str(root),
                "VMKEEP_DATA_DIR": str(root / "data"),
                "VMKEEP_CONFIG": str(root / "config.toml"),
            }
        )
        (root / "config.toml").write_text("version = 1\n")
        os.environ.update({k: v.replace("{root}", str(root)) for k, v in env.items()})
        os.chdir(root / "cwd")
        try:
            yield root
        finally:
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)


def run(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(list(argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
        else:
            code = 0
    return code, err.getvalue()


def check(code: int, err: str) -> None:
    assert "Traceback" not in err, err
    assert code in DOCUMENTED, (code, err)


FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@FUZZ
@given(name=names, path=st.one_of(rel_paths, nasty), driver=st.sampled_from(["dir", "zip", ""]))
def test_datastore_add(name: str, path: str, driver: str) -> None:
    assume("\x00" not in name + path)  # a NUL cannot reach a command line
    before = snapshot()
    with sandbox({}) as root:
        code, err = run("datastore", "add", name, "--driver", driver, "--path", path)
        check(code, err)
        if code == 0:
            code, err = run("datastore", "list", "--json")
            check(code, err)
            assert code == 0
        # nothing outside the sandbox
        made = {p.resolve() for p in root.rglob("*")}
        assert all(root.resolve() in (p, *p.parents) for p in made)
    assert snapshot() == before


@FUZZ
@given(name=names, vms=st.lists(names, min_size=1, max_size=3))
def test_group_create(name: str, vms: list[str]) -> None:
    assume(not any("\x00" in n for n in [name, *vms]))
    before = snapshot()
    with sandbox({}):
        check(*run("group", "create", name, *vms))
    assert snapshot() == before


@FUZZ
@given(vm=names, keep=numbers, mode=names, freeze=names)
def test_vm_config(vm: str, keep: str, mode: str, freeze: str) -> None:
    assume("\x00" not in vm + keep + mode + freeze)
    before = snapshot()
    with sandbox({}):
        check(*run("vm", "config", vm, "--keep-last", keep, "--mode", mode, "--fs-freeze", freeze))
    assert snapshot() == before


@FUZZ
@given(name=names, keep=numbers, mode=names, exclude=names, vm=names)
def test_pool_create_and_vm_pool(name: str, keep: str, mode: str, exclude: str, vm: str) -> None:
    assume("\x00" not in name + keep + mode + exclude + vm)
    before = snapshot()
    with sandbox({}):
        check(*run("pool", "create", name, "--keep-last", keep, "--mode", mode))
        check(*run("pool", "set", name, "--exclude", exclude, "--keep-last", "unset"))
        check(*run("vm", "config", vm, "--pool", name))
        check(*run("pool", "show", name, "--json"))
        check(*run("pool", "delete", name))
    assert snapshot() == before


@FUZZ
@given(backup=numbers, inc=numbers, name=names, path=st.one_of(rel_paths, nasty), disk=names)
def test_restore_and_show(backup: str, inc: str, name: str, path: str, disk: str) -> None:
    assume("\x00" not in backup + inc + name + path + disk)
    before = snapshot()
    with sandbox({}):
        check(*run("backups", "show", backup, "--json"))
        check(*run("restore", backup, "--increment", inc, "--name", name, "--path", path))
        check(*run("restore", backup, "--disk", disk, "--path", path, "--force"))
    assert snapshot() == before


config_values = st.one_of(numbers, nasty, st.text(max_size=30))


@FUZZ
@given(
    timeout=config_values,
    max_seconds=config_values,
    catalog=st.one_of(rel_paths, nasty),
    data=st.one_of(rel_paths, nasty),
    uri=config_values,
    file_bytes=st.one_of(st.binary(max_size=80), st.sampled_from([b"version = 2\n", b"[x]\n"])),
)
def test_config_values(
    timeout: str, max_seconds: str, catalog: str, data: str, uri: str, file_bytes: bytes
) -> None:
    values = [timeout, max_seconds, catalog, data, uri]
    assume(not any("\x00" in v for v in values))  # environment variables cannot hold NUL
    before = snapshot()
    env = {
        "VMKEEP_AGENT_TIMEOUT": timeout,
        "VMKEEP_QUIESCE_MAX_SECONDS": max_seconds,
        "VMKEEP_CATALOG_URL": "sqlite:///{root}/cwd/" + catalog,
        "VMKEEP_DATA_DIR": "{root}/" + data,
        "VMKEEP_LIBVIRT_URI": uri,
    }
    with sandbox(env) as root:
        (root / "config.toml").write_bytes(file_bytes)
        check(*run("backups", "list", "--json"))
        check(*run("datastore", "list"))
    assert snapshot() == before
