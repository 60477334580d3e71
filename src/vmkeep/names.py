"""One rule for every name a user gives vmkeep (VM, datastore, group, restore target), and for
every name read back from a datastore (stored file, disk target, chain key): a datastore is
untrusted input, its names pass the same kind of rule before they become paths.

Names become path components (``<datastore>/<vm name>/<backup id>``, restore folders) and libvirt
domain names, and share one argument with numeric ids. So: 1-64 characters from letters, digits
and ``. _ + -``, starting with a letter or digit, not only digits (``12345`` would always be read
as an id), never ``.`` or ``..``.
"""

from __future__ import annotations

import re

from vmkeep.errors import InvalidValue

MAX_LEN = 64
# the rule as a regular expression, the length apart (JSON Schema's ``pattern`` of the API's
# names says the same: ``^{NAME_PATTERN}$`` with maxLength MAX_LEN): a letter first, or digits
# followed by another allowed character, so never only digits
NAME_PATTERN = r"(?:[A-Za-z]|[0-9]+[_.+A-Za-z-])[A-Za-z0-9_.+-]*"
_NAME = re.compile(NAME_PATTERN)
RULE = (
    f"use 1-{MAX_LEN} letters, digits, '.', '_', '+' or '-', starting with a letter or digit "
    "and not only digits"
)


def check_name(what: str, name: object) -> str:
    """``name`` if it follows the rule, else InvalidValue naming ``what`` and the rule."""
    if not isinstance(name, str) or len(name) > MAX_LEN or not _NAME.fullmatch(name):
        raise InvalidValue(what, _shown(name), RULE)
    return name


# --- names read from a datastore (a hostile store must not name a path outside its folder) ---
# A stored file (``<seq>.<disk>.qcow2``, ``<seq>.domain.xml``, ``<seq>.memory``, ``manifest.json``)
# is one path component of the same characters as a name: no ``/``, never ``.`` or ``..``, no
# comma (QEMU's option separator), no space or shell character (rsync's remote shell).
_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
FILE_RULE = (
    "a stored file name is 1-128 letters, digits, '.', '_', '+' or '-', starting with a letter "
    "or digit"
)
# A disk is a libvirt target (vda, sdb, hdc, xvda, nvme0n1): part of a file name and of QEMU's
# comma-separated options, so no '.', ',' or '/'.
DISK_PATTERN = r"[A-Za-z][A-Za-z0-9_-]{0,31}"
_DISK = re.compile(DISK_PATTERN)
DISK_RULE = "a disk target is 1-32 letters, digits, '_' or '-', starting with a letter (e.g. vda)"
# A chain key is ``<vm name>/<backup id>`` (``-<hex>`` added when the key was taken).
_CHAIN_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
CHAIN_RULE = (
    "a chain key is <vm name>/<backup>, the VM name following the name rule and the backup "
    "part 1-64 letters, digits, '.', '_', '+' or '-'"
)


def _shown(value: object) -> object:
    if isinstance(value, str) and len(value) > 80:
        return value[:77] + "..."
    return value


def check_file_name(what: str, name: object) -> str:
    """A file name read from a datastore (a manifest, a restic tag): one safe path component."""
    if not isinstance(name, str) or not _FILE.fullmatch(name):
        raise InvalidValue(what, _shown(name), FILE_RULE)
    return name


def check_disk_name(what: str, name: object) -> str:
    """A disk target read from a datastore or libvirt (it names files and QEMU options)."""
    if not isinstance(name, str) or not _DISK.fullmatch(name):
        raise InvalidValue(what, _shown(name), DISK_RULE)
    return name


def check_chain_key(what: str, key: object) -> str:
    """A chain key read from a datastore: ``<vm name>/<backup>``, two safe path components."""
    vm, sep, backup = key.partition("/") if isinstance(key, str) else ("", "", "")
    if not sep or not _CHAIN_PART.fullmatch(backup):
        raise InvalidValue(what, _shown(key), CHAIN_RULE)
    try:
        check_name(what, vm)
    except InvalidValue:
        raise InvalidValue(what, _shown(key), CHAIN_RULE) from None
    return str(key)


MAX_ID = 2**63 - 1  # catalog ids are 64-bit
# the API's bound on an id: the largest integer every JSON reader holds exactly (a catalog's
# ids never come near it)
MAX_JSON_ID = 2**53 - 1


def is_id(ref: str) -> bool:
    """Whether a reference (``vm show 12``) means a catalog id: ASCII digits within 64 bits.
    Anything else is looked up as a name (names are never all digits)."""
    return ref.isascii() and ref.isdigit() and int(ref) <= MAX_ID
