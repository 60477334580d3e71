"""QEMU's way to vmkeep's files, without opening them to every user.

Everything vmkeep writes is its user's alone (umask 077, ``paths.private_umask``). QEMU runs as an
unprivileged user (libvirt's ``user``/``group`` in qemu.conf) and still opens images in vmkeep's
folders: backup targets being written, restored disks, instant-restore and drill overlays (and the
backup files under them), lab images, memory state files. Two things give it that:

- the files: libvirt's DAC driver (``dynamic_ownership``, on by default) chowns each image, its
  backing chain and a direct-boot kernel to QEMU's user while a domain uses them, and gives them
  back afterwards (``remember_owner``); vmkeep leaves them 0600;
- the folders on the way: QEMU must search each one. ``open_to_qemu`` gives a folder vmkeep owns
  QEMU's group and the group's search bit only (``root:<QEMU's group> 0710``): QEMU can open a name
  it is given, it cannot list the folder, and every other user still cannot enter. World bits are
  never set.

QEMU's uid and gid come from libvirt (the DAC base label in the host capabilities), else from
qemu.conf (or its usual defaults) when no connection is at hand.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import os
import pwd
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from vmkeep.errors import VmkeepError
from vmkeep.hypervisor.base import Hypervisor
from vmkeep.paths import within

QEMU_CONF = Path("/etc/libvirt/qemu.conf")
DEFAULT_NAMES = ("libvirt-qemu", "qemu")  # Debian/Ubuntu, then Fedora/RHEL/SUSE builds


@dataclass(frozen=True)
class QemuIds:
    uid: int
    gid: int
    groups: frozenset[int]  # gid and the user's supplementary groups (libvirt sets them too)

    @property
    def group_name(self) -> str:
        try:
            return grp.getgrgid(self.gid).gr_name
        except KeyError:
            return str(self.gid)


def _id(value: str, lookup: str) -> int | None:
    if value.startswith("+") or value.isdigit():
        return int(value.lstrip("+")) if value.lstrip("+").isdigit() else None
    try:
        return pwd.getpwnam(value).pw_uid if lookup == "user" else grp.getgrnam(value).gr_gid
    except KeyError:
        return None


@functools.cache
def _from_qemu_conf(conf: Path = QEMU_CONF) -> tuple[int, int] | None:
    """qemu.conf's ``user`` and ``group``, else the first of the usual defaults that exists."""
    try:
        text = conf.read_text()
    except OSError:
        text = ""
    ids: dict[str, int | None] = {}
    for key in ("user", "group"):
        found = re.findall(rf'^\s*{key}\s*=\s*"([^"]*)"', text, re.MULTILINE)
        names = found[-1:] or list(DEFAULT_NAMES)
        ids[key] = next((i for n in names if (i := _id(n, key)) is not None), None)
    uid, gid = ids["user"], ids["group"]
    return None if uid is None or gid is None else (uid, gid)


def qemu_ids(hv: Hypervisor | None = None) -> QemuIds | None:
    """Who QEMU runs as: libvirt's answer when ``hv`` is given and reachable, else qemu.conf's."""
    ids = None
    if hv is not None:
        try:
            ids = hv.qemu_ids()
        except VmkeepError:
            ids = None
    ids = ids or _from_qemu_conf()
    if ids is None:
        return None
    uid, gid = ids
    groups = {gid}
    with contextlib.suppress(KeyError):
        groups.update(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    return QemuIds(uid, gid, frozenset(groups))


def can_search(path: Path, ids: QemuIds) -> bool:
    """Whether QEMU's user may search (x) the folder (owner, else group, else other bits)."""
    st = path.stat()
    if ids.uid == 0:
        return True
    if st.st_uid == ids.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in ids.groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _grant(path: Path, ids: QemuIds) -> None:
    """QEMU's group and g+x on a folder vmkeep's user owns (never a world bit). Its group is
    changed only when it is vmkeep's own group or the group has no rights on it."""
    st = path.stat()
    if st.st_uid != os.geteuid() or can_search(path, ids):
        return
    if st.st_gid not in ids.groups:
        if st.st_gid != os.getegid() and st.st_mode & 0o070:
            return  # another group's folder: not vmkeep's to hand over
        os.chown(path, -1, ids.gid)
    os.chmod(path, stat.S_IMODE(st.st_mode) | stat.S_IXGRP)


def open_to_qemu(folder: Path, own: Path | None, hv: Hypervisor | None = None) -> Path | None:
    """Let QEMU search ``folder``: the folders from it up to ``own`` (a folder of vmkeep's: its
    data dir, a ``dir`` datastore's folder, the lab's; None: none) are opened to QEMU's group;
    folders above ``own`` are only looked at. Returns the first folder on the way from '/' that
    QEMU still cannot search (None: it reaches ``folder``, or QEMU's user is unknown)."""
    ids = qemu_ids(hv)
    if ids is None:
        return None
    folder = folder.resolve()
    top = own.resolve() if own is not None else None
    ours = (
        [p for p in [folder, *folder.parents] if within(p, top)]
        if top is not None and within(folder, top)
        else []
    )
    for p in ours:
        _grant(p, ids)
    for p in reversed([folder, *folder.parents]):
        if not can_search(p, ids):
            return p
    return None


def unreachable_why(blocked: Path, hv: Hypervisor | None = None) -> str:
    """How to open ``blocked`` to QEMU, for a warning or an error."""
    ids = qemu_ids(hv)
    group = ids.group_name if ids else "QEMU's group"
    return (
        f"QEMU (group {group}) cannot search {blocked}; give its group search on it "
        f"(chgrp {group} {blocked} && chmod g+x {blocked}) or use a folder it can reach"
    )
