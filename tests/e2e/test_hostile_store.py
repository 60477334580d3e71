"""A hostile datastore (issue 23): a real restic repository built with restic itself, holding an
honest chain and one whose snapshot is tagged ``file=../../../../tmp/x``, scanned and imported
through the real CLI, then verified: nothing is written outside the work folder, the hostile
chain is refused with a message and the honest one imported. restic's password_command is on no
command line (the command itself reads its parent's /proc/PID/cmdline) and in no output. No lab
VM: the chains are made with qemu-img."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from vmkeep.checksums import digest_file
from vmkeep.datastores import make_driver
from vmkeep.errors import DatastoreError

PASSWORD = "hostile-" + uuid.uuid4().hex
XML = (
    "<domain type='kvm'><name>{vm}</name><memory>65536</memory><devices>"
    "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
    "<source file='/var/lib/libvirt/images/{vm}.qcow2'/><target dev='vda' bus='virtio'/></disk>"
    "</devices></domain>"
)


def restic(repo: Path, pw: Path, *args: str, stdin: bytes | None = None) -> str:
    proc = subprocess.run(
        ["restic", "--repo", str(repo), "--password-file", str(pw), *args],
        input=stdin,
        capture_output=True,
        check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("RESTIC_")},
    )
    return proc.stdout.decode()


def store(repo: Path, pw: Path, chain: str, name: str, data: bytes) -> None:
    """One file as a snapshot tagged the way vmkeep tags them, written by restic itself."""
    restic(
        repo, pw, "backup", "--host", "vmkeep", "--stdin", "--stdin-filename",
        name.rsplit("/", 1)[-1], "--tag", "vmkeep", "--tag", f"chain={chain}",
        "--tag", f"file={name}", stdin=data,
    )  # fmt: skip


def chain_files(tmp: Path, vm: str, extra: list[dict[str, Any]]) -> dict[str, bytes]:
    """A one-point chain: a qcow2 disk, its domain XML and a manifest listing them (+ extra)."""
    image = tmp / f"{vm}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    xml = tmp / f"{vm}.xml"
    xml.write_text(XML.format(vm=vm))
    rows = [
        {"disk": "vda", "name": "0.vda.qcow2", "size": image.stat().st_size,
         "digest": digest_file(image), "virtual_size": 1 << 20},
        {"disk": None, "name": "0.domain.xml", "size": xml.stat().st_size,
         "digest": digest_file(xml)},
        *extra,
    ]  # fmt: skip
    manifest = {
        "vm": vm,
        "vm_uuid": str(uuid.uuid4()),
        "mode": "FULL",
        "created": "2026-01-01T00:00:00+00:00",
        "increments": [{"id": 0, "parent": None, "status": "VALID", "files": rows}],
    }
    return {
        "0.vda.qcow2": image.read_bytes(),
        "0.domain.xml": xml.read_bytes(),
        "manifest.json": json.dumps(manifest).encode(),
    }


@pytest.fixture
def target() -> Any:
    """The file the hostile tag names: /tmp/vmkeep-hb-<random>, removed after the test."""
    path = Path("/tmp") / f"vmkeep-hb-{uuid.uuid4().hex[:8]}"
    yield path
    path.unlink(missing_ok=True)


def test_a_hostile_restic_tag_is_refused_and_the_honest_chain_imported(
    vmkeep: Any, tmp_path: Path, target: Path
) -> None:
    repo, pw = tmp_path / "repo", tmp_path / "pw"
    pw.write_text(PASSWORD)
    pw.chmod(0o600)
    restic(repo, pw, "init")
    for name, data in chain_files(tmp_path, "web", []).items():
        store(repo, pw, "web/1", name, data)
    # deep enough to leave any work folder: ../../../../tmp/x from wherever vmkeep fetches it
    hostile = "../" * 30 + str(target).lstrip("/")
    evil = {"disk": None, "name": hostile, "size": 5, "digest": "blake3:" + "0" * 64}
    for name, data in chain_files(tmp_path, "evil", [evil]).items():
        store(repo, pw, "evil/2", name, data)
    store(repo, pw, "evil/2", hostile, b"owned")
    # the password command records the command line of the restic that runs it
    seen = tmp_path / "restic-cmdlines"
    command = tmp_path / f"password-command-{uuid.uuid4().hex[:6]}.sh"
    command.write_text(
        f"#!/bin/sh\ntr '\\0' ' ' < /proc/$PPID/cmdline >> {seen}\necho >> {seen}\ncat {pw}\n"
    )
    command.chmod(0o700)
    vmkeep(
        "datastore", "add", "r", "--driver", "restic", "--opt", f"repo={repo}",
        "--opt", f"password_command={command}",
    )  # fmt: skip

    rows = {r["chain"]: r for r in vmkeep("datastore", "scan", "r", "--import", "--json").json()}
    assert not target.exists(), "the scan wrote outside its work folder"
    assert rows["web/1"]["imported"] and "refused" not in rows["web/1"], rows
    assert rows["evil/2"]["imported"] is None
    assert "stored file name is" in rows["evil/2"]["refused"], rows["evil/2"]
    human = vmkeep("datastore", "scan", "r").out
    assert "refused" in human and "evil/2" in human

    verified = vmkeep("backups", "verify", str(rows["web/1"]["imported"]), "--json").json()
    assert verified["ok"] and [f["file"] for f in verified["files"]] == [
        "0.vda.qcow2",
        "0.domain.xml",
    ]
    ids = [b["id"] for b in vmkeep("backups", "list", "--json").json()]
    assert ids == [rows["web/1"]["imported"]]
    assert not target.exists(), "verify wrote outside its work folder"

    # the driver itself never writes the hostile name, whoever asks (a row imported earlier)
    drv = make_driver("restic", "r", {"repo": str(repo), "password_file": str(pw)})
    with pytest.raises(DatastoreError, match="stored file name is"):
        drv.restore("evil/2", [hostile], tmp_path / "work")
    assert not target.exists()

    # password_command: in no output, on no restic command line
    for args in (("datastore", "list", "--json"), ("datastore", "show", "r", "--json")):
        out = vmkeep(*args).out
        assert str(command) not in out and "(set)" in out, out
    lines = [ln for ln in seen.read_text().splitlines() if ln.strip()]
    assert lines and all("restic" in ln for ln in lines), lines
    assert not any(str(command) in ln or "--password" in ln for ln in lines), lines


def test_rsync_and_restic_options_outside_the_allowlist_are_refused_on_add(
    vmkeep: Any, tmp_path: Path
) -> None:
    for args in ("-a --log-file=/etc/cron.d/vmkeep", "--rsync-path=sh -c id", "-a -e sh"):
        res = vmkeep(
            "datastore", "add", "s", "--driver", "rsync", "--opt", "host=127.0.0.1",
            "--opt", "path=/srv/backups", "--opt", f"args={args}", check=9,
        )  # fmt: skip
        assert "option args" in res.err and "--numeric-ids" in res.err, res.err
    res = vmkeep(
        "datastore", "add", "r", "--driver", "restic", "--opt", f"repo={tmp_path / 'repo'}",
        "--opt", f"password_file={tmp_path / 'pw'}", "--opt", "limit_upload=1", check=9,
    )  # fmt: skip
    assert "allowed ones are" in res.err and "password_command" in res.err, res.err
    assert vmkeep("datastore", "list", "--json").json() == []
