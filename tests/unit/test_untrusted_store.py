"""A datastore is untrusted input (issue 23): every name it gives passes the rules of names.py,
every file a driver fetches lands inside its work folder, a stored domain XML passes the check of
``vm create`` before it is imported, a restic password_command is never shown nor on restic's
command line, and driver options pass an allowlist when the datastore is added.

Real dir datastores, real qemu-img; no VM, no restic (tests/e2e/test_hostile_store.py has the
restic repository built by restic itself)."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from vmkeep.api.app import create_app
from vmkeep.catalog.tables import Backup, Datastore, Increment, Vm
from vmkeep.checksums import digest_file
from vmkeep.config import load_config
from vmkeep.datastores import make_driver
from vmkeep.datastores.restic import ResticDriver
from vmkeep.datastores.retry import Retrying
from vmkeep.engine.core import stores
from vmkeep.engine.core.context import Context
from vmkeep.engine.points import copy, scan
from vmkeep.engine.points.verify import verify
from vmkeep.engine.restore import export
from vmkeep.engine.service import tokens
from vmkeep.errors import DatastoreError, InvalidValue
from vmkeep.model import BackupStatus, LcmState, VmState
from vmkeep.names import check_chain_key, check_disk_name, check_file_name

HONEST_XML = (
    "<domain type='kvm'><name>{vm}</name><memory>65536</memory><devices>"
    "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
    "<source file='/var/lib/libvirt/images/{vm}.qcow2'/><target dev='vda' bus='virtio'/></disk>"
    "</devices></domain>"
)
RAW_XML = (
    "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
    "<name>{vm}</name><memory>65536</memory><devices/>"
    "<qemu:commandline><qemu:arg value='-fsdev'/></qemu:commandline></domain>"
)


# --- the rules ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["0.vda.qcow2", "12.domain.xml", "3.memory", "manifest.json"])
def test_stored_file_names_vmkeep_writes_pass(name: str) -> None:
    assert check_file_name("f", name) == name


@pytest.mark.parametrize(
    "name",
    ["../../../../tmp/x", "..", ".", "", "a/b", "/etc/shadow", "0.vda,x.qcow2", "a b", "-x",
     ".hidden", "x;rm", "é", "a\n", "x" * 129, None, 7],
)  # fmt: skip
def test_hostile_stored_file_names_are_refused(name: Any) -> None:
    with pytest.raises(InvalidValue, match="stored file name is"):
        check_file_name("a file name in manifest.json", name)


def test_disk_targets_and_chain_keys() -> None:
    for good in ("vda", "sdb", "hdc", "xvda", "nvme0n1"):
        assert check_disk_name("disk", good) == good
    for bad in ("vda,file.driver=ssh", "v.da", "../vda", "", "1vda", "vda b", None):
        with pytest.raises(InvalidValue, match="disk target is"):
            check_disk_name("disk", bad)
    for good in ("web/1", "web/12-a1b2c3", "db.2/7"):
        assert check_chain_key("chain", good) == good
    for bad in ("..", "../1", "web/..", "web/1/2", "/1", "web/", "12/1", "a b/1", "web/.x"):
        with pytest.raises(InvalidValue, match="chain key is"):
            check_chain_key("chain", bad)


# --- a hostile dir datastore through scan --import and verify ----------------------------------
def qcow2(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M"], check=True)
    return path


def store_chain(
    root: Path, chain: str, disk: str = "vda", xml: str = HONEST_XML, extra: Any = None
) -> dict[str, Any]:
    """A chain as vmkeep writes it (one full: disk, domain XML, manifest.json), with ``extra``
    file rows added to its manifest."""
    folder = root / chain
    vm = chain.split("/")[0]
    image = qcow2(folder / f"0.{disk}.qcow2")
    (folder / "0.domain.xml").write_text(xml.format(vm=vm))
    rows = [
        {"disk": disk, "name": image.name, "size": image.stat().st_size,
         "digest": digest_file(image), "virtual_size": 1 << 20},
        {"disk": None, "name": "0.domain.xml", "size": 1,
         "digest": digest_file(folder / "0.domain.xml")},
        *(extra or []),
    ]  # fmt: skip
    manifest = {
        "vm": vm,
        "vm_uuid": str(uuid.uuid4()),
        "chain": chain,
        "mode": "FULL",
        "increments": [{"id": 0, "parent": None, "status": "VALID", "files": rows}],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


@pytest.fixture
def ctx(clean_env: Path) -> Context:
    return Context(load_config())


def outside(tmp_path: Path) -> Path:
    """A file the hostile names point at: it must never be created."""
    return tmp_path / "outside" / "x"


def test_hostile_manifests_are_refused_and_the_honest_chain_is_imported(
    ctx: Context, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    stores.add(ctx, "d", "dir", {"path": str(root)})
    store_chain(root, "web/1")
    # a file name leading out of the work folder (to tmp_path/outside/x from any depth)
    up = "../" * 30 + str(outside(tmp_path)).lstrip("/")
    store_chain(root, "evil/2", extra=[{"disk": None, "name": up, "size": 1, "digest": "x"}])
    # a disk name that would add options to qemu-storage-daemon's comma-separated list
    store_chain(root, "comma/3", disk="vda,file.locking=off")
    # a domain XML that vm create refuses (QEMU pass-through)
    store_chain(root, "rawxml/4", xml=RAW_XML)
    # a chain key that is no name
    store_chain(root, "bad name/5")
    rows = {r["chain"]: r for r in scan.scan(ctx, "d", do_import=True)}
    assert rows["web/1"]["imported"] and "refused" not in rows["web/1"]
    for chain, why in [
        ("evil/2", "stored file name is"),
        ("comma/3", "disk target is"),
        ("rawxml/4", "<qemu:commandline>"),
        ("bad name/5", "chain key is"),
    ]:
        assert rows[chain]["imported"] is None, rows[chain]
        assert why in rows[chain]["refused"], rows[chain]
    with ctx.catalog.session() as s:
        assert [b.chain for b in s.query(Backup)] == ["web/1"]
    assert verify(ctx, rows["web/1"]["imported"])["ok"]
    assert not outside(tmp_path).parent.exists()
    # a second scan imports nothing more and refuses the same chains again
    again = {r["chain"]: r for r in scan.scan(ctx, "d", do_import=True)}
    assert again["web/1"]["known"] and again["evil/2"]["refused"]


def test_allow_raw_xml_lets_an_admin_import_the_raw_xml_chain(
    clean_env: Path, tmp_path: Path
) -> None:
    config = Path(os.environ["VMKEEP_CONFIG"])
    config.write_text(config.read_text() + "[vmm]\nallow_raw_xml = true\n")
    ctx = Context(load_config())
    root = tmp_path / "store"
    stores.add(ctx, "d", "dir", {"path": str(root)})
    store_chain(root, "rawxml/4", xml=RAW_XML)
    assert scan.scan(ctx, "d", do_import=True)[0]["imported"]


def test_a_stored_domain_xml_that_differs_from_its_checksum_is_refused(
    ctx: Context, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    stores.add(ctx, "d", "dir", {"path": str(root)})
    store_chain(root, "web/1")
    (root / "web/1/0.domain.xml").write_text(RAW_XML.format(vm="web"))  # swapped after
    row = scan.scan(ctx, "d", do_import=True)[0]
    assert row["imported"] is None and "checksum" in row["refused"].lower()


def hostile_row(ctx: Context, chain: str, names: list[str]) -> int:
    """A catalog row naming hostile files, as an import before this check made them."""
    with ctx.catalog.session() as s:
        ds = s.query(Datastore).filter_by(name="d").one()
        vm = Vm(name="evil", uuid=str(uuid.uuid4()), host_uri="test:///default",
                state=VmState.UNKNOWN, lcm_state=LcmState.UNKNOWN, backup_config={})  # fmt: skip
        s.add(vm)
        s.flush()
        b = Backup(vm_id=vm.id, datastore_id=ds.id, chain=chain, mode="FULL",
                   status=BackupStatus.VALID)  # fmt: skip
        files = [
            {"disk": None, "name": n, "size": 1, "digest": "blake3:" + "0" * 64} for n in names
        ]
        b.increments.append(Increment(seq=0, status=BackupStatus.VALID, files=files))
        s.add(b)
        s.flush()
        return b.id


def test_drivers_refuse_hostile_names_even_from_the_catalog(ctx: Context, tmp_path: Path) -> None:
    """Defense in depth: a row imported before names were checked reaches the driver, which
    refuses to read, write or remove anything outside the chain."""
    root = tmp_path / "store"
    stores.add(ctx, "d", "dir", {"path": str(root)})
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (root / "evil/9").mkdir(parents=True)
    (root / "evil/9/0.link").symlink_to(victim)  # a link in the store leading out of it
    up = "../" * 30 + str(victim).lstrip("/")
    bid = hostile_row(ctx, "evil/9", [up])
    with pytest.raises(DatastoreError, match="stored file name is"):
        verify(ctx, bid)
    drv = make_driver("dir", "d", {"path": str(root)})
    with pytest.raises(DatastoreError, match="stored file name is"):
        drv.rm("evil/9", [up])
    assert victim.read_text() == "keep me"
    with pytest.raises(DatastoreError, match="leaves the folder"):
        drv.restore("evil/9", ["0.link"], tmp_path / "w")
    with pytest.raises(DatastoreError, match="chain key is"):
        drv.restore("../store", ["x"], tmp_path / "w")


def test_a_url_names_a_chain_and_a_file_by_the_rules() -> None:
    for bad in ("dir://d/web/1/..", "dir://d/../1/x", "dir://d/web/1/a,b"):
        with pytest.raises(InvalidValue):
            copy.parse_url(bad)


def test_qemu_storage_daemon_options_double_a_comma(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[str]] = []

    def fake_run(argv: list[str], what: str) -> str:
        seen.append(argv)
        Path(argv[argv.index("--pidfile") + 1]).write_text("1\n")
        return ""

    monkeypatch.setattr(export, "_run", fake_run)
    image = tmp_path / "0.vda,file.locking=off.qcow2"
    export.export_disk(image, tmp_path)
    blockdev = seen[0][2]
    assert blockdev == f"driver=file,filename={tmp_path}/0.vda,,file.locking=off.qcow2," + (
        "node-name=file0,read-only=on"
    )


# --- restic's password_command ------------------------------------------------------------------
SECRET_CMD = "/usr/local/bin/get-restic-password --vault-token=s3cr3t-" + uuid.uuid4().hex


def test_password_command_is_in_restics_environment_never_its_argv(tmp_path: Path) -> None:
    drv = make_driver("restic", "r", {"repo": str(tmp_path), "password_command": SECRET_CMD})
    assert isinstance(drv, Retrying) and isinstance(drv.inner, ResticDriver)
    argv = drv.inner._argv(["snapshots"])
    assert SECRET_CMD not in " ".join(argv) and not any(a.startswith("--password") for a in argv)
    assert drv.inner._env()["RESTIC_PASSWORD_COMMAND"] == SECRET_CMD
    assert drv.shown_options()["password_command"] == "(set)"
    assert drv.options.password_command == SECRET_CMD  # the catalog keeps it


def test_a_callers_restic_variables_never_reach_restic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESTIC_PASSWORD", "from-the-caller")
    monkeypatch.setenv("RESTIC_REPOSITORY", "/elsewhere")
    pf = tmp_path / "p"
    drv = make_driver("restic", "r", {"repo": str(tmp_path / "repo"), "password_file": str(pf)})
    env = drv.inner._env()  # type: ignore[attr-defined]
    assert env["RESTIC_PASSWORD_FILE"] == str(pf)
    assert "RESTIC_PASSWORD" not in env and "RESTIC_REPOSITORY" not in env


def test_password_command_is_hidden_from_every_api_read_and_json(ctx: Context) -> None:
    with ctx.catalog.session() as s:  # as 'datastore add' stores it (add would run restic)
        s.add(Datastore(name="r", driver="restic",
                        options={"repo": "/srv/restic", "password_command": SECRET_CMD}))  # fmt: skip
    listed = stores.list_all(ctx)
    assert listed[0]["options"]["password_command"] == "(set)"
    assert SECRET_CMD not in json.dumps(listed)
    assert SECRET_CMD not in json.dumps(stores.show(ctx, "r"), default=str)
    client = TestClient(create_app(ctx.config))
    for role in ("viewer", "admin"):
        secret = tokens.create(ctx, f"t-{role}", role)["token"]
        r = client.get("/v1/datastores", headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 200 and r.json()[0]["options"]["password_command"] == "(set)"
        assert "s3cr3t" not in r.text


# --- option allowlists ------------------------------------------------------------------------
RSYNC = {"host": "nas", "path": "/srv/backups"}


@pytest.mark.parametrize(
    "args",
    ["-a --log-file=/etc/cron.d/x", "--rsync-path=sh -c id", "-a -e 'sh -c id'", "-ae", "--rsh=x",
     "--files-from=/etc/shadow", "--include-from=/x", "--exclude-from=/x", "--temp-dir=/x",
     "--backup-dir=/x", "--write-batch=/x", "--read-batch=/x", "--password-file=/x", "-aP",
     "--compress-level=99", "--info=progress2", "--log-file", "/x"],
)  # fmt: skip
def test_rsync_args_outside_the_allowlist_are_refused(args: str) -> None:
    with pytest.raises(InvalidValue) as err:
        make_driver("rsync", "s", RSYNC | {"args": args})
    text = str(err.value)
    assert "option args" in text and "allowed" in text or "atomic" in text, text
    if "allowed" in text:
        assert "--numeric-ids" in text and "--compress-level=N" in text


@pytest.mark.parametrize("args", ["-aS", "-aSz --compress-level=3 --numeric-ids", "-a -H -A -X",
                                  "-avz --whole-file --no-perms --timeout=60", ""])  # fmt: skip
def test_rsync_args_inside_the_allowlist_pass(args: str) -> None:
    assert make_driver("rsync", "s", RSYNC | {"args": args}).options.args == args


@pytest.mark.parametrize(
    ("driver", "options", "text"),
    [
        ("rsync", RSYNC | {"host": "-oProxyCommand=id"}, "host"),
        ("rsync", RSYNC | {"user": "-oProxyCommand=id"}, "user"),
        ("rsync", RSYNC | {"path": "/srv/$(id)"}, "shell character"),
        ("rsync", RSYNC | {"path": "/srv/../etc"}, "'..'"),
        ("rsync", RSYNC | {"log_file": "/x"}, "allowed ones are"),
        ("restic", {"repo": "sftp:-oProxyCommand=id@nas:/r", "password_file": "/p"}, "user"),
        ("restic", {"repo": "/r", "password_file": "/p", "option": "x"}, "allowed ones are"),
        ("restic", {"repo": "/r", "password_file": "/p", "nice": 99}, "nice"),
        ("restic", {"repo": "/r", "password_file": "/p", "connections": 0}, "connections"),
        ("restic", {"repo": "/r", "password_command": " "}, "empty"),
    ],
)
def test_driver_options_are_checked_when_the_datastore_is_added(
    ctx: Context, driver: str, options: dict[str, Any], text: str
) -> None:
    with pytest.raises(InvalidValue, match="option") as err:
        stores.add(ctx, "x", driver, options)
    assert text in str(err.value)
    if "allowed ones are" in text:
        assert "repo" in str(err.value) or "path" in str(err.value)
    assert stores.list_all(ctx) == []
