"""One rule for every name a user gives vmkeep (VM, datastore, group, restore target).

Names become path components (``<datastore>/<vm name>/<backup id>``, restore folders) and libvirt
domain names, and share one argument with numeric ids. So: 1-64 characters from letters, digits
and ``. _ + -``, starting with a letter or digit, not only digits (``12345`` would always be read
as an id), never ``.`` or ``..``.
"""

from __future__ import annotations

import re

from vmkeep.errors import InvalidValue

MAX_LEN = 64
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
RULE = (
    f"use 1-{MAX_LEN} letters, digits, '.', '_', '+' or '-', starting with a letter or digit "
    "and not only digits"
)


def check_name(what: str, name: str) -> str:
    """``name`` if it follows the rule, else InvalidValue naming ``what`` and the rule."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.isdigit():
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise InvalidValue(what, shown, RULE)
    return name


MAX_ID = 2**63 - 1  # catalog ids are 64-bit


def is_id(ref: str) -> bool:
    """Whether a reference (``vm show 12``) means a catalog id: ASCII digits within 64 bits.
    Anything else is looked up as a name (names are never all digits)."""
    return ref.isascii() and ref.isdigit() and int(ref) <= MAX_ID
