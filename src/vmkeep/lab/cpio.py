"""A minimal writer for the ``newc`` cpio format the Linux kernel unpacks as an initramfs."""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass, field

_TRAILER = "TRAILER!!!"


@dataclass
class Archive:
    entries: list[tuple[str, int, bytes]] = field(default_factory=list)
    _dirs: set[str] = field(default_factory=set)

    def _parents(self, path: str) -> None:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.directory("/".join(parts[:i]))

    def directory(self, path: str, mode: int = 0o755) -> None:
        path = path.strip("/")
        if path and path not in self._dirs:
            self._dirs.add(path)
            self._parents(path)
            self.entries.append((path, stat.S_IFDIR | mode, b""))

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries.append((path, stat.S_IFREG | mode, data))

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries.append((path, stat.S_IFLNK | 0o777, target.encode()))

    def to_bytes(self) -> bytes:
        out = bytearray()
        for ino, (name, mode, data) in enumerate([*self.entries, (_TRAILER, 0, b"")], start=1):
            encoded = name.encode() + b"\0"
            fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
            out += b"070701" + "".join(f"{v:08x}" for v in fields).encode() + encoded
            out += b"\0" * (-len(out) % 4)
            out += data
            out += b"\0" * (-len(out) % 4)
        return bytes(out)

    def to_gzip(self) -> bytes:
        return gzip.compress(self.to_bytes(), compresslevel=1, mtime=0)
