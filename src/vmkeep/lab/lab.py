"""The test lab: tiny real guests on the real libvirtd, used by e2e tests, the demo and benchmarks.

Each lab VM boots the cached kernel + initramfs under TCG (``type='qemu'``), mounts its qcow2 (v3)
ext4 data disks at ``/mnt/vdX`` and runs qemu-guest-agent, through which the host writes data and
reads checksums (``guest-exec``).
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from vmkeep.engine.core.trust import mark_created
from vmkeep.errors import DomainNotFound, LabError
from vmkeep.hypervisor import Hypervisor
from vmkeep.hypervisor.reach import open_to_qemu, unreachable_why
from vmkeep.lab.image import BootImage, build_boot_image

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "vmkeep-lab-"
BOOT_TIMEOUT = 120.0


def parse_size(text: str) -> int:
    """'512M', '4G', '1048576' -> bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = int(float(num) * units[unit])
    except ValueError:
        raise LabError(f"size {text!r} is not a size like 512M or 4G") from None
    if value <= 0:
        raise LabError(f"size {text!r} must be positive")
    return value


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    except FileNotFoundError as err:
        raise LabError(f"{argv[0]} is not installed") from err
    except subprocess.CalledProcessError as err:
        raise LabError(f"{' '.join(argv)} failed: {err.stderr.strip()}") from err


def make_ext4_qcow2(path: Path, size: int, populate: Path | None = None) -> None:
    """A qcow2 v3 image holding an ext4 file system (optionally filled from a directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / "disk.raw"
        with open(raw, "wb") as f:
            f.truncate(size)
        argv = ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"]
        if populate is not None:
            argv += ["-d", str(populate)]
        run([*argv, str(raw)])
        tmp_qcow = path.with_suffix(".tmp")
        run(
            [
                "qemu-img",
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                "compat=1.1",
                str(raw),
                str(tmp_qcow),
            ]
        )
        tmp_qcow.replace(path)


def domain_xml(
    name: str,
    boot: BootImage,
    disks: list[Path],
    serial_log: Path,
    *,
    agent: bool = True,
    memory_mib: int = 192,
    nic: bool = True,
) -> str:
    cmdline = "console=ttyS0 panic=-1 quiet" + ("" if agent else " vmkeep.noagent")
    disk_xml = "".join(
        f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='{escape(str(p))}'/>
      <target dev='vd{chr(ord("a") + i)}' bus='virtio'/>
    </disk>"""
        for i, p in enumerate(disks)
    )
    nic_xml = (
        """
    <interface type='user'>
      <model type='virtio'/>
    </interface>"""
        if nic
        else ""
    )
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(boot.kernel))}</kernel>
    <initrd>{escape(str(boot.initrd))}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>{disk_xml}{nic_xml}
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <serial type='file'>
      <source path='{escape(str(serial_log))}'/>
      <target port='0'/>
    </serial>
  </devices>
</domain>
"""


@dataclass
class Lab:
    hv: Hypervisor
    root: Path
    prefix: str = DEFAULT_PREFIX
    agent_timeout: float = 30.0
    # vmkeep's folder holding the lab's (its data dir): opened to QEMU's group like the lab's own
    # folders when QEMU cannot search it; folders above are never changed
    within: Path | None = None

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    def vm_dir(self, name: str) -> Path:
        return self.root / "vms" / name

    def serial_log(self, name: str) -> Path:
        return self.vm_dir(name) / "serial.log"

    def _open_to_qemu(self, *folders: Path) -> None:
        """QEMU boots the cached kernel and opens the disks: their folders are opened to its
        group alone (``hypervisor/reach.py``); libvirt chowns the files themselves."""
        root = self.root.resolve()
        within = self.within.resolve() if self.within is not None else None
        own = within if within is not None and within in root.parents else root
        for folder in folders:
            blocked = open_to_qemu(folder, own, self.hv)
            if blocked is not None:
                raise LabError(f"lab folder {folder}: {unreachable_why(blocked, self.hv)}")

    def names(self, count: int) -> list[str]:
        return [f"{self.prefix}{i}" for i in range(1, count + 1)]

    def existing(self) -> list[str]:
        return [d.name for d in self.hv.list_domains() if d.name.startswith(self.prefix)]

    # --- lifecycle ------------------------------------------------------------------------------
    def create(
        self,
        name: str,
        disk_sizes: list[int],
        *,
        agent: bool = True,
        populate: Path | None = None,
        start: bool = True,
        memory_mib: int = 192,
    ) -> str:
        """Define (and start) one lab VM with fresh ext4 data disks."""
        try:
            self.hv.domain(name)
            raise LabError(f"domain {name} already exists; remove it with 'vmkeep lab down'")
        except DomainNotFound:
            pass
        boot = build_boot_image(self.cache_dir)
        vdir = self.vm_dir(name)
        if vdir.exists():
            shutil.rmtree(vdir)
        vdir.mkdir(parents=True)
        self._open_to_qemu(boot.kernel.parent, vdir)
        disks = []
        for i, size in enumerate(disk_sizes):
            disk = vdir / f"disk{i}.qcow2"
            make_ext4_qcow2(disk, size, populate if i == 0 else None)
            mark_created(disk)  # vmkeep made it: terminate may delete it
            disks.append(disk)
        xml = domain_xml(
            name, boot, disks, self.serial_log(name), agent=agent, memory_mib=memory_mib
        )
        self.hv.define(xml)
        if start:
            self.start(name, agent=agent)
        return name

    def start(self, name: str, *, agent: bool = True) -> None:
        self.serial_log(name).unlink(missing_ok=True)
        self.hv.start(name)
        self.wait_ready(name, agent=agent)

    def wait_ready(self, name: str, *, agent: bool = True, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait for the guest's init to finish (and its agent to answer)."""
        deadline = time.monotonic() + timeout
        log_file = self.serial_log(name)
        while time.monotonic() < deadline:
            text = log_file.read_text(errors="replace") if log_file.exists() else ""
            if "VMKEEP-LAB-READY" in text and (not agent or self.hv.guest_ping(name, 2)):
                return
            time.sleep(0.3)
        tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else "(no log)"
        raise LabError(f"{name} did not become ready within {timeout:.0f} s; serial log:\n{tail}")

    def up(self, count: int, disk_size: int, *, agent: bool = True) -> list[str]:
        """Create the missing VMs among prefix1..prefixN and start the stopped ones."""
        present = set(self.existing())
        for name in self.names(count):
            if name in present:
                if self.hv.domain(name).state != "ACTIVE":
                    self.start(name, agent=agent)
            else:
                self.create(name, [disk_size], agent=agent)
        return self.names(count)

    def remove(self, name: str) -> None:
        self.hv.destroy(name)
        self.hv.undefine(name)
        shutil.rmtree(self.vm_dir(name), ignore_errors=True)

    def down(self) -> list[str]:
        removed = self.existing()
        for name in removed:
            self.remove(name)
        vms = self.root / "vms"
        if vms.exists():
            for d in vms.iterdir():
                if d.name.startswith(self.prefix):
                    shutil.rmtree(d, ignore_errors=True)
        return removed

    # --- in the guest ---------------------------------------------------------------------------
    def sh(self, name: str, script: str, timeout: float = 120.0) -> str:
        """Run a shell script in the guest; return stdout, raise on a non-zero exit."""
        res = self.hv.guest_exec(name, ["/bin/sh", "-c", script], timeout)
        if res.exit_code != 0:
            raise LabError(f"in {name}: {script!r} exited {res.exit_code}: {res.stderr.strip()}")
        return res.stdout

    def write_random(self, name: str, path: str, mib: int, *, seek_mib: int = 0) -> str:
        """Write ``mib`` MiB of random data to ``path`` in the guest, sync, return its sha256."""
        q = shlex.quote(path)
        conv = f" seek={seek_mib} conv=notrunc" if seek_mib else ""
        self.sh(
            name,
            f"dd if=/dev/urandom of={q} bs=1048576 count={mib}{conv} 2>/dev/null && sync",
            timeout=60 + mib * 2,
        )
        return self.sha256(name, path)

    def sha256(self, name: str, path: str) -> str:
        return self.sh(name, f"sha256sum {shlex.quote(path)}").split()[0]


def read_file_from_image(image: Path, path: str, workdir: Path) -> bytes:
    """Read a file from the ext4 file system in a qcow2 image without booting it (debugfs)."""
    raw = workdir / (image.name + ".raw")
    run(["qemu-img", "convert", "-q", "-O", "raw", str(image), str(raw)])
    try:
        proc = subprocess.run(
            ["debugfs", "-R", f"cat {path}", str(raw)], capture_output=True, check=True
        )
        # debugfs exits 0 even when the file is missing; it says so on stderr.
        if b"not found" in proc.stderr or b"File not found" in proc.stderr:
            raise LabError(f"{path} does not exist in {image}")
        fsck = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
        if fsck.returncode != 0:
            raise LabError(f"{image}: file system not clean:\n{fsck.stdout[-1000:]}")
        return proc.stdout
    finally:
        raw.unlink(missing_ok=True)
