"""The datastore driver contract, for every driver in conftest.CASES."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import blake3
import pytest

from vmkeep import faults
from vmkeep.checksums import digest_file, matches, row_digest
from vmkeep.errors import DatastoreError, DatastoreUnreachable

from .conftest import CREDENTIAL_CASES, REMOTE_CASES, Case

MiB = 1 << 20


def qcow2(path: Path, virtual: int, data: bytes, backing: str | None = None) -> Path:
    """A real qcow2 image holding ``data`` at offset 0 (optionally over a backing file name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_suffix(".raw")
    raw.write_bytes(data)
    args = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)]
    subprocess.run(args, check=True)
    raw.unlink()
    subprocess.run(["qemu-img", "resize", "-q", str(path), str(virtual)], check=True)
    if backing:
        subprocess.run(
            ["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", backing, "-F", "qcow2", str(path)],
            check=True,
        )
    return path


def staged(tmp: Path, seq: int, data: bytes) -> list[Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    disk = qcow2(tmp / f"{seq}.vda.qcow2", 64 * MiB, data, f"{seq - 1}.vda.qcow2" if seq else None)
    xml = tmp / f"{seq}.domain.xml"
    xml.write_text(f"<domain><name>vm-{seq}</name></domain>")
    return [disk, xml]


def sums(files: list[Path]) -> dict[str, str]:
    return {p.name: digest_file(p) for p in files}


def test_round_trip_bit_identical(case: Case, tmp_path: Path) -> None:
    drv = case.make()
    chain = "vm1/11"
    full = staged(tmp_path / "s0", 0, os.urandom(3 * MiB))
    inc = staged(tmp_path / "s1", 1, os.urandom(1 * MiB))
    want = sums(full) | sums(inc)
    drv.backup(chain, full)
    drv.backup(chain, inc)
    assert chain in drv.chains()
    got = drv.restore(chain, sorted(want), tmp_path / "out")
    assert {n: digest_file(p) for n, p in got.items()} == want
    # an increment's backing file is found by relative name beside it
    info = subprocess.run(
        ["qemu-img", "info", "--backing-chain", str(got["1.vda.qcow2"])],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "0.vda.qcow2" in info
    assert drv.stat(chain, "1.vda.qcow2", tmp_path / "stat") == 64 * MiB
    assert drv.url(chain, "0.vda.qcow2") == f"{case.driver}://{drv.name}/{chain}/0.vda.qcow2"
    total, free = drv.monitor()
    assert total > 0 and 0 <= free <= total


def test_storing_a_name_again_replaces_it(case: Case, tmp_path: Path) -> None:
    drv = case.make()
    chain = "vm2/12"
    first, second = tmp_path / "a" / "manifest.json", tmp_path / "b" / "manifest.json"
    for p, text in ((first, "one"), (second, "two")):
        p.parent.mkdir()
        p.write_text(text)
    drv.backup(chain, [first])
    drv.backup(chain, [second])
    got = drv.restore(chain, ["manifest.json"], tmp_path / "out")
    assert got["manifest.json"].read_text() == "two"


def test_rm_one_file_then_the_chain(case: Case, tmp_path: Path) -> None:
    drv = case.make()
    keep, gone = "vm3/13", "vm3/14"
    drv.backup(keep, staged(tmp_path / "k", 0, os.urandom(MiB)))
    files = staged(tmp_path / "g0", 0, os.urandom(MiB)) + staged(tmp_path / "g1", 1, b"x" * MiB)
    drv.backup(gone, files)
    drv.rm(gone, ["1.vda.qcow2", "1.domain.xml", "not-there.qcow2"])  # absent: no error
    with pytest.raises(DatastoreError, match="missing"):
        drv.restore(gone, ["1.vda.qcow2"], tmp_path / "o1")
    assert drv.restore(gone, ["0.vda.qcow2"], tmp_path / "o2")["0.vda.qcow2"].is_file()
    drv.rm(gone)
    assert gone not in drv.chains() and keep in drv.chains()
    with pytest.raises(DatastoreError, match="missing"):
        drv.restore(gone, ["0.vda.qcow2"], tmp_path / "o3")
    drv.rm(gone)  # again: nothing left, no error
    restored = drv.restore(keep, ["0.vda.qcow2"], tmp_path / "o4")["0.vda.qcow2"]
    assert restored.is_file()


def _store_in_child(case: Case, chain: str, files: list[Path], **overrides: object) -> str:
    """Python code that stores ``files`` with the case's driver (run in a process we kill)."""
    opts = case.options() | overrides
    return (
        "import sys\n"
        "from pathlib import Path\n"
        "from vmkeep.datastores import make_driver\n"
        f"drv = make_driver({case.driver!r}, 'ds', {opts!r})\n"
        "print('go', flush=True)\n"
        f"drv.backup({chain!r}, [Path(p) for p in {[str(f) for f in files]!r}])\n"
        "print('stored', flush=True)\n"
    )


def _process_texts() -> str:
    """Every process's command line and environment (what ``ps e`` shows an admin)."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            for what in ("cmdline", "environ"):
                with contextlib.suppress(OSError):
                    out.append(Path(f"/proc/{pid}/{what}").read_bytes().decode(errors="replace"))
    return "\n".join(out)


def _session(sid: int) -> list[str]:
    """The command lines of the processes of session ``sid`` (a child and what it started)."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[3]) == sid:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                    out.append(cmd.replace(b"\0", b" ").decode(errors="replace"))
    return out


def _transfer(sid: int) -> bool:
    """A process of the store's session other than Python itself has 0.vda.qcow2 on its
    command line (``rsync FILE host:dir/``, ``restic backup --stdin-filename 0.vda.qcow2``)."""
    return any("0.vda.qcow2" in c and not c.startswith(sys.executable) for c in _session(sid))


def _wait_for(cond: Callable[[], bool], what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while not cond():
        assert proc.poll() is None, f"the store ended ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within 60 s"
        time.sleep(0.05)


def test_a_killed_store_leaves_no_file_that_looks_complete(case: Case, tmp_path: Path) -> None:
    """Killed mid-store (remote: while its transfer tool sends the file; dir: between the
    partial file and its rename), the file is absent under its final name, never short."""
    drv = case.make()
    chain = "vm4/15"
    big = qcow2(tmp_path / "0.vda.qcow2", 256 * MiB, os.urandom(48 * MiB))
    # remote drivers: slow the transfer down (48 MiB at 4 MiB/s) so the kill lands in it
    slow = {"bwlimit": 4096} if case.remote or case.driver == "restic" else {}
    code = _store_in_child(case, chain, [big], **slow)
    env = dict(os.environ)
    if not slow:  # dir: a rename, too quick to kill halfway; held between partial and rename
        env[faults.ENV] = "dir-rename=sleep:60"
    stderr = tmp_path / "stderr"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
            env=env,
        )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"go"
    if slow:  # the transfer tool (rsync, restic) started on the file
        _wait_for(lambda: _transfer(proc.pid), "transfer of 0.vda.qcow2", proc)
    else:
        _wait_for(lambda: b"fail point dir-rename" in stderr.read_bytes(), "fail point", proc)
    seen = _process_texts()
    was_running = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for secret in case.secrets:
        assert secret not in seen, "a secret is visible in a command line or environment"
    assert was_running, "the store finished before the kill: the test proved nothing"
    # killed before the file was complete: absent under its final name, never a short file
    with pytest.raises(DatastoreError, match="missing"):
        drv.restore(chain, ["0.vda.qcow2"], tmp_path / "out")
    # and the chain can be removed and stored again with nothing left over
    drv.rm(chain)
    again = qcow2(tmp_path / "again" / "0.vda.qcow2", 64 * MiB, b"y" * MiB)
    again_sum = digest_file(again)  # the dir driver moves staged files away
    drv.backup(chain, [again])
    out = drv.restore(chain, ["0.vda.qcow2"], tmp_path / "out2")["0.vda.qcow2"]
    assert digest_file(out) == again_sum
    drv.rm(chain)


@pytest.mark.parametrize("case", CREDENTIAL_CASES, indirect=True)
def test_bad_credentials_are_named_and_write_nothing(case: Case, tmp_path: Path) -> None:
    assert case.bad_credentials is not None
    bad = case.make(**case.bad_credentials)
    with pytest.raises(DatastoreError) as err:
        bad.backup("vm5/16", staged(tmp_path / "s", 0, os.urandom(MiB)))
    assert bad.name in str(err.value)
    assert not isinstance(err.value, DatastoreUnreachable), "a refused login is not retried"
    assert "vm5/16" not in case.make().chains()


@pytest.mark.parametrize("case", REMOTE_CASES, indirect=True)
def test_unreachable_host_is_retried_then_named(case: Case, tmp_path: Path) -> None:
    assert case.unreachable is not None
    down = case.make(**case.unreachable)
    t0 = time.monotonic()
    with pytest.raises(DatastoreUnreachable) as err:
        down.backup("vm6/17", staged(tmp_path / "s", 0, os.urandom(MiB)))
    text = str(err.value)
    assert down.name in text and "unreachable" in text and "retried 3 times" in text, text
    assert time.monotonic() - t0 < 60
    assert "vm6/17" not in case.make().chains()


def test_checksums_match_reference_implementations(tmp_path: Path) -> None:
    p = tmp_path / "f"
    data = os.urandom(5 * MiB + 3)
    p.write_bytes(data)
    assert digest_file(p) == "blake3:" + blake3.blake3(data).hexdigest()
    assert digest_file(p, "sha256") == "sha256:" + hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty"
    empty.touch()
    assert digest_file(empty) == "blake3:" + blake3.blake3(b"").hexdigest()
    # rows written before BLAKE3 carry a bare sha256 and are checked with it
    old_row = {"name": "f", "sha256": hashlib.sha256(data).hexdigest()}
    assert matches(p, row_digest(old_row)) == (True, "sha256:" + old_row["sha256"])
    p.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert not matches(p, row_digest(old_row))[0]
    assert not matches(p, row_digest({"name": "f", "digest": digest_file(empty)}))[0]
