"""Reads through the daemon on this host, when one runs: the list and show commands ask it over
its socket in the data dir (``vmkeep daemon``), as ``virsh`` asks libvirtd. Its process has the
catalog and libvirt loaded, so the command answers in about 0.1 s instead of loading them itself
(~0.7 s here, mostly SQLAlchemy's import). Without a daemon serving the same catalog, or with
``VMKEEP_NO_DAEMON=1``, the command reads the catalog itself: same data, same output.

Only the standard library and orjson (``jsontext``) here: this module is on the fast path.
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
from typing import Any
from urllib.parse import quote, urlencode

import click

from vmkeep import errors, jsontext, paths

log = logging.getLogger(__name__)
TIMEOUT = 10.0  # seconds; a daemon that does not answer by then is not waited for
# no daemon, the socket of one that is gone, or another user's (the direct read says what is wrong)
_ABSENT = (FileNotFoundError, ConnectionRefusedError, NotADirectoryError, PermissionError)


class UnixConnection(http.client.HTTPConnection):
    """HTTP over the daemon's unix socket."""

    def __init__(self, socket_path: str, timeout: float = TIMEOUT) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def segment(value: str | int) -> str:
    """One path segment of a request (a VM name may hold any character)."""
    return quote(str(value), safe="")


def get(c: click.Context, path: str, **query: str | None) -> Any | None:
    """The daemon's answer to ``GET path?query`` (parsed JSON), or None when the caller must read
    the catalog itself: no daemon, a daemon on another catalog, ``VMKEEP_NO_DAEMON``, or a daemon
    that did not answer as one. An error the daemon reports is raised as the same vmkeep error."""
    if os.environ.get("VMKEEP_NO_DAEMON", "") not in ("", "0"):
        return None
    try:
        where = paths.peek(c.find_root().params.get("config_path"))
    except errors.VmkeepError:
        return None  # the direct path loads the config again and reports what is wrong
    if len(os.fsencode(where.socket)) >= paths.SOCKET_PATH_MAX:
        return None  # too long for a socket: the daemon runs without one
    args = {k: v for k, v in query.items() if v is not None}
    target = path + (f"?{urlencode(args)}" if args else "")
    conn = UnixConnection(str(where.socket))
    try:
        conn.request("GET", target, headers={"X-Vmkeep-Catalog": where.key})
        resp = conn.getresponse()
        status, body = resp.status, resp.read()
    except _ABSENT:
        return None
    except (OSError, http.client.HTTPException) as err:
        log.warning("the daemon did not answer on %s (%s); reading the catalog", where.socket, err)
        return None
    finally:
        conn.close()
    try:
        data = jsontext.loads(body)
    except ValueError:
        data = None
    if status == 200 and data is not None:
        return data
    if status in (400, 404, 409, 422) and isinstance(data, dict) and "error" in data:
        raise _error(status, data)  # what the command itself would have raised
    # 421: it serves another catalog or host; 401/403: not vmkeep's daemon; 5xx or an answer
    # that is no JSON: the command does the read itself (and reports a failure its own way)
    log.debug("the daemon answered HTTP %d; reading the catalog", status)
    return None


def _error(status: int, data: dict[str, Any]) -> errors.VmkeepError:
    """The daemon's error as the exception the command would have raised itself: same message,
    same exit code (the class is named in the answer)."""
    err = data["error"] if isinstance(data["error"], dict) else {}
    out = errors.VmkeepError(err.get("message") or f"the daemon answered HTTP {status}")
    cls = getattr(errors, str(err.get("code")), None)
    if isinstance(cls, type) and issubclass(cls, errors.VmkeepError):
        out.exit_code = cls.exit_code
    return out
