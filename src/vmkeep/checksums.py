"""Checksums of stored files: ``"<algorithm>:<hex>"`` strings.

New files get BLAKE3 (a cryptographic hash, 2-3x faster than SHA-256 on one core here and
parallel over the file when cores are free: the checksum is on the critical path of every backup
and restore). Rows written before BLAKE3 carry ``"sha256": hex``; they are verified with SHA-256,
so old backups stay checkable. ``b3sum`` / ``sha256sum`` check a file by hand.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ALGORITHM = "blake3"


def digest_file(path: Path, algorithm: str = ALGORITHM) -> str:
    """The file's checksum as ``"<algorithm>:<hex>"`` (one read of the file)."""
    if algorithm == "blake3":
        import blake3  # a wheel with native code: loaded only by commands that hash

        h = blake3.blake3(max_threads=blake3.blake3.AUTO)
        if path.stat().st_size:
            h.update_mmap(str(path))  # memory-mapped, hashed in parallel chunks
        return f"blake3:{h.hexdigest()}"
    if algorithm == "sha256":
        with open(path, "rb") as f:
            return f"sha256:{hashlib.file_digest(f, 'sha256').hexdigest()}"
    raise ValueError(f"unknown checksum algorithm {algorithm!r}")


def algorithm_of(digest: str) -> str:
    return digest.partition(":")[0]


def matches(path: Path, expected: str) -> tuple[bool, str]:
    """(does the file match, its checksum with the algorithm of ``expected``)."""
    got = digest_file(path, algorithm_of(expected))
    return got == expected, got


def row_digest(row: Mapping[str, Any]) -> str:
    """The checksum a catalog/manifest file row records (``digest``, or a pre-BLAKE3 ``sha256``)."""
    if "digest" in row:
        return str(row["digest"])
    return f"sha256:{row['sha256']}"


def expected_digests(rows: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """file name -> checksum, for the rows given."""
    return {r["name"]: row_digest(r) for r in rows}
