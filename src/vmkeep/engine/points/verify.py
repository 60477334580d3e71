"""Verify: every stored file of a chain read back and checked against its checksum (and
``qemu-img check``); what was read is recorded on each point (when, OK or FAILED), a mismatch
marks the point and those built on it DAMAGED (``chains.mark_damaged``). A file stored by a
retention merge killed before its catalog update (its row's ``pending`` checksum) is taken as
it is (``chains.adopt_pending``)."""

from __future__ import annotations

import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmkeep.catalog.tables import Backup
from vmkeep.checksums import expected_digests, matches
from vmkeep.engine.core.chains import (
    adopt_pending,
    find_backup,
    mark_damaged,
    pending_checksums,
    pending_entry,
)
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.stores import driver_of
from vmkeep.errors import ChecksumMismatch
from vmkeep.model import BackupStatus


def _record_verify(ctx: Context, backup_id: int, read: set[str], bad: set[str]) -> None:
    """Each point whose files this verify read: when, and OK or FAILED (a point built on a
    damaged one failed too: it restores nothing)."""
    now = datetime.now(UTC)
    with ctx.catalog.session() as s:
        b = s.get(Backup, backup_id)
        if b is None:
            return
        for inc in b.increments:
            names = {f["name"] for f in inc.files}
            if not names & read:
                continue
            failed = bool(names & bad) or inc.status == BackupStatus.DAMAGED
            inc.verified_at, inc.verify_result = now, "FAILED" if failed else "OK"


def verify(ctx: Context, backup_id: int) -> dict[str, Any]:
    """Check every file of every VALID increment against its checksum (and qemu-img check)."""
    with ctx.catalog.session() as s:
        b = find_backup(s, backup_id)
        checked = [
            i for i in b.increments if i.status in (BackupStatus.VALID, BackupStatus.DAMAGED)
        ]
        expected = expected_digests(f for i in checked for f in i.files)
        chain_key, driver = b.chain, driver_of(b.datastore)
    pending = pending_checksums(ctx, backup_id)
    results: list[dict[str, Any]] = []
    adopted: dict[str, dict[str, Any]] = {}
    ctx.config.data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ctx.config.data_dir) as tmp:
        local = driver.restore(chain_key, list(expected), Path(tmp))
        for name, want in expected.items():
            ok, got = matches(local[name], want)
            entry = None if ok else pending_entry(local[name], got, pending.get(name))
            if entry is not None:  # stored by a retention merge killed before its catalog update
                ok, got, adopted[name] = True, entry["digest"], entry
            if ok and name.endswith(".qcow2"):
                ok = (
                    subprocess.run(
                        ["qemu-img", "check", "-q", str(local[name])], capture_output=True
                    ).returncode
                    == 0
                )
            results.append({"file": name, "ok": ok, "digest": got, "expected": want})
    if adopted:
        adopt_pending(ctx, backup_id, adopted)
    bad = [r["file"] for r in results if not r["ok"]]
    for name in bad:
        mark_damaged(ctx, backup_id, name, f"verify: {name} does not match its checksum")
    _record_verify(ctx, backup_id, set(expected), set(bad))
    if bad:
        raise ChecksumMismatch(
            f"{chain_key}/{bad[0]}",
            expected[bad[0]],
            next(r["digest"] for r in results if r["file"] == bad[0]),
        )
    store_check = driver.verify_store(chain_key)  # restic: check --read-data-subset
    return {"backup": backup_id, "files": results, "ok": True, "store_check": store_check}
