"""What every benchmark sets up: a work folder QEMU can reach and an isolated vmkeep config."""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
from pathlib import Path


def workspace() -> tuple[Path, dict[str, str]]:
    """A fresh folder under /var/lib/vmkeep (QEMU, an unprivileged user, must reach staging
    files there) and the environment for vmkeep commands that keeps their catalog in it."""
    work = Path(tempfile.mkdtemp(prefix="vmkeep-bench-", dir="/var/lib/vmkeep"))
    work.chmod(0o755)
    (work / "c.toml").write_text("version = 1\n")
    env = dict(os.environ, VMKEEP_DATA_DIR=str(work / "data"), VMKEEP_CONFIG=str(work / "c.toml"))
    return work, env


def drop_caches() -> None:
    """Cold runs: write back and drop the page cache (root)."""
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def spread(values: list[float]) -> str:
    """min / median / max, as every benchmark prints its ratios."""
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"
