"""Builds the lab guest's boot artefacts (kernel + initramfs) from the host's Debian packages.

Recipe: Debian's ``linux-image-amd64`` kernel, ``busybox-static``, the
``qemu-guest-agent`` binary with the libraries ``ldd`` lists, and the virtio/ext4 modules. The result
is cached under a key of its inputs, so a second run costs nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from vmkeep.errors import LabError
from vmkeep.lab.cpio import Archive

# What the guest needs; their dependencies come from modules.dep. crc32c_generic is ext4's
# checksum through the crypto API, a soft dependency modules.dep does not list. virtio_net: the
# lab VM's NIC, for a group drill's cross-member probe (a guest's own /mnt/vda/vmkeep-rc sets
# its address, see init.sh).
WANTED_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "crc32c_generic",
    "libcrc32c",
    "ext4",
)
# Another process's initrd (another checkout's recipe) is deleted only when unused this long:
# a VM being defined from it now must still find it (each use touches it).
STALE_AFTER = 7 * 24 * 3600
QEMU_GA = Path("/usr/sbin/qemu-ga")
BUSYBOX = Path("/bin/busybox")


@dataclass(frozen=True)
class BootImage:
    kernel: Path
    initrd: Path


def _kernel() -> tuple[Path, str]:
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    if not kernels:
        raise LabError("no kernel in /boot; install it with 'apt-get install linux-image-amd64'")
    kernel = kernels[-1]
    return kernel, kernel.name.removeprefix("vmlinuz-")


def module_order(version: str, wanted: tuple[str, ...] = WANTED_MODULES) -> list[Path]:
    """Module files to insmod, dependencies first (modules.dep, depth-first)."""
    base = Path("/lib/modules") / version
    dep_file = base / "modules.dep"
    if not dep_file.exists():
        raise LabError(f"{dep_file} is missing; install linux-image-amd64")
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in dep_file.read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        by_name[re.sub(r"\.ko(\.\w+)?$", "", Path(mod).name).replace("-", "_")] = mod
    builtin = set()
    builtin_file = base / "modules.builtin"
    if builtin_file.exists():
        builtin = {
            re.sub(r"\.ko$", "", Path(p).name).replace("-", "_")
            for p in builtin_file.read_text().split()
        }
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        for d in deps.get(mod, []):
            visit(d)
        order.append(mod)

    for name in wanted:
        if name in by_name:
            visit(by_name[name])
        elif name not in builtin:
            raise LabError(f"kernel module {name} not found for {version}")
    return [base / m for m in order]


def _libraries(binary: Path) -> list[Path]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    libs = [Path(m) for m in re.findall(r"(/\S+\.so[.\d]*)", out)]
    return sorted(set(libs))


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        import lzma

        return lzma.decompress(data)
    if path.suffix == ".zst":
        raise LabError(f"{path}: zstd-compressed modules are not supported")
    return data


def _cache_key(version: str, init: bytes) -> str:
    """Every input of the recipe: kernel, /init, the module list, the binaries."""
    h = hashlib.sha256(version.encode() + init + ",".join(WANTED_MODULES).encode())
    for p in (QEMU_GA, BUSYBOX):
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def build_boot_image(cache_dir: Path) -> BootImage:
    """Return the cached kernel + initramfs, building them when an input changed."""
    for tool, pkg in ((QEMU_GA, "qemu-guest-agent"), (BUSYBOX, "busybox-static")):
        if not tool.exists():
            raise LabError(f"{tool} is missing; install it with 'apt-get install {pkg}'")
    kernel_src, version = _kernel()
    init = resources.files("vmkeep.lab").joinpath("init.sh").read_bytes()
    key = _cache_key(version, init)
    cache_dir.mkdir(parents=True, exist_ok=True)
    kernel = cache_dir / f"vmlinuz-{version}"
    initrd = cache_dir / f"initrd-{key}.img"
    if not kernel.exists():
        tmp = kernel.with_name(f"{kernel.name}.{os.getpid()}.tmp")  # builders may run at once
        shutil.copyfile(kernel_src, tmp)
        os.replace(tmp, kernel)
    if initrd.exists():
        with contextlib.suppress(OSError):  # in use: never stale for another recipe's builder
            os.utime(initrd)
        return BootImage(kernel, initrd)

    arc = Archive()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "run", "tmp"):
        arc.directory(d)
    arc.file("init", init, 0o755)
    arc.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    arc.file("usr/sbin/qemu-ga", QEMU_GA.read_bytes(), 0o755)
    for lib in _libraries(QEMU_GA):
        arc.file(str(lib), lib.resolve().read_bytes(), 0o755)
    names = []
    for mod in module_order(version):
        name = re.sub(r"\.ko(\.\w+)?$", "", mod.name)
        arc.file(f"lib/modules/{name}.ko", _read_module(mod))
        names.append(name)
    arc.file("etc/vmkeep-modules", ("\n".join(names) + "\n").encode())
    tmp = initrd.with_name(f"{initrd.name}.{os.getpid()}.tmp")
    tmp.write_bytes(arc.to_gzip())
    os.replace(tmp, initrd)
    for old in cache_dir.glob("initrd-*.img"):
        with contextlib.suppress(FileNotFoundError):
            if old != initrd and time.time() - old.stat().st_mtime > STALE_AFTER:
                old.unlink(missing_ok=True)
    return BootImage(kernel, initrd)
