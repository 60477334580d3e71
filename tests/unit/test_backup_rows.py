"""``backups list`` / ``show`` rows are read as plain tuples (10,000 points in ~0.1 s): what they
show must be what the catalog holds, points completed with their group point, memory state and
newest drill, times as aware UTC datetimes, and a session's unflushed changes included."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from vmkeep.catalog.tables import (
    Backup,
    Datastore,
    Drill,
    Group,
    GroupBackup,
    GroupBackupMember,
    Increment,
    Vm,
)
from vmkeep.config import load_config
from vmkeep.engine.core.chains import backup_dict
from vmkeep.engine.core.context import Context
from vmkeep.engine.points import listing

T0 = datetime(2026, 12, 4, 1, 2, 3, 456789, tzinfo=UTC)


def disk(seq: int) -> dict[str, object]:
    return {"disk": "vda", "name": f"{seq}.vda.qcow2", "size": 10 + seq, "digest": f"blake3:{seq}"}


def fill(ctx: Context) -> int:
    with ctx.catalog.session() as s:
        ds = Datastore(name="ds", driver="dir", options={"path": "/nonexistent"})
        g = Group(name="g")
        s.add_all([ds, g])
        s.flush()
        for n in (1, 2):
            vm = Vm(name=f"vm{n}", uuid=f"uuid-{n}", host_uri="qemu:///system", state="ACTIVE",
                    lcm_state="RUNNING")  # fmt: skip
            s.add(vm)
            s.flush()
            b = Backup(vm_id=vm.id, datastore_id=ds.id, chain=f"vm{n}/1", mode="INCREMENT",
                       status="VALID", created_at=T0, finished_at=None)  # fmt: skip
            s.add(b)
            s.flush()
            for seq in range(3):
                files = [disk(seq), {"disk": None, "name": f"{seq}.domain.xml", "size": 1}]
                if n == 2 and seq == 1:
                    files.append({"disk": None, "name": "1.memory", "size": 5, "memory": True})
                s.add(Increment(backup_id=b.id, seq=seq, parent=seq - 1 if seq else None,
                                status="VALID", consistency="AGENT_FROZEN", size=100 + seq,
                                files=files, freeze_ms=1.5 + seq, started_at=T0,
                                finished_at=T0 + timedelta(seconds=seq)))  # fmt: skip
        s.flush()
        b2 = s.query(Backup).filter_by(chain="vm2/1").one()
        inc = s.query(Increment).filter_by(backup_id=b2.id, seq=2).one()
        s.add_all([Drill(increment_id=inc.id, result="FAIL", reason="old", finished_at=T0),
                   Drill(increment_id=inc.id, result="PASS", finished_at=T0)])  # fmt: skip
        gb = GroupBackup(group_id=g.id, datastore_id=ds.id, status="VALID", freeze_window_ms=7.0)
        s.add(gb)
        s.flush()
        s.add(GroupBackupMember(group_backup_id=gb.id, vm_id=b2.vm_id, vm_name="vm2",
                                position=0, backup_id=b2.id, seq=0, status="VALID",
                                freeze_ms=3.0))  # fmt: skip
        return b2.id


def test_rows_show_what_the_catalog_holds(clean_env: Path) -> None:
    ctx = Context(load_config())
    b2 = fill(ctx)
    rows = listing.list_backups(ctx)
    assert [(r["vm"], r["chain"], r["datastore"], r["vm_uuid"]) for r in rows] == [
        ("vm1", "vm1/1", "ds", "uuid-1"),
        ("vm2", "vm2/1", "ds", "uuid-2"),
    ]
    r = rows[1]
    assert list(r) == ["id", "vm", "vm_id", "vm_uuid", "datastore", "chain", "mode", "status",
                       "active_flatten", "created", "finished", "error", "increments"]  # fmt: skip
    assert (r["id"], r["created"], r["finished"]) == (b2, T0, None)
    assert r["created"].tzinfo is UTC
    full, mem, last = r["increments"]
    assert list(full) == ["id", "parent", "status", "checkpoint", "size", "consistency",
                          "freeze_ms", "started", "finished", "error", "files", "protected",
                          "protected_by", "protected_at", "note", "verified_at",
                          "verify_result", "group",
                          "last_drill"]  # fmt: skip
    assert (full["protected"], full["protected_by"], full["note"]) == (False, None, None)
    assert full["group"] == {"group_backup": 1, "group": "g", "group_freeze_window_ms": 7.0,
                             "member_freeze_ms": 3.0}  # fmt: skip
    assert (mem["id"], mem["parent"], mem["memory"], mem["downtime_ms"]) == (1, 0, True, 2.5)
    assert "group" not in mem and "memory" not in last
    assert last["last_drill"]["result"] == "PASS"  # the newest drill of the point
    assert (last["size"], last["finished"], last["files"][0]) == (
        102,
        T0 + timedelta(seconds=2),
        disk(2),
    )
    assert listing.list_backups(ctx, "vm2") == [r]
    assert listing.show_backup(ctx, b2) == r


def test_a_sessions_unflushed_changes_are_shown(clean_env: Path) -> None:
    ctx = Context(load_config())
    b2 = fill(ctx)
    with ctx.catalog.session() as s:
        b = s.get(Backup, b2)
        assert b is not None
        b.status = "DAMAGED"
        b.increments[0].error = "changed, not flushed"
        shown = backup_dict(b)
        new = Backup(vm_id=b.vm_id, datastore_id=b.datastore_id, chain="vm2/2", mode="FULL",
                     status="RUNNING")  # fmt: skip
        s.add(new)
        added = backup_dict(new)  # not flushed yet: it has no id
    assert shown["status"] == "DAMAGED"
    assert shown["increments"][0]["error"] == "changed, not flushed"
    assert (added["chain"], added["vm"], added["increments"]) == ("vm2/2", "vm2", [])


def test_times_written_with_a_zone_are_read_in_utc(clean_env: Path) -> None:
    """vmkeep writes UTC text without a zone; text that names one (written by hand or another
    tool) is read as the same instant in UTC."""
    ctx = Context(load_config())
    b2 = fill(ctx)
    db = ctx.catalog.engine.url.database
    assert db is not None
    with sqlite3.connect(db) as other:
        other.execute("UPDATE backups SET created_at = '2026-12-04 03:02:03+02:00' WHERE id = ?",
                      (b2,))  # fmt: skip
    other.close()
    created = listing.show_backup(ctx, b2)["created"]
    assert (created, created.tzinfo) == (datetime(2026, 12, 4, 1, 2, 3, tzinfo=UTC), UTC)
