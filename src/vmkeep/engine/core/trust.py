"""Who may reach what on the host: the places an admin names for operators, and the domain XML
vmkeep will define. The API, the CLI and the job runners call these; docs/security.md states the
model they enforce:

- admin = root on the host: the CLI run by the catalog's owner, or an admin token;
- operator = runs and restores inside the places an admin named: restore destinations under the
  data dir's ``restores/`` or ``[restore] allowed_paths``, disk images under ``[vmm] image_paths``
  (and the data dir's ``images/`` and ``restores/``), NICs on ``[vmm] bridges``;
  never replacing a file vmkeep did not create;
- viewer = reads, without file contents.

Every path is resolved (symlinks followed, ``..`` removed) before it is compared with a place, so
a link inside an allowed folder cannot lead out of it. Refusals are ``NotPermitted`` (403) and
name the setting an admin would change.
"""

from __future__ import annotations

import errno
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmkeep.config import Config
from vmkeep.datastores.base import qemu_img_info
from vmkeep.engine.core.images import backing_name
from vmkeep.errors import InvalidValue, NotPermitted, VmkeepError
from vmkeep.model import ROLES
from vmkeep.paths import within

# a file vmkeep wrote carries this extended attribute: an operator's --force may replace it
MARK = "user.vmkeep.created"
ROLE_KEY = "actor_role"  # job params: the role of whoever queued the job (set by the API)
ACTOR = "_actor"  # a lifecycle handler's opts: the Actor (set by lifecycle.run_action)
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


@dataclass(frozen=True)
class Actor:
    """Who asks: a token's name and role, or the local admin (the catalog's owner)."""

    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


LOCAL_ADMIN = Actor("@local", "admin")


def actor_of(params: Mapping[str, Any]) -> Actor:
    """The actor a job's params name (the API sets ``actor_role``); the local admin otherwise
    (the CLI runs in-process with the catalog owner's rights)."""
    role = params.get(ROLE_KEY)
    if role is None:
        return LOCAL_ADMIN
    if role not in ROLES:
        raise InvalidValue(ROLE_KEY, role, f"use one of {', '.join(ROLES)}")
    return Actor(str(params.get("actor", "")), str(role))


def resolved(path: str | Path) -> Path:
    """``path`` absolute, ``~`` expanded, every symlink of its existing part followed."""
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def _inside(path: Path, roots: Iterable[Path]) -> bool:
    return any(within(path, r) for r in roots)


def restore_roots(config: Config) -> list[Path]:
    return [resolved(config.data_dir / "restores"), *map(resolved, config.restore.allowed_paths)]


def image_roots(config: Config) -> list[Path]:
    base = [config.data_dir / "images", config.data_dir / "restores"]
    return [resolved(p) for p in [*base, *config.vmm.image_paths]]


def check_restore_destination(config: Config, actor: Actor, dest: Path, force: bool) -> None:
    """An operator's restore writes only under the restore places, and replaces (``--force``)
    only files vmkeep created; an admin may write anywhere."""
    if actor.is_admin:
        return
    real = resolved(dest)
    roots = restore_roots(config)
    if not _inside(real, roots):
        raise NotPermitted(
            f"restore to {dest}",
            f"operators restore under {', '.join(map(str, roots))}",
            "Choose a path there, or an admin adds the folder to [restore] allowed_paths.",
        )
    _check_owned(real, next(r for r in roots if _inside(real, [r])))
    if force and real.is_file() and not created_by_vmkeep(real):
        raise NotPermitted(
            f"replacing {dest}",
            "vmkeep did not create that file",
            "Choose a new path, or an admin restores with --force.",
        )
    if force and real.is_dir():
        for entry in real.rglob("*"):
            if entry.is_file() and not created_by_vmkeep(entry):
                raise NotPermitted(
                    f"writing into {dest}",
                    f"it holds {entry}, which vmkeep did not create",
                    "Choose an empty or new folder, or an admin restores with --force.",
                )


def _check_owned(real: Path, root: Path) -> None:
    """Every existing folder from ``root`` down to ``real`` is vmkeep's user's and writable by
    no one else: no other local user can swap a folder or plant a link on the way after the
    check (the restore then writes through the unresolved path)."""
    folder = real if real.is_dir() else real.parent
    while True:
        if folder.exists():
            st = folder.lstat()
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                raise NotPermitted(
                    f"restore into {folder}",
                    "that folder is writable by other users or owned by another",
                    f"An admin makes it owned by uid {os.geteuid()}, not writable by others.",
                )
        if folder == root or folder == folder.parent:
            return
        folder = folder.parent


def mark_created(path: Path) -> None:
    """Note on ``path`` that vmkeep wrote it (an operator may later replace it). A file system
    without user extended attributes keeps no mark: only an admin may then replace the file."""
    try:
        os.setxattr(path, MARK, b"1", follow_symlinks=False)
    except OSError as err:
        if err.errno not in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
            raise


def created_by_vmkeep(path: Path) -> bool:
    try:
        return os.getxattr(path, MARK, follow_symlinks=False) == b"1"
    except OSError:
        return False


def check_image_source(config: Config, actor: Actor, source: str, fmt: str | None) -> str | None:
    """An operator attaches only raw or qcow2 images under the image places, and a qcow2 image
    that names no backing or data file: a guest can write a qcow2 header into its own raw disk,
    and a backing reference in it would lend a host file to the next guest that attaches it.

    Returns the image's format when the check learned it (an operator's existing image: ``fmt``,
    or what ``qemu-img info`` says), None otherwise: the caller need not probe the image again."""
    if actor.is_admin:
        return None
    roots = image_roots(config)
    if not _inside(resolved(source), roots):
        raise NotPermitted(
            f"disk attach of {source}",
            f"operators attach images under {', '.join(map(str, roots))}",
            "Move the image there, or an admin adds its folder to [vmm] image_paths.",
        )
    path = resolved(source)
    if not path.is_file():
        return None  # a new image (--size), or none: the action says so
    kind = fmt or str(qemu_img_info(str(path), check=False).get("format", "raw"))
    if kind not in ("raw", "qcow2"):
        raise NotPermitted(
            f"disk attach of {source} as {kind}", "operators attach raw or qcow2 images",
            "Convert it, or an admin attaches it.",
        )  # fmt: skip
    try:
        backing = backing_name(path) if kind == "qcow2" else None
    except VmkeepError as err:
        backing = str(err)
    if backing is not None:
        raise NotPermitted(
            f"disk attach of {source}", f"the image names another file ({backing})",
            "Flatten it (qemu-img convert), or an admin attaches it.",
        )  # fmt: skip
    return kind


def check_nic(config: Config, actor: Actor, bridge: str | None) -> None:
    """An operator's NIC joins only a host bridge an admin listed (or QEMU's user network)."""
    if actor.is_admin or not bridge:
        return
    if bridge not in config.vmm.bridges:
        raise NotPermitted(
            f"NIC on bridge {bridge!r}",
            f"operators may use the bridges {config.vmm.bridges or 'none'}",
            "An admin adds the bridge to [vmm] bridges.",
        )


def may_delete_disk(config: Config, path: str) -> bool:
    """Whether terminate may delete a disk: a regular file (not a link, not a device) that
    vmkeep created (marked) or that lies in the data dir's image places or ``[vmm] image_paths``."""
    p = Path(path)
    if p.is_symlink() or not p.is_file():
        return False
    real = resolved(p)
    return created_by_vmkeep(real) or _inside(real, image_roots(config))


# --- domain XML ------------------------------------------------------------------------------
def raw_xml_findings(xml: str) -> list[str]:
    """What in a domain XML reaches past a VM's own images: QEMU pass-through, host devices,
    host folders and block devices, character devices on host device nodes."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise InvalidValue("domain XML", xml[:60], f"not well-formed XML ({err})") from err
    found: list[str] = []
    for el in root.iter():
        tag = str(el.tag)
        if tag.startswith(f"{{{QEMU_NS}}}"):
            found.append(f"<qemu:{tag.split('}', 1)[1]}>")
    devices = root.find("devices")
    if devices is None:
        return found
    for el in devices:
        kind = el.get("type", "")
        if el.tag in ("hostdev", "filesystem", "shmem", "redirdev", "smartcard"):
            found.append(f"<{el.tag}>")
        elif el.tag == "disk" and kind in ("block", "dir", "volume"):
            found.append(f"<disk type='{kind}'>")
        elif el.tag == "disk" and el.find("source[@dev]") is not None:
            found.append("<disk> on a host device")
        elif el.tag == "interface" and kind in ("direct", "hostdev", "ethernet", "vhostuser"):
            found.append(f"<interface type='{kind}'>")
        elif el.tag in ("serial", "parallel", "console", "channel") and kind == "dev":
            found.append(f"<{el.tag} type='dev'>")
    return found


# where a stored domain XML's own host files may be: vmkeep's places, libvirt's own folders for
# sockets, and (read only: kernels, firmware) the system's
_READ_ONLY_ROOTS = (Path("/boot"), Path("/usr/share"), Path("/usr/lib"))
_SOCKET_ROOTS = (Path("/run/libvirt"), Path("/var/lib/libvirt/qemu"))


def host_files(xml: str) -> list[tuple[str, str, str]]:
    """(element, path, kind) of every host file a domain XML names for QEMU or libvirt to open:
    kind is "read" (kernel, firmware, a read-only disk), "socket" or "write"."""
    root = ET.fromstring(xml)
    found: list[tuple[str, str, str]] = []
    for tag in ("kernel", "initrd", "dtb", "loader"):
        for el in root.findall(f"os/{tag}"):
            if el.text and el.text.strip():
                found.append((f"<{tag}>", el.text.strip(), "read"))
    for el in root.findall("os/nvram"):
        if el.text and el.text.strip():
            found.append(("<nvram>", el.text.strip(), "write"))
    for dev in root.find("devices") or []:
        for src in dev.findall("source"):
            for attr in ("file", "path", "dir"):
                value = src.get(attr)
                if not value:
                    continue
                kind = "socket" if dev.get("type") == "unix" else "write"
                if dev.tag == "disk" and dev.find("readonly") is not None:
                    kind = "read"
                found.append((f"<{dev.tag}>", value, kind))
        for log in dev.findall("log"):
            if log.get("file"):
                found.append((f"<{dev.tag}><log>", str(log.get("file")), "write"))
    return found


def check_stored_xml(config: Config, xml: str, what: str, own: Iterable[Path]) -> None:
    """A domain XML read back from a datastore (restore, instant restore, drill, a memory
    state's) passes the ``vm create`` check, and every host file it names is one of ``own``
    (the files and folders this restore made) or lies in vmkeep's places: a hostile chain cannot lend a
    host file (``<initrd>/etc/shadow</initrd>``, a cdrom, a log) to a guest."""
    check_domain_xml(config, xml, what)
    if config.vmm.allow_raw_xml:
        return
    mine = {resolved(p) for p in own}
    places = [resolved(config.data_dir), resolved(config.lab.dir)]
    places += restore_roots(config) + image_roots(config)
    extra = {"read": _READ_ONLY_ROOTS, "socket": _SOCKET_ROOTS, "write": ()}
    for element, path, kind in host_files(xml):
        real = resolved(path)
        if _inside(real, [*mine, *places, *extra[kind]]):
            continue
        raise NotPermitted(
            what,
            f"its domain XML names the host file {path} in {element}, outside vmkeep's places",
            "An admin restores it after setting [vmm] allow_raw_xml = true.",
        )


def check_domain_xml(config: Config, xml: str, what: str) -> None:
    """Refuse a domain XML that passes host resources to the guest unless ``[vmm]
    allow_raw_xml`` (then an admin has said the XML is as trusted as root)."""
    if config.vmm.allow_raw_xml:
        return
    found = raw_xml_findings(xml)
    if found:
        raise NotPermitted(
            what,
            f"the domain XML has {', '.join(sorted(set(found)))}",
            "Remove them, or an admin sets [vmm] allow_raw_xml = true.",
        )
