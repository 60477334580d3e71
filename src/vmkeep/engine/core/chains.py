"""The one place that queries backup chains: names of checkpoints and files, the latest chain of a
VM, valid restore points, manifests and the JSON rows of backups.

backup, restore, retention, groups and recovery read chains through this module only.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload, object_session

from vmkeep.catalog.locks import lock
from vmkeep.catalog.tables import (
    Backup,
    Datastore,
    Drill,
    GroupBackup,
    GroupBackupMember,
    Increment,
    Vm,
)
from vmkeep.checksums import algorithm_of, matches
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.images import backing_name
from vmkeep.errors import BackupNotFound, IncrementDamaged, IncrementNotFound, WrongState
from vmkeep.model import BackupMode, BackupStatus

if TYPE_CHECKING:  # reading the catalog needs no driver (nor their pydantic models)
    from vmkeep.datastores import DatastoreDriver

CHECKPOINT_PREFIX = "vmkeep-"
# a file row's key while a retention merge stores its rewritten file: {"digest", "size"} of it
# (engine/points/merge.py; a merge killed after its store leaves it for the next run)
PENDING = "pending"
# its scratch folders: merge-<backup id>-*, on the datastore's file system or in the data dir
# (recovery removes those a killed merge left)
MERGE_PREFIX = "merge-"


def checkpoint_name(backup_id: int, seq: int) -> str:
    return f"{CHECKPOINT_PREFIX}{backup_id}-{seq}"


def disk_file(seq: int, disk: str) -> str:
    return f"{seq}.{disk}.qcow2"


def xml_file(seq: int) -> str:
    return f"{seq}.domain.xml"


def memory_file(seq: int) -> str:
    """The guest's RAM and device state at point ``seq`` (libvirt's save-image format)."""
    return f"{seq}.memory"


def new_chain_key(
    s: Session, vm_name: str, backup_id: int, ds_id: int, stored: Collection[str] = ()
) -> str:
    """``<vm>/<backup id>``, unless that key is taken: by a chain imported from another catalog,
    or by one in the datastore the catalog does not know (``stored``: a lost catalog's chains
    before ``datastore scan --import``) — never write into another chain."""
    key = f"{vm_name}/{backup_id}"
    taken = select(Backup.id).where(Backup.datastore_id == ds_id, Backup.chain == key)
    if key in stored or s.execute(taken.where(Backup.id != backup_id)).first() is not None:
        key = f"{vm_name}/{backup_id}-{uuid.uuid4().hex[:6]}"
    return key


def find_backup(s: Session, backup_id: int) -> Backup:
    """A chain's row by its id; BackupNotFound when there is none."""
    b = s.get(Backup, backup_id)
    if b is None:
        raise BackupNotFound(backup_id)
    return b


@contextmanager
def chain_locked(ctx: Context, backup_id: int, what: str) -> Iterator[None]:
    """Hold the lock of the VM whose chain ``backup_id`` is (BackupNotFound first): no backup,
    retention or other change of its chains meanwhile."""
    with ctx.catalog.session() as s:
        b = find_backup(s, backup_id)
        vm_id, name = b.vm_id, b.vm.name
    with lock(ctx.catalog, f"vm:{vm_id}", what, label=f"VM {name}"):
        yield


def latest_chain(s: Session, vm_id: int, ds_id: int) -> Backup | None:
    """The newest VALID incremental chain of a VM on a datastore (the one a new increment
    extends). A chain without a checkpoint to extend (copied here, imported from a lost catalog,
    or reset by an in-place restore) is passed over for a newer-taken one that has it."""
    rows = (
        s.execute(
            select(Backup)
            .where(
                Backup.vm_id == vm_id,
                Backup.datastore_id == ds_id,
                Backup.status == BackupStatus.VALID,
                Backup.mode == BackupMode.INCREMENT,
            )
            .order_by(Backup.created_at.desc(), Backup.id.desc())
        )
        .scalars()
        .all()
    )
    extendable = [b for b in rows if (v := valid_increments(b)) and v[-1].checkpoint]
    return extendable[0] if extendable else (rows[0] if rows else None)


def valid_increments(b: Backup) -> list[Increment]:
    return [i for i in b.increments if i.status == BackupStatus.VALID]


def point(b: Backup, increment: int | None) -> tuple[Increment, list[Increment]]:
    """The chosen increment (newest when None) and its chain from the base, by parent links."""
    valid = {i.seq: i for i in valid_increments(b)}
    damaged = {i.seq: i for i in b.increments if i.status == BackupStatus.DAMAGED}
    # the newest sound point by default; a damaged one only when nothing else is left
    newest = max(valid) if valid else max(damaged, default=-1)
    seq = newest if increment is None else increment
    if seq in damaged:
        others = ", ".join(map(str, sorted(valid))) or "none left in this backup"
        raise IncrementDamaged(seq, b.id, damaged[seq].error, others)
    if not valid:
        raise WrongState(f"backup {b.id}", b.status, "restore", "a VALID increment")
    if seq not in valid:
        raise IncrementNotFound(b.id, seq, ", ".join(map(str, sorted(valid))))
    chain = [valid[seq]]
    while chain[-1].parent is not None:
        parent = valid.get(chain[-1].parent)
        if parent is None:
            raise WrongState(
                f"backup {b.id}",
                f"missing increment {chain[-1].parent}",
                "restore",
                "a whole chain",
            )
        chain.append(parent)
    return valid[seq], list(reversed(chain))


def point_files(chain: list[Increment], disks: list[str]) -> list[dict[str, Any]]:
    """The file rows a restore of the chain's last point reads for ``disks``: per disk, its
    file at each point from that one back to the point where it is a full (the chain's base,
    or where the disk joined the chain: docs/architecture.md, "Chains that follow the disks").
    Files of an earlier part of the disk's chain (before it was detached or excluded) are not
    needed."""
    rows = []
    for disk in disks:
        for inc in reversed(chain):
            row = next((f for f in inc.files if f["disk"] == disk), None)
            if row is None:  # a point built on one without the disk copies it whole
                raise WrongState(
                    f"backup {inc.backup_id}",
                    f"missing disk {disk} in increment {inc.seq}",
                    "restore",
                    f"disk {disk} in every point since the one where it is a full",
                )
            rows.append(row)
            if inc.parent is None or row.get("full"):
                break
    return rows


def needed_by_protected(b: Backup) -> set[int]:
    """The seqs of the chain's protected points and of every point they are built on (by parent
    links): restoring a protected point needs them all, so none of them may be deleted or merged
    away. The one rule retention and delete share (docs/policies.md, "Protected points")."""
    by_seq = {i.seq: i for i in b.increments}
    needed: set[int] = set()
    for inc in b.increments:
        seq: int | None = inc.seq if inc.protected else None
        while seq is not None and seq not in needed:
            needed.add(seq)
            parent = by_seq.get(seq)
            seq = parent.parent if parent is not None else None
    return needed


def protected_seqs(b: Backup) -> list[int]:
    """The chain's protected points, in order."""
    return sorted(i.seq for i in b.increments if i.protected)


def chain_disks(s: Session, backup_id: int) -> set[str]:
    b = s.get(Backup, backup_id)
    return {f["disk"] for i in b.increments for f in i.files if f["disk"]} if b else set()


def increment_file_names(disks: set[str] | list[str], seq: int) -> list[str]:
    """Every file one increment may have in the datastore (disks, domain XML, memory state)."""
    return [disk_file(seq, d) for d in sorted(disks)] + [xml_file(seq), memory_file(seq)]


def running_increments(s: Session, vm_id: int) -> list[tuple[Backup, Increment]]:
    """Increments of a VM still marked RUNNING (a live backup, or one whose process died)."""
    rows = s.execute(
        select(Increment, Backup)
        .join(Backup)
        .where(Backup.vm_id == vm_id, Increment.status == BackupStatus.RUNNING)
    ).all()
    return [(b, i) for i, b in rows]


def checkpoints_to_keep(s: Session, vm_id: int) -> set[str]:
    """Checkpoints that are the base of a future increment of some VALID chain of the VM."""
    keep = set()
    chains = s.execute(
        select(Backup).where(Backup.vm_id == vm_id, Backup.status == BackupStatus.VALID)
    ).scalars()
    for b in chains:
        valid = valid_increments(b)
        if valid and valid[-1].checkpoint:
            keep.add(valid[-1].checkpoint)
    return keep


def mark_damaged(ctx: Context, backup_id: int, file_name: str, reason: str) -> list[int]:
    """Mark the increment holding ``file_name`` and every increment built on it DAMAGED: they
    are never restored and never extended (the next backup starts a new chain). Returns them."""
    with ctx.catalog.session() as s:
        b = s.get(Backup, backup_id)
        if b is None:
            return []
        owner = next((i for i in b.increments for f in i.files if f["name"] == file_name), None)
        if owner is None:
            return []
        damaged = {owner.seq}
        for inc in sorted(b.increments, key=lambda i: i.seq):
            if inc.parent in damaged:
                damaged.add(inc.seq)
        for inc in b.increments:
            if inc.seq in damaged and inc.status == BackupStatus.VALID:
                inc.status, inc.error = BackupStatus.DAMAGED, reason
        return sorted(damaged)


def pending_checksums(ctx: Context, backup_id: int) -> dict[str, dict[str, Any]]:
    """Stored file name -> the ``PENDING`` checksum a retention merge recorded before storing
    it (left on the row when the merge was killed before its catalog update)."""
    with ctx.catalog.session() as s:
        b = s.get(Backup, backup_id)
        if b is None:
            return {}
        return {f["name"]: f[PENDING] for i in b.increments for f in i.files if PENDING in f}


def pending_entry(
    path: Path, got: str, pending: dict[str, Any] | None, stop: Callable[[], bool] | None = None
) -> dict[str, Any] | None:
    """A fetched file that does not match its row's checksum (``got`` is its checksum in the
    row's algorithm) but has the ``PENDING`` one: a killed retention merge stored it, rebased or
    flattened, reading as the same point. Its new row values for ``adopt_pending``, else None."""
    if not pending:
        return None
    want = str(pending["digest"])
    same = got == want if algorithm_of(got) == algorithm_of(want) else matches(path, want, stop)[0]
    if not same:
        return None
    return {"digest": want, "size": int(pending["size"]), "full": backing_name(path) is None}


def adopt_pending(ctx: Context, backup_id: int, adopted: dict[str, dict[str, Any]]) -> None:
    """Rows whose stored file was found to be the one a killed retention merge stored (its
    ``PENDING`` checksum): that checksum, size and whether it is a full are recorded."""
    with ctx.catalog.session() as s:
        b = s.get(Backup, backup_id)
        if b is None:
            return
        for inc in b.increments:
            inc.files = [adopted_row(f, adopted[f["name"]]) if f["name"] in adopted else f
                         for f in inc.files]  # fmt: skip


def adopted_row(f: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A file row with the values ``pending_entry`` found for its stored file."""
    out = {k: v for k, v in f.items() if k not in (PENDING, "sha256", "full")}
    out.update(digest=new["digest"], size=new["size"])
    if new["full"]:
        out["full"] = True
    return out


def write_manifest(ctx: Context, driver: DatastoreDriver, backup_id: int) -> None:
    """The chain's manifest.json (per-file checksum), replaced atomically by the driver."""
    with ctx.catalog.session() as s:
        b = s.get(Backup, backup_id)
        assert b is not None
        data = backup_dict(b)
    for inc in data["increments"]:
        for key in _CATALOG_ONLY:
            inc.pop(key, None)
    ctx.config.data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ctx.config.data_dir) as tmp:
        path = Path(tmp) / "manifest.json"
        path.write_text(json.dumps(data, indent=2, default=str))
        driver.backup(data["chain"], [path])


def _batches(ids: Sequence[int], size: int = 500) -> Iterator[Sequence[int]]:
    for k in range(0, len(ids), size):  # IN lists of bounded length (database limits)
        yield ids[k : k + size]


def group_points(s: Session, backup_ids: Sequence[int]) -> dict[int, dict[int, dict[str, Any]]]:
    """Per backup, per increment seq: the group restore point it belongs to (``backups show``)."""
    out: dict[int, dict[int, dict[str, Any]]] = {}
    for ids in _batches(backup_ids):
        rows = s.execute(
            select(GroupBackupMember)
            .where(GroupBackupMember.backup_id.in_(ids), GroupBackupMember.seq.is_not(None))
            .options(joinedload(GroupBackupMember.group_backup).joinedload(GroupBackup.group))
        ).scalars()
        for m in rows:
            assert m.backup_id is not None and m.seq is not None
            out.setdefault(m.backup_id, {})[m.seq] = {
                "group_backup": m.group_backup.id,
                "group": m.group_backup.group.name,
                "group_freeze_window_ms": m.group_backup.freeze_window_ms,
                "member_freeze_ms": m.freeze_ms,
            }
    return out


def last_drills(s: Session, backup_ids: Sequence[int]) -> dict[int, dict[int, dict[str, Any]]]:
    """Per backup, per increment seq: its newest restore drill (``backups show``)."""
    out: dict[int, dict[int, dict[str, Any]]] = {}
    for ids in _batches(backup_ids):
        rows = s.execute(
            select(Increment.backup_id, Increment.seq, Drill)
            .join(Drill, Drill.increment_id == Increment.id)
            .where(Increment.backup_id.in_(ids))
            .order_by(Drill.id)
        ).all()
        for bid, seq, d in rows:  # ordered by id: the newest drill of a point wins
            took = (d.finished_at - d.started_at).total_seconds() if d.finished_at else None
            out.setdefault(bid, {})[seq] = {
                "drill": d.id, "result": d.result, "reason": d.reason, "at": d.finished_at,
                "duration_s": None if took is None else round(took, 1),
            }  # fmt: skip
    return out


# What a point's row shows, in its JSON's order: key -> column.
_INCREMENT_SHOWN: dict[str, Any] = {
    "id": Increment.seq, "parent": Increment.parent, "status": Increment.status,
    "checkpoint": Increment.checkpoint, "size": Increment.size,
    "consistency": Increment.consistency, "freeze_ms": Increment.freeze_ms,
    "started": Increment.started_at, "finished": Increment.finished_at, "error": Increment.error,
    "files": Increment.files, "protected": Increment.protected,
    "protected_by": Increment.protected_by, "protected_at": Increment.protected_at,
    "note": Increment.note, "verified_at": Increment.verified_at,
    "verify_result": Increment.verify_result,
}  # fmt: skip
# Kept in the catalog only, never in a chain's manifest: a manifest is written when the chain's
# files change, so it would go stale, and an import must not take protection from a datastore.
_CATALOG_ONLY = (
    "protected",
    "protected_by",
    "protected_at",
    "note",
    "verified_at",
    "verify_result",
)


def _increment_rows(s: Session, backup_ids: Sequence[int]) -> dict[int, list[dict[str, Any]]]:
    """Per backup, its increments in order, as the dicts ``_shown`` completes, read as plain
    tuples through Core: 10,000 ORM objects took ~0.4 s of a ~0.7 s list, named access to
    10,000 ORM-path rows ~0.1 s."""
    out: dict[int, list[dict[str, Any]]] = {}
    conn = s.connection()
    for ids in _batches(backup_ids):
        rows = conn.execute(
            select(*_INCREMENT_SHOWN.values(), Increment.backup_id)
            .where(Increment.backup_id.in_(ids))
            .order_by(Increment.backup_id, Increment.seq)
        ).all()
        for r in rows:  # zip stops at the keys: the last column, backup_id, is not shown
            out.setdefault(r[-1], []).append(dict(zip(_INCREMENT_SHOWN, r, strict=False)))
    return out


# What a backup's row shows besides its points, in its JSON's order: key -> column.
_BACKUP_SHOWN: dict[str, Any] = {
    "id": Backup.id, "vm": Vm.name, "vm_id": Backup.vm_id, "vm_uuid": Vm.uuid,
    "datastore": Datastore.name, "chain": Backup.chain, "mode": Backup.mode,
    "status": Backup.status, "active_flatten": Backup.active_flatten,
    "created": Backup.created_at, "finished": Backup.finished_at, "error": Backup.error,
}  # fmt: skip


def backup_dicts(s: Session, *where: Any) -> list[dict[str, Any]]:
    """The rows of the backups ``where`` selects (all of them: none given), in id order, each
    with its points, in a fixed number of plain queries (``backups list`` at any scale)."""
    s.flush()  # what follows reads through Core, which does not flush the session's changes
    rows = (
        s.connection()
        .execute(
            select(*_BACKUP_SHOWN.values())
            .join(Vm, Vm.id == Backup.vm_id)
            .join(Datastore, Datastore.id == Backup.datastore_id)
            .where(*where)
            .order_by(Backup.id)
        )
        .all()
    )
    ids = [r[0] for r in rows]
    incs, groups, drills = _increment_rows(s, ids), group_points(s, ids), last_drills(s, ids)
    out = []
    for r in rows:
        d = dict(zip(_BACKUP_SHOWN, r, strict=True))
        g, dr = groups.get(r[0], {}), drills.get(r[0], {})
        d["increments"] = [_shown(i, g.get(i["id"]), dr.get(i["id"])) for i in incs.get(r[0], [])]
        out.append(d)
    return out


def backup_dict(b: Backup) -> dict[str, Any]:
    """The row of one backup its session holds."""
    s = object_session(b)
    assert s is not None, "backup_dict needs the backup's session"
    s.flush()  # a new backup gets its id
    return backup_dicts(s, Backup.id == b.id)[0]


def _shown(
    d: dict[str, Any], group: dict[str, Any] | None, drill: dict[str, Any] | None
) -> dict[str, Any]:
    """A point's row completed: its group point, whether it holds memory, the disks it left out
    (EXCLUDE_DISKS; recorded on its domain XML's row), its last drill."""
    if group:
        d["group"] = group
    for f in d["files"]:
        if "excluded_disks" in f:
            d["excluded_disks"] = f["excluded_disks"]
        if f.get("memory"):  # a point with the VM's memory state
            d["memory"], d["downtime_ms"] = True, d["freeze_ms"]
    d["last_drill"] = drill
    return d


def reset_checkpoints(ctx: Context, vm_id: int, name: str) -> list[str]:
    """After the VM's disks were rolled back (restore in place, a snapshot revert) its
    checkpoints describe other data: drop them, and stop every chain of this VM from being
    extended (its next backup is a new full)."""
    dropped = []
    for cp in ctx.hv.checkpoints(name):
        if cp.startswith(CHECKPOINT_PREFIX):
            ctx.hv.delete_checkpoint(name, cp)
            dropped.append(cp)
    with ctx.catalog.session() as s:
        for b in s.execute(select(Backup).where(Backup.vm_id == vm_id)).scalars():
            for inc in b.increments:
                inc.checkpoint = None
    return dropped
