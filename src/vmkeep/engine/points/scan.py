"""Disaster recovery: the catalog from a datastore. ``scan`` lists its chains and imports the
unknown ones from their manifests, each checked like user input first (``check_manifest``, the
stored domain XML by the check of ``vm create``)."""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from vmkeep.catalog.tables import Backup, Increment, Vm
from vmkeep.checksums import matches, row_digest
from vmkeep.datastores import DatastoreDriver
from vmkeep.engine.core.chains import disk_file, write_manifest
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.stores import driver_of, find_datastore
from vmkeep.engine.core.trust import check_domain_xml
from vmkeep.engine.points.scratch import scratch
from vmkeep.errors import ChecksumMismatch, DatastoreError, InvalidValue, NotPermitted
from vmkeep.model import BackupStatus, LcmState, VmState
from vmkeep.names import check_chain_key, check_disk_name, check_file_name, check_name

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


def scan(ctx: Context, ref: str, do_import: bool = False) -> list[dict[str, Any]]:
    """Every chain in the datastore, whether the catalog knows it, and (``do_import``) the
    unknown ones added from their manifests, restorable at once.

    A datastore is untrusted input: every name it gives (chain key, VM, file, disk) passes the
    rules of names.py and every stored domain XML the check of ``vm create`` before anything is
    imported. A chain that fails is refused (its row's ``refused`` says why) and the others
    are imported."""
    with ctx.catalog.session() as s:
        ds = find_datastore(s, ref)
        ds_id, driver = ds.id, driver_of(ds)
        known = set(s.execute(select(Backup.chain).where(Backup.datastore_id == ds_id)).scalars())
    found = []
    with scratch(ctx) as tmp:
        for chain in driver.chains():
            row: dict[str, Any] = {"chain": chain, "known": chain in known, "imported": None}
            if chain not in known:
                try:
                    check_chain_key("chain key", chain)
                except InvalidValue as err:
                    row["refused"] = str(err)
                    found.append(row)
                    continue
                work = Path(tmp) / chain.replace("/", "-")
                try:
                    path = driver.restore(chain, [MANIFEST], work)
                    manifest = json.loads(path[MANIFEST].read_text())
                except (DatastoreError, ValueError, OSError) as err:
                    row["error"] = f"no readable {MANIFEST}: {err}"
                    found.append(row)
                    continue
                try:
                    row["vm"] = manifest["vm"]
                    row["increments"] = [
                        int(i["id"]) for i in manifest["increments"] if i["status"] == "VALID"
                    ]
                except (KeyError, TypeError, ValueError, AttributeError) as err:
                    row["error"] = (
                        f"{MANIFEST} is not a vmkeep manifest ({type(err).__name__}: {err})"
                    )
                    found.append(row)
                    continue
                try:
                    xml_rows = check_manifest(manifest)
                    if do_import:
                        _check_stored_xml(ctx, driver, chain, xml_rows, work / "xml")
                        row["imported"] = _import(ctx, ds_id, driver, chain, manifest)
                except (InvalidValue, NotPermitted, ChecksumMismatch) as err:
                    row["refused"] = str(err)
                    log.warning("datastore %s: chain %s refused: %s", driver.name, chain, err)
                except DatastoreError as err:
                    row["error"] = str(err)
                except (KeyError, TypeError, ValueError, AttributeError) as err:
                    row["error"] = (
                        f"{MANIFEST} is not a vmkeep manifest ({type(err).__name__}: {err})"
                    )
            found.append(row)
    return found


def check_manifest(m: Any) -> list[dict[str, Any]]:
    """A manifest read from a datastore, checked like user input: the VM's name by the name
    rule, every VALID increment's id and parent numbers, every file's name and disk by the rules
    of names.py (they become paths and QEMU options). InvalidValue naming the first that fails;
    else the rows of the stored domain XML files (one per VALID increment)."""
    if not isinstance(m, dict) or not isinstance(m.get("increments"), list):
        raise InvalidValue(MANIFEST, "(its content)", "not a vmkeep manifest")
    check_name(f"the VM name in {MANIFEST}", m.get("vm"))
    xml_rows = []
    for inc in m["increments"]:
        if not isinstance(inc, dict) or inc.get("status") != "VALID":
            continue
        seq, parent = inc.get("id"), inc.get("parent")
        if type(seq) is not int or seq < 0:
            raise InvalidValue(f"an increment id in {MANIFEST}", seq, "a number 0 or more")
        if parent is not None and (type(parent) is not int or not 0 <= parent < seq):
            raise InvalidValue(
                f"the parent of increment {seq} in {MANIFEST}", parent, "an earlier increment"
            )
        files = inc.get("files") or []
        if not isinstance(files, list):
            raise InvalidValue(f"the files of increment {seq} in {MANIFEST}", "?", "a list")
        for f in files:
            if not isinstance(f, dict):
                raise InvalidValue(f"a file of increment {seq} in {MANIFEST}", "?", "an object")
            disk = f.get("disk")
            if disk is not None:
                check_disk_name(f"a disk of increment {seq} in {MANIFEST}", disk)
            name = check_file_name(f"a file name in {MANIFEST}", f.get("name"))
            if disk is not None:
                if name != disk_file(seq, disk):
                    raise InvalidValue(
                        f"a file name in {MANIFEST}", name, f"disk {disk} of increment {seq} "
                        f"is stored as {disk_file(seq, disk)}"
                    )  # fmt: skip
            elif not f.get("memory"):
                xml_rows.append(f)
    return xml_rows


def _check_stored_xml(
    ctx: Context, driver: DatastoreDriver, chain: str, rows: list[dict[str, Any]], work: Path
) -> None:
    """Every stored domain XML of a chain passes the check of ``vm create`` (a restore defines
    it): NotPermitted naming the file. Each is fetched, matched to its manifest checksum (the
    one a restore verifies) and checked."""
    if not rows:
        return
    local = driver.restore(chain, [f["name"] for f in rows], work)
    for f in rows:
        path = local[f["name"]]
        ok, got = matches(path, row_digest(f))
        if not ok:
            raise ChecksumMismatch(f"{chain}/{f['name']}", row_digest(f), got)
        xml = path.read_text(errors="replace")
        try:
            check_domain_xml(ctx.config, xml, f"importing {chain}/{f['name']}")
        except InvalidValue as err:  # not well-formed XML
            raise InvalidValue(f"{chain}/{f['name']}", "(its content)", str(err)) from None


def _when(value: Any) -> datetime | None:
    """A manifest's time (the catalog keeps aware times: a naive one is UTC)."""
    if not isinstance(value, str):
        return None
    when = datetime.fromisoformat(value)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _import(
    ctx: Context, ds_id: int, driver: DatastoreDriver, chain: str, m: dict[str, Any]
) -> int:
    check_manifest(m)  # every name again: _import never trusts its caller for that
    incs = [i for i in m["increments"] if i.get("status") == "VALID"]
    with ctx.catalog.session() as s:
        vm = None
        if m.get("vm_uuid"):
            vm = s.execute(select(Vm).where(Vm.uuid == m["vm_uuid"])).scalar_one_or_none()
        if vm is None:
            vm = s.execute(select(Vm).where(Vm.name == m["vm"])).scalar_one_or_none()
        if vm is None:
            vm = Vm(
                name=m["vm"],
                uuid=m.get("vm_uuid") or str(uuid.uuid4()),
                host_uri=ctx.config.libvirt.uri,
                state=VmState.UNKNOWN,
                lcm_state=LcmState.UNKNOWN,
                backup_config={},
            )
            s.add(vm)
            s.flush()
        b = Backup(
            vm_id=vm.id,
            datastore_id=ds_id,
            chain=chain,
            mode=m.get("mode", "FULL"),
            status=BackupStatus.VALID if incs else BackupStatus.FAILED,
            created_at=_when(m.get("created")) or datetime.now(UTC),
            finished_at=_when(m.get("finished")),
        )
        for i in incs:
            b.increments.append(
                Increment(
                    seq=i["id"],
                    parent=i.get("parent"),
                    status=BackupStatus.VALID,
                    checkpoint=None,  # the checkpoints were on the lost host: never extended
                    size=i.get("size") or 0,
                    consistency=i.get("consistency"),
                    freeze_ms=i.get("freeze_ms"),
                    started_at=_when(i.get("started")),
                    finished_at=_when(i.get("finished")),
                    files=i.get("files") or [],
                )
            )
        s.add(b)
        s.flush()
        new_id = b.id
    write_manifest(ctx, driver, new_id)
    return new_id
