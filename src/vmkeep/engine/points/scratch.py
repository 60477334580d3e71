"""A scratch folder in vmkeep's data dir for files fetched from a datastore (a copy, a scan, the
sizes ``backups show`` asks the store for); removed when its block ends."""

from __future__ import annotations

import tempfile

from vmkeep.engine.core.context import Context


def scratch(ctx: Context) -> tempfile.TemporaryDirectory[str]:
    ctx.config.data_dir.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=ctx.config.data_dir, prefix="stored-")
