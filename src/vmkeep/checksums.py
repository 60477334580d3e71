"""Checksums of stored files: ``"<algorithm>:<hex>"`` strings.

New files get BLAKE3 (a cryptographic hash, 2-3x faster than SHA-256 on one core here and
parallel over the file when cores are free: the checksum is on the critical path of every backup
and restore). Rows written before BLAKE3 carry ``"sha256": hex``; they are verified with SHA-256,
so old backups stay checkable. ``b3sum`` / ``sha256sum`` check a file by hand.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from vmkeep.errors import VmkeepError

ALGORITHM = "blake3"


SLICE = 256 << 20  # hashed per slice: a stop request is seen within one slice (~0.1 s)


class Stopped(Exception):
    """``digest_file`` was asked to stop (a cancelled restore does not wait for the hash)."""


def digest_file(
    path: Path, algorithm: str = ALGORITHM, stop: Callable[[], bool] | None = None
) -> str:
    """The file's checksum as ``"<algorithm>:<hex>"`` (one read of the file); raises Stopped
    between slices once ``stop()`` is true."""
    if algorithm == "blake3":
        import blake3  # a wheel with native code: loaded only by commands that hash

        h = blake3.blake3(max_threads=blake3.blake3.AUTO)
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size:
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m, memoryview(m) as mv:
                    for start in range(0, len(mv), SLICE):  # parallel within each slice
                        if stop is not None and stop():
                            raise Stopped(path)
                        h.update(mv[start : start + SLICE])
        return f"blake3:{h.hexdigest()}"
    if algorithm == "sha256":
        with open(path, "rb") as f:
            return f"sha256:{hashlib.file_digest(f, 'sha256').hexdigest()}"
    raise VmkeepError(
        f"{path.name}: unknown checksum algorithm {algorithm!r} (this vmkeep knows blake3, sha256)"
    )


def algorithm_of(digest: str) -> str:
    return digest.partition(":")[0]


def matches(path: Path, expected: str, stop: Callable[[], bool] | None = None) -> tuple[bool, str]:
    """(does the file match, its checksum with the algorithm of ``expected``)."""
    got = digest_file(path, algorithm_of(expected), stop)
    return got == expected, got


def row_digest(row: Mapping[str, Any]) -> str:
    """The checksum a catalog/manifest file row records (``digest``, or a pre-BLAKE3 ``sha256``)."""
    if "digest" in row:
        return str(row["digest"])
    return f"sha256:{row['sha256']}"


def expected_digests(rows: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """file name -> checksum, for the rows given."""
    return {r["name"]: row_digest(r) for r in rows}
