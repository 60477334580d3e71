"""The datastore promises of the README on a real lab VM: `datastore show` (figures, options, no
secret), `datastore remove --force` (what stays in the catalog and on disk), `datastore download`
from rsync over SSH and dir, `datastore scan --import` on restic and dir, `backups copy` to rsync
and from restic, restic retention (forget + prune of merged increments) and a stale restic lock.
One small VM for the module; each test has its own catalog and datastores."""

# ruff: noqa: F811 (the fixtures imported from test_offhost are parameters of the tests)

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from vmkeep.catalog import Catalog
from vmkeep.catalog.tables import Backup
from vmkeep.checksums import digest_file
from vmkeep.lab import Lab
from vmkeep.lab.lab import read_file_from_image
from vmkeep.lab.sshd import Sshd

from .conftest import PREFIX
from .test_offhost import (  # noqa: F401 (fixtures among them: pytest finds them by name)
    PASSWORD,
    du,
    fresh,
    full_and_increment,
    password_file,
    restored,
    rsync_opts,
    sha,
    sshd,
)

VM = f"{PREFIX}stores"


@pytest.fixture(scope="module")
def vm(lab: Lab) -> Iterator[str]:
    """The VM ``fresh`` imports: one 64 MiB data disk at /mnt/vda."""
    lab.create(VM, [64 << 20])
    yield VM
    lab.remove(VM)


def add_restic(vmkeep, name: str, repo: Path, password_file: Path) -> None:
    vmkeep(
        "datastore", "add", name, "--driver", "restic", "--opt", f"repo={repo}",
        "--opt", f"password_file={password_file}", "--opt", "init=yes",
    )  # fmt: skip


def restic(repo: Path, password_file: Path, *args: str) -> str:
    """restic itself, as a user reads the repository vmkeep wrote: its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESTIC_")}
    env["RESTIC_PASSWORD_FILE"] = str(password_file)
    proc = subprocess.run(
        ["restic", "--repo", str(repo), *args],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, f"restic {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def snapshot_files(repo: Path, password_file: Path, chain: str) -> list[str]:
    snaps = json.loads(
        restic(repo, password_file, "snapshots", "--json", "--tag", f"chain={chain}")
    )
    snaps = snaps or []
    return sorted(
        t.removeprefix("file=") for s in snaps for t in s["tags"] if t.startswith("file=")
    )


def disk_urls(vmkeep, backup: int) -> dict[int, str]:
    """increment -> the URL of its vda image, as `backups show` prints it."""
    shown = vmkeep("backups", "show", str(backup), "--json").json()
    return {
        i["id"]: f["url"] for i in shown["increments"] for f in i["files"] if f["disk"] == "vda"
    }


def manifest_digests(vmkeep, backup: int) -> dict[str, str]:
    shown = vmkeep("backups", "show", str(backup), "--json").json()
    return {f["name"]: f["digest"] for i in shown["increments"] for f in i["files"]}


def test_datastore_show_figures_options_and_no_secret(
    vmkeep, lab: Lab, fresh: str, tmp_path: Path
) -> None:
    """`datastore show` of a restic store whose password comes from a command, and of a dir
    store: total/free as the file system says, used as the files take, the options, no secret."""
    repo = tmp_path / "repo"
    vmkeep(
        "datastore", "add", "r", "--driver", "restic", "--opt", f"repo={repo}",
        "--opt", f"password_command=echo {PASSWORD}", "--opt", "init=yes",
        "--opt", "compression=max",
    )  # fmt: skip
    vmkeep("datastore", "add", "d", "--driver", "dir", "--path", str(tmp_path / "d"))
    lab.write_random(fresh, "/mnt/vda/f", 2)
    vmkeep("backup", fresh, "-d", "r", "--reset")
    vmkeep("backup", fresh, "-d", "d", "--reset")

    fs = os.statvfs(tmp_path)
    for name, where in (("r", repo), ("d", tmp_path / "d")):
        shown = vmkeep("datastore", "show", name, "--json").json()
        assert shown["name"] == name and shown["error"] is None, shown
        assert shown["total_bytes"] == fs.f_blocks * fs.f_frsize
        # free space moves with every other writer on the machine: within 5 % of statvfs
        free = os.statvfs(tmp_path).f_bavail * fs.f_frsize
        assert abs(shown["free_bytes"] - free) <= 0.05 * shown["total_bytes"], (shown, free)
        assert shown["used_bytes"] == du(where) and shown["used_bytes"] > 1 << 20, shown
    r = vmkeep("datastore", "show", "r", "--json").json()
    assert r["driver"] == "restic"
    assert r["options"]["repo"] == str(repo) and r["options"]["compression"] == "max"
    assert r["options"]["password_command"] == "(set)"
    d = vmkeep("datastore", "show", "d", "--json").json()
    assert d["driver"] == "dir" and d["options"]["path"] == str(tmp_path / "d")
    human = vmkeep("datastore", "show", "r")
    assert "(set)" in human.out and str(repo) in human.out
    for out in (human.out, human.err, json.dumps(r), vmkeep("datastore", "list", "--json").out):
        assert PASSWORD not in out
    missing = vmkeep("datastore", "show", "nope", check=6)
    assert "Datastore 'nope' does not exist" in missing.err


def test_remove_force_forgets_rows_keeps_files_then_scan_import_on_dir(
    vmkeep, lab: Lab, fresh: str, tmp_path: Path
) -> None:
    """`datastore remove` refused while the store holds backups (exit 25); `--force` forgets
    the rows, a protected point too, and leaves every file; `datastore scan --import` on a dir
    store brings the points back and they restore the bytes they were taken with."""
    store = tmp_path / "d"
    vmkeep("datastore", "add", "d", "--driver", "dir", "--path", str(store))
    backup_id, sums = full_and_increment(vmkeep, lab, fresh, "d")
    vmkeep("backups", "protect", str(backup_id), "--increment", "0")
    chain = vmkeep("backups", "show", str(backup_id), "--json").json()["chain"]
    files = {p.name: digest_file(p) for p in (store / chain).iterdir()}
    assert {"0.vda.qcow2", "1.vda.qcow2", "manifest.json"} <= set(files)

    refused = vmkeep("datastore", "remove", "d", check=25)
    assert f"it holds 1 backup(s) ({backup_id})" in refused.err and "--force" in refused.err
    assert [b["id"] for b in vmkeep("backups", "list", "--json").json()] == [backup_id]

    gone = vmkeep("datastore", "remove", "d", "--force", "--json").json()
    assert gone == {"datastore": "d", "forgotten_backups": [backup_id]}
    assert vmkeep("backups", "list", "--json").json() == []
    assert [x["name"] for x in vmkeep("datastore", "list", "--json").json()] == []
    vmkeep("backups", "show", str(backup_id), check=6)
    assert {p.name: digest_file(p) for p in (store / chain).iterdir()} == files  # all still there

    # the same store added again: the scan sees the chain, --import brings its points back
    vmkeep("datastore", "add", "d", "--driver", "dir", "--path", str(store))
    seen = vmkeep("datastore", "scan", "d", "--json").json()
    assert [(r["chain"], r["known"]) for r in seen] == [(chain, False)]
    imported = vmkeep("datastore", "scan", "d", "--import", "--json").json()
    assert imported[0]["increments"] == [0, 1], imported
    new_id = imported[0]["imported"]
    shown = vmkeep("backups", "show", str(new_id), "--json").json()
    assert [i["protected"] for i in shown["increments"]] == [False, False]  # unprotected
    # the increment (its restore reads the full too)
    assert restored(vmkeep, tmp_path, new_id, 1, "/mnt/vda/f") == sums[1]


def test_copy_to_rsync_and_download_from_rsync_and_dir(
    vmkeep, lab: Lab, fresh: str, sshd: Sshd, tmp_path: Path
) -> None:
    """`backups copy` to an rsync store over SSH restores the bytes; `datastore download` of a
    full and its increment, from the rsync copy and from the dir original, gives the files the
    manifest names, and the downloaded pair reads as the guest's disk at that point."""
    vmkeep("datastore", "add", "d", "--driver", "dir", "--path", str(tmp_path / "d"))
    vmkeep("datastore", "add", "rr", *rsync_opts(sshd, tmp_path / "remote"))
    backup_id, sums = full_and_increment(vmkeep, lab, fresh, "d")
    copied = vmkeep("backups", "copy", str(backup_id), "--to", "rr", "--json").json()
    assert copied["copied_increments"] == [0, 1] and copied["verified"], copied
    copy_id = copied["copy"]
    shown = vmkeep("backups", "show", str(copy_id), "--json").json()
    assert shown["datastore"] == "rr"
    # the increment (its restore reads the full too)
    assert restored(vmkeep, tmp_path, copy_id, 1, "/mnt/vda/f") == sums[1]

    for bid, scheme in ((copy_id, "rsync"), (backup_id, "dir")):
        urls = disk_urls(vmkeep, bid)
        assert all(u.startswith(f"{scheme}://") for u in urls.values()), urls
        digests = manifest_digests(vmkeep, bid)
        dest = tmp_path / f"dl-{scheme}"
        dest.mkdir()
        for inc in (0, 1):
            got = vmkeep("datastore", "download", urls[inc], str(dest), "--json").json()
            path = Path(got["path"])
            assert path == dest / f"{inc}.vda.qcow2" and got["size"] == path.stat().st_size
            assert digest_file(path) == digests[path.name]
        # the increment is backed by the full beside it: together, the disk at each point
        for inc, want in enumerate(sums):
            image = dest / f"{inc}.vda.qcow2"
            assert sha(read_file_from_image(image, "/f", tmp_path)) == want, (scheme, inc)
        again = vmkeep("datastore", "download", urls[0], str(dest), check=7)
        assert "--force" in again.err


def test_copy_from_restic_and_scan_import_restic_after_rows_lost(
    vmkeep, lab: Lab, fresh: str, tmp_path: Path, password_file: Path
) -> None:
    """`backups copy` from a restic store to a dir store restores the bytes; a catalog that lost
    the restic store's rows gets them back with `datastore scan --import`, restorable."""
    repo = tmp_path / "repo"
    add_restic(vmkeep, "r", repo, password_file)
    vmkeep("datastore", "add", "d", "--driver", "dir", "--path", str(tmp_path / "d"))
    backup_id, sums = full_and_increment(vmkeep, lab, fresh, "r")
    chain = vmkeep("backups", "show", str(backup_id), "--json").json()["chain"]
    copied = vmkeep("backups", "copy", str(backup_id), "--to", "d", "--json").json()
    assert copied["copied_increments"] == [0, 1] and copied["verified"], copied
    assert (tmp_path / "d" / chain / "1.vda.qcow2").is_file()
    # the increment (its restore reads the full too)
    assert restored(vmkeep, tmp_path, copied["copy"], 1, "/mnt/vda/f") == sums[1]

    catalog = Catalog(f"sqlite:///{Path(os.environ['VMKEEP_DATA_DIR']) / 'catalog.db'}")
    with catalog.session() as s:  # the rows of the restic store's backup are lost
        s.delete(s.execute(select(Backup).where(Backup.id == backup_id)).scalar_one())
    assert [b["id"] for b in vmkeep("backups", "list", "--json").json()] == [copied["copy"]]
    seen = vmkeep("datastore", "scan", "r", "--json").json()
    assert [(r["chain"], r["known"]) for r in seen] == [(chain, False)]
    imported = vmkeep("datastore", "scan", "r", "--import", "--json").json()
    assert imported[0]["increments"] == [0, 1], imported
    new_id = imported[0]["imported"]
    assert vmkeep("backups", "show", str(new_id), "--json").json()["datastore"] == "r"
    # the increment (its restore reads the full too)
    assert restored(vmkeep, tmp_path, new_id, 1, "/mnt/vda/f") == sums[1]


def test_restic_retention_merges_forgets_and_prunes(
    vmkeep, lab: Lab, fresh: str, tmp_path: Path, password_file: Path
) -> None:
    """`prune VM --keep-last 2` on a restic store: the full is merged into the next point (now
    the chain's base), its snapshots forgotten and its data pruned; the kept points restore
    their bytes."""
    repo = tmp_path / "repo"
    add_restic(vmkeep, "r", repo, password_file)
    sums = [lab.write_random(fresh, "/mnt/vda/f", 4)]
    first = vmkeep("backup", fresh, "-d", "r", "--reset", "--json").json()
    backup_id = first["id"]
    # point 1 overwrites the full's data in place: what point 0 holds of it is its alone
    lab.sh(fresh, "dd if=/dev/urandom of=/mnt/vda/f bs=1M count=4 conv=notrunc 2>/dev/null; sync")
    sums.append(lab.sha256(fresh, "/mnt/vda/f"))
    assert vmkeep("backup", fresh, "-d", "r", "--json").json()["increment"] == 1
    sums.append(lab.write_random(fresh, "/mnt/vda/f", 1, seek_mib=2))
    assert vmkeep("backup", fresh, "-d", "r", "--json").json()["increment"] == 2
    chain = vmkeep("backups", "show", str(backup_id), "--json").json()["chain"]
    assert "0.vda.qcow2" in snapshot_files(repo, password_file, chain)
    before = du(repo)

    done = vmkeep("prune", fresh, "--keep-last", "2", "--json").json()
    decided = {p["increment"]: p["keep"] for p in done["datastores"][0]["points"]}
    assert decided == {0: False, 1: True, 2: True}, done
    shown = vmkeep("backups", "show", str(backup_id), "--json").json()
    assert [i["id"] for i in shown["increments"]] == [1, 2]
    for inc in (1, 2):
        assert restored(vmkeep, tmp_path, backup_id, inc, "/mnt/vda/f") == sums[inc]
    files = snapshot_files(repo, password_file, chain)
    assert not {"0.vda.qcow2", "0.domain.xml"} & set(files), files
    assert {"1.vda.qcow2", "2.vda.qcow2", "manifest.json"} <= set(files), files
    # one snapshot per file name: the rewritten files replaced the old ones
    assert len(files) == len(set(files)), files
    # the full's own 4 MiB went with it (vmkeep's prune); restic's own prune finds only the
    # old manifest copies a backup forgets without a prune, and the repository checks clean
    pruned = du(repo)
    assert pruned <= before - (2 << 20), (before, pruned)
    restic(repo, password_file, "prune")
    assert pruned - du(repo) < 256 << 10, "restic found the forgotten point's data unpruned"
    restic(repo, password_file, "check")


def wait_for(what: str, cond: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.1)
    return got


def test_restic_stale_lock_of_a_killed_restic_is_cleared(
    vmkeep, lab: Lab, fresh: str, tmp_path: Path, password_file: Path
) -> None:
    """A lock left by a killed restic: `backup` (whose manifest update forgets the old copy,
    which needs the repository to itself) clears it with `restic unlock` and works; no lock and
    no old manifest copy is left."""
    repo = tmp_path / "repo"
    add_restic(vmkeep, "r", repo, password_file)
    sums = [lab.write_random(fresh, "/mnt/vda/f", 2)]
    backup_id = vmkeep("backup", fresh, "-d", "r", "--reset", "--json").json()["id"]
    chain = vmkeep("backups", "show", str(backup_id), "--json").json()["chain"]

    env = {k: v for k, v in os.environ.items() if not k.startswith("RESTIC_")}
    env["RESTIC_PASSWORD_FILE"] = str(password_file)
    killed = subprocess.Popen(
        ["restic", "--repo", str(repo), "backup", "--stdin", "--stdin-filename", "x"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        assert killed.stdin is not None
        killed.stdin.write(b"\0" * 4096)
        killed.stdin.flush()
        wait_for("restic lock", lambda: list((repo / "locks").iterdir()))
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
    assert killed.returncode == -signal.SIGKILL
    assert len(list((repo / "locks").iterdir())) == 1  # the killed restic's lock stays

    sums.append(lab.write_random(fresh, "/mnt/vda/f", 1, seek_mib=1))
    res = vmkeep("backup", fresh, "-d", "r", "--json")
    assert res.json()["increment"] == 1 and "locked" not in res.err, res.err
    assert list((repo / "locks").iterdir()) == []
    files = snapshot_files(repo, password_file, chain)
    assert files.count("manifest.json") == 1, files  # the old copy was forgotten
    # the increment (its restore reads the full too)
    assert restored(vmkeep, tmp_path, backup_id, 1, "/mnt/vda/f") == sums[1]
