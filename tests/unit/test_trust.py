"""The trust model (docs/security.md) on the real app and a real SQLite catalog: every route
with every role, generated from the route table; an operator's places (restore destinations,
images, bridges); the domain XML an admin may define; what terminate may delete."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from vmkeep.api.app import create_app
from vmkeep.checksums import digest_file
from vmkeep.config import load_config
from vmkeep.engine.core import trust
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.trust import Actor
from vmkeep.engine.service import tokens
from vmkeep.errors import InvalidValue, NotPermitted, VmkeepError
from vmkeep.model import ROLES

OPERATOR = Actor("op", "operator")


@pytest.fixture
def api(clean_env: Path) -> tuple[TestClient, dict[str, str]]:
    config = load_config()
    ctx = Context(config)
    secrets = {r: tokens.create(ctx, f"t-{r}", r)["token"] for r in ROLES}
    return TestClient(create_app(config)), secrets


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def route_table() -> list[tuple[str, str, str]]:
    """(method, path, policy action) of every route that needs a token, read from the app."""
    app = create_app(load_config())
    rows = []
    for route in app.routes:
        if not isinstance(route, APIRoute):
            continue
        actions = [d.call.action for d in route.dependant.dependencies if hasattr(d.call, "action")]
        if not actions:
            assert route.path == "/healthz", f"{route.path} needs no token"
            continue
        for method in route.methods:
            rows.append((method, route.path, actions[0]))
    return rows


def test_route_table_is_complete(clean_env: Path) -> None:
    rows = route_table()
    assert len(rows) >= 40  # every lifecycle action is a route of its own
    assert {a for _m, _p, a in rows} <= set(tokens.POLICY)  # no route falls back to "admin"


@pytest.mark.parametrize("role", ROLES)
def test_every_route_with_every_role(api: tuple[TestClient, dict[str, str]], role: str) -> None:
    client, secrets = api
    for method, path, action in route_table():
        url = path
        for key in ("{vm}", "{ds}", "{datastore}", "{group}", "{pool}"):
            url = url.replace(key, "nope")
        for key in ("{backup_id}", "{backup}", "{job_id}", "{group_backup}"):
            url = url.replace(key, "999999")
        r = client.request(method, url, json={} if method == "POST" else None,
                           headers=auth(secrets[role]), params={"max_seconds": 0})  # fmt: skip
        allowed = ROLES.index(role) >= ROLES.index(tokens.POLICY[action])
        if allowed:
            assert r.status_code not in (401, 403), (role, method, url, r.text)
        else:
            assert r.status_code == 403, (role, method, url, r.text)
            assert r.json()["error"]["code"] == "Forbidden"
        assert secrets[role] not in r.text


# --- the operator's places through the API -------------------------------------------------------
def test_operator_restore_outside_places_is_403(
    api: tuple[TestClient, dict[str, str]], tmp_path: Path
) -> None:
    client, secrets = api
    secret_file = tmp_path / "root-only"
    secret_file.write_text("key")
    secret_file.chmod(0o600)
    restores = Path(os.environ["VMKEEP_DATA_DIR"]) / "restores"
    traversals = (f"{restores}/../catalog.db", f"{restores}/a/../../../x", "restores/x.qcow2")
    for path in (str(secret_file), "/root/.ssh/authorized_keys", "/etc/", *traversals):
        body = {"disk": "vda", "path": path, "force": True}
        r = client.post("/v1/backups/1/restore", json=body, headers=auth(secrets["operator"]))
        assert r.status_code == 403, r.text
        assert "[restore] allowed_paths" in r.json()["error"]["message"]
    assert secret_file.read_text() == "key" and secret_file.stat().st_mode & 0o777 == 0o600
    # an admin is root: the same request passes the place check (and finds no backup)
    r = client.post(
        "/v1/backups/1/restore",
        json={"disk": "vda", "path": str(secret_file), "force": True},
        headers=auth(secrets["admin"]),
    )
    assert r.status_code == 404, r.text


def test_operator_disk_attach_and_bridge_are_403(api: tuple[TestClient, dict[str, str]]) -> None:
    client, secrets = api
    h = auth(secrets["operator"])
    r = client.post(
        "/v1/vms/nope/actions/disk-attach",
        json={"source": "/etc/shadow", "format": "raw"},
        headers=h,
    )
    assert r.status_code == 403 and "[vmm] image_paths" in r.json()["error"]["message"], r.text
    r = client.post("/v1/vms/nope/actions/nic-attach", json={"bridge": "br-host"}, headers=h)
    assert r.status_code == 403 and "[vmm] bridges" in r.json()["error"]["message"], r.text
    r = client.post("/v1/vms/nope/actions/nic-attach", json={}, headers=h)  # user network
    assert r.status_code == 404, r.text


RAW_XML = """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
<name>raw</name><memory>65536</memory><os><type>hvm</type></os>
<devices>{}</devices>{}</domain>"""


@pytest.mark.parametrize(
    ("devices", "extra", "named"),
    [
        ("", "<qemu:commandline><qemu:arg value='-x'/></qemu:commandline>", "<qemu:commandline>"),
        ("<filesystem type='mount'><source dir='/'/><target dir='r'/></filesystem>", "",
         "<filesystem>"),
        ("<disk type='block' device='disk'><source dev='/dev/vda'/><target dev='vda'/></disk>",
         "", "<disk type='block'>"),
        ("<hostdev mode='subsystem' type='pci'/>", "", "<hostdev>"),
        ("<serial type='dev'><source path='/dev/mem'/></serial>", "", "<serial type='dev'>"),
    ],
)  # fmt: skip
def test_vm_create_refuses_raw_xml(
    api: tuple[TestClient, dict[str, str]], devices: str, extra: str, named: str
) -> None:
    client, secrets = api
    xml = RAW_XML.format(devices, extra)
    r = client.post("/v1/vms", json={"xml": xml}, headers=auth(secrets["admin"]))
    assert r.status_code == 403, r.text
    message = r.json()["error"]["message"]
    assert named in message and "[vmm] allow_raw_xml" in message


def test_allow_raw_xml_lets_an_admin_define_it(clean_env: Path) -> None:
    config = load_config(environ={**os.environ, "VMKEEP_VMM_ALLOW_RAW_XML": "true"})
    trust.check_domain_xml(config, RAW_XML.format("<hostdev/>", ""), "vm create")
    assert trust.raw_xml_findings(RAW_XML.format("<disk type='file'/>", "")) == []


# --- the rules themselves ------------------------------------------------------------------------
def test_restore_destination_rules(clean_env: Path, tmp_path: Path) -> None:
    config = load_config()
    restores = config.data_dir / "restores"
    restores.mkdir(parents=True)
    trust.check_restore_destination(config, OPERATOR, restores / "new.qcow2", False)
    # a link inside the place that leads out of it is outside
    (restores / "out").symlink_to(tmp_path)
    with pytest.raises(NotPermitted):
        trust.check_restore_destination(config, OPERATOR, restores / "out" / "x.qcow2", False)
    with pytest.raises(NotPermitted):
        trust.check_restore_destination(config, OPERATOR, restores / ".." / "catalog.db", False)
    # --force: a file vmkeep created may be replaced, another may not
    foreign, ours = restores / "foreign", restores / "ours"
    foreign.write_text("x")
    ours.write_text("x")
    trust.mark_created(ours)
    trust.check_restore_destination(config, OPERATOR, ours, True)
    with pytest.raises(NotPermitted, match="vmkeep did not create"):
        trust.check_restore_destination(config, OPERATOR, foreign, True)
    with pytest.raises(NotPermitted, match="vmkeep did not create"):
        trust.check_restore_destination(config, OPERATOR, restores, True)
    trust.check_restore_destination(config, trust.LOCAL_ADMIN, foreign, True)


def test_allowed_paths_extend_the_places(clean_env: Path, tmp_path: Path) -> None:
    Path(os.environ["VMKEEP_CONFIG"]).write_text(
        f'version = 1\n[restore]\nallowed_paths = ["{tmp_path}/srv"]\n'
    )
    config = load_config()
    trust.check_restore_destination(config, OPERATOR, tmp_path / "srv" / "a" / "b.qcow2", False)
    with pytest.raises(NotPermitted):
        trust.check_restore_destination(config, OPERATOR, tmp_path / "srv2" / "b.qcow2", False)


def test_terminate_deletes_only_what_vmkeep_created(clean_env: Path, tmp_path: Path) -> None:
    config = load_config()
    images = config.data_dir / "images"
    images.mkdir(parents=True)
    inside, marked, foreign = images / "a.qcow2", tmp_path / "b.qcow2", tmp_path / "c.qcow2"
    for f in (inside, marked, foreign):
        f.write_text("x")
    trust.mark_created(marked)
    link = images / "link.qcow2"
    link.symlink_to(foreign)
    assert trust.may_delete_disk(config, str(inside))
    assert trust.may_delete_disk(config, str(marked))
    assert not trust.may_delete_disk(config, str(foreign))
    assert not trust.may_delete_disk(config, str(link))
    assert not trust.may_delete_disk(config, "/dev/null")


def test_actor_of_job_params() -> None:
    assert trust.actor_of({}) == trust.LOCAL_ADMIN
    assert trust.actor_of({"actor_role": "operator", "actor": "op"}) == OPERATOR
    params: dict[str, Any] = {"actor_role": "root"}
    with pytest.raises(InvalidValue, match="actor_role"):
        trust.actor_of(params)


# --- found by a second reading: what a hostile chain or a shared folder could still do -----------
def test_a_backing_reference_to_a_host_file_is_refused_before_qemu_opens_it(
    clean_env: Path, tmp_path: Path
) -> None:
    """``files ls`` (qemu-storage-daemon, as root) of a chain imported from a hostile datastore
    whose checksums match but whose image names a host file as its backing file."""
    from vmkeep.engine.core import stores
    from vmkeep.engine.points import scan
    from vmkeep.engine.restore import files

    ctx = Context(load_config())
    root = tmp_path / "store"
    stores.add(ctx, "d", "dir", {"path": str(root)})
    host_file = tmp_path / "shadow"
    host_file.write_text("root:$6$secret\n")
    folder = root / "web" / "1"
    folder.mkdir(parents=True)
    image = folder / "0.vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-u", "-b",
                    str(host_file), str(image), "1M"], check=True)  # fmt: skip
    xml = folder / "0.domain.xml"
    xml.write_text("<domain type='qemu'><name>web</name><memory>65536</memory><devices/></domain>")
    rows = [
        {"disk": "vda", "name": image.name, "size": image.stat().st_size,
         "digest": digest_file(image), "virtual_size": 1 << 20},
        {"disk": None, "name": xml.name, "size": 1, "digest": digest_file(xml)},
    ]  # fmt: skip
    manifest = {"vm": "web", "vm_uuid": str(uuid.uuid4()), "chain": "web/1", "mode": "FULL",
                "increments": [{"id": 0, "parent": None, "status": "VALID", "files": rows}]}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))
    bid = scan.scan(ctx, "d", do_import=True)[0]["imported"]
    assert bid
    with pytest.raises(VmkeepError, match="not a file of its chain"):
        files.ls(ctx, bid, "/", None, None, None)


def test_a_stored_domain_xml_names_no_host_file(clean_env: Path, tmp_path: Path) -> None:
    config = load_config()
    lab_kernel = config.lab.dir / "cache" / "vmlinuz"
    ok = RAW_XML.format("<disk type='file' device='disk'><source file='/r/vda.qcow2'/></disk>", "")
    ok = ok.replace(
        "<os><type>hvm</type></os>", f"<os><type>hvm</type><kernel>{lab_kernel}</kernel></os>"
    )
    trust.check_stored_xml(config, ok, "restore", [Path("/r/vda.qcow2")])
    for devices, os_extra in [
        ("", "<initrd>/etc/shadow</initrd>"),
        ("<disk type='file' device='cdrom'><source file='/etc/shadow'/><readonly/></disk>", ""),
        ("<disk type='file' device='disk'><source file='/var/lib/other/x.qcow2'/></disk>", ""),
        ("<console type='pty'><log file='/etc/passwd' append='off'/></console>", ""),
        ("<channel type='unix'><source mode='bind' path='/root/sock'/></channel>", ""),
    ]:
        xml = RAW_XML.format(devices, "").replace(
            "<os><type>hvm</type></os>", f"<os><type>hvm</type>{os_extra}</os>"
        )
        with pytest.raises(NotPermitted, match="names the host file"):
            trust.check_stored_xml(config, xml, "restore", [Path("/r/vda.qcow2")])
    # a restore ejects a cdrom's medium and moves chardev logs into the VM's folder
    from vmkeep.hypervisor.domain_xml import new_domain_xml

    xml = RAW_XML.format(
        "<disk type='file' device='cdrom'><source file='/etc/shadow'/><target dev='hdc'/></disk>"
        "<console type='pty'><log file='/etc/passwd'/></console>", "")  # fmt: skip
    out, _left_out = new_domain_xml(xml, "new", {}, tmp_path, no_nic=True, no_ip=False)
    assert "/etc/shadow" not in out and "/etc/passwd" not in out
    trust.check_stored_xml(config, out, "restore", [tmp_path])


def test_a_place_folder_others_can_write_is_refused(clean_env: Path) -> None:
    config = load_config()
    shared = config.data_dir / "restores" / "shared"
    shared.mkdir(parents=True)
    shared.chmod(0o777)  # another user could plant a link or swap a folder here
    with pytest.raises(NotPermitted, match="writable by other users"):
        trust.check_restore_destination(config, OPERATOR, shared / "vda.qcow2", False)
    shared.chmod(0o755)
    trust.check_restore_destination(config, OPERATOR, shared / "vda.qcow2", False)


def test_operator_images_are_raw_or_plain_qcow2(clean_env: Path) -> None:
    config = load_config()
    images = config.data_dir / "images"
    images.mkdir(parents=True)
    raw, plain, backed = images / "a.raw", images / "b.qcow2", images / "c.qcow2"
    raw.write_bytes(b"\0" * 4096)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(plain), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-u", "-b",
                    "/etc/shadow", str(backed), "1M"], check=True)  # fmt: skip
    # the check returns the format it learned (the caller probes no more), None when it read none
    assert trust.check_image_source(config, OPERATOR, str(raw), "raw") == "raw"
    assert trust.check_image_source(config, OPERATOR, str(raw), None) == "raw"
    assert trust.check_image_source(config, OPERATOR, str(plain), None) == "qcow2"
    with pytest.raises(NotPermitted, match="names another file"):
        trust.check_image_source(config, OPERATOR, str(backed), None)
    with pytest.raises(NotPermitted, match="raw or qcow2"):
        trust.check_image_source(config, OPERATOR, str(raw), "vmdk")
    assert trust.check_image_source(config, trust.LOCAL_ADMIN, str(backed), None) is None
    assert trust.check_image_source(config, OPERATOR, str(images / "new.qcow2"), "qcow2") is None


def test_disk_attach_target_is_a_disk_name(api: tuple[TestClient, dict[str, str]]) -> None:
    client, secrets = api
    r = client.post("/v1/vms/nope/actions/disk-attach", json={"target": "x/../../y", "size": "1M"},
                    headers=auth(secrets["operator"]))  # fmt: skip
    assert r.status_code == 422 and "disk target is" in r.text, r.text


def test_files_get_copies_drop_setuid_and_extended_attributes(tmp_path: Path) -> None:
    from vmkeep.engine.restore.files import _copy_regular

    src, dest = tmp_path / "su", tmp_path / "copy"
    src.write_text("#!/bin/sh\n")
    src.chmod(0o4755)
    os.setxattr(src, "user.vmkeep.created", b"1")
    _copy_regular(str(src), str(dest))
    assert dest.stat().st_mode & 0o7777 == 0o700
    assert os.listxattr(dest) == []


def test_a_stored_datastore_the_allowlist_now_refuses_is_listed_with_its_error(
    clean_env: Path,
) -> None:
    from vmkeep.catalog.tables import Datastore
    from vmkeep.engine.core import stores

    ctx = Context(load_config())
    options = {"host": "nas", "path": "/srv/b", "args": "-a --rsync-path=/tmp/x"}
    with ctx.catalog.session() as s:  # as an older vmkeep stored it
        s.add(Datastore(name="old", driver="rsync", options=options))
    (row,) = stores.list_all(ctx)
    assert row["name"] == "old" and "--rsync-path" in row["error"] and row["options"] == {}


def test_disk_attach_reads_an_image_once(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the VM's lock, ``disk attach`` runs ``qemu-img info`` on the image once at most: the
    operator's check hands on the format it read; a given --format or a new image needs none."""
    from types import SimpleNamespace

    from vmkeep.engine.lifecycle import operations
    from vmkeep.hypervisor.vmm import DiskSpec
    from vmkeep.model import DiskInfo, DomainInfo, VmState, Warnings

    config = load_config()
    images = config.data_dir / "images"
    images.mkdir(parents=True)
    raw, plain = images / "a.raw", images / "b.qcow2"
    raw.write_bytes(b"\0" * 4096)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(plain), "1M"], check=True)
    probes: list[str] = []

    def counted(path: Path | str, check: bool = True) -> dict[str, Any]:
        probes.append(str(path))
        return real_info(path, check)

    real_info = trust.qemu_img_info
    monkeypatch.setattr(trust, "qemu_img_info", counted)
    monkeypatch.setattr(operations, "qemu_img_info", counted)
    monkeypatch.setattr(operations, "open_to_qemu", lambda *a: None)
    disk0 = DiskInfo("vda", str(images / "root.qcow2"), "qcow2")
    domain = DomainInfo("web", "u", VmState.POWEROFF, False, True, disks=(disk0,))
    attached: list[DiskSpec] = []
    hv = SimpleNamespace(domain=lambda name: domain)
    ctx: Any = SimpleNamespace(config=config, hv=hv)
    vmm: Any = SimpleNamespace(attach_disk=lambda name, spec: attached.append(spec))
    vm: Any = SimpleNamespace(name="web", id=1)

    def attach(actor: Actor = OPERATOR, **opts: Any) -> tuple[str, int]:
        probes.clear()
        operations.disk_attach(ctx, vmm, vm, {**opts, trust.ACTOR: actor}, Warnings())
        return attached[-1].fmt, len(probes)

    assert attach(source=str(plain)) == ("qcow2", 1)
    assert attach(source=str(raw)) == ("raw", 1)
    assert attach(trust.LOCAL_ADMIN, source=str(plain)) == ("qcow2", 1)  # no check, one probe
    assert attach(source=str(plain), format="qcow2") == ("qcow2", 0)
    assert attach(size="1M") == ("qcow2", 0)
    assert (images / "web-vdb.qcow2").is_file()
    with pytest.raises(NotPermitted, match="raw or qcow2"):
        attach(source=str(raw), format="vmdk")
