"""JSON text of the engine's results: one encoder for the CLI's ``--json``, the values its tables
show, and the API's reads, so a command prints the same whether it read the catalog itself or a
daemon answered (``cli/remote.py``).

orjson writes it (dates natively; the standard library's indented encoder is pure Python and
calls back into Python for every date); what orjson refuses (a string that is not UTF-8, an int
beyond 64 bits) goes through the standard library with the same ``default``.
"""

from __future__ import annotations

import json
from datetime import date, datetime
from typing import Any

import orjson


def default(value: Any) -> Any:
    """Values JSON has no type for: dates as ISO text, sets and tuples as lists, the rest
    (paths, UUIDs, decimals) as text."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def dumps(data: Any, *, indent: bool = False) -> bytes:
    """Compact JSON, or indented by two spaces."""
    option = orjson.OPT_NON_STR_KEYS | (orjson.OPT_INDENT_2 if indent else 0)
    try:
        return orjson.dumps(data, option=option, default=default)
    except TypeError:
        text = json.dumps(data, default=default, indent=2 if indent else None,
                          separators=None if indent else (",", ":"))  # fmt: skip
        return text.encode()


def loads(text: bytes | str) -> Any:
    try:
        return orjson.loads(text)
    except ValueError:  # e.g. a lone surrogate the fallback wrote as \udcff
        return json.loads(text)


def plain(data: Any) -> Any:
    """``data`` as the JSON values a reader of its text gets (dates as ISO text)."""
    return loads(dumps(data))
