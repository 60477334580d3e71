"""The daemon on this host, when one runs, as ``virsh`` uses libvirtd: the list and show
commands ask it over its socket in the data dir (``vmkeep daemon``), and every long action (the
action table, ``engine/service/actions.py``) is handed to it as a job and followed. Its process
has the catalog and libvirt loaded, so a read answers in about 0.1 s instead of loading them
itself (~0.7 s here, mostly SQLAlchemy's import), and an action starts at once, within the
daemon's job limits. Without a daemon serving the same catalog, or with ``VMKEEP_NO_DAEMON=1``,
the command does it itself: same data, same output.

Only the standard library and orjson (``jsontext``) here: this module is on the fast path.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import click

from vmkeep import errors, jsontext, paths

log = logging.getLogger(__name__)
TIMEOUT = 10.0  # seconds; a daemon that does not answer by then is not waited for
POLL = 1.0  # seconds a follower waits per request for its job's end (it answers at once then)
# no daemon, the socket of one that is gone, or another user's (the direct read says what is wrong)
_STOPS = (signal.SIGINT, signal.SIGTERM)  # what the CLI turns into KeyboardInterrupt
_ABSENT = (FileNotFoundError, ConnectionRefusedError, NotADirectoryError, PermissionError)
MAX_PAGE = 1000  # the most rows a page of the API holds (api/paging.py)
_NEXT = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?')  # RFC 8288: the next page's link


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


def _where(c: click.Context) -> paths.Where | None:
    """Where this command's daemon would listen, or None when it must not be asked."""
    if os.environ.get("VMKEEP_NO_DAEMON", "") not in ("", "0"):
        return None
    try:
        where = paths.peek(c.find_root().params.get("config_path"))
    except errors.VmkeepError:
        return None  # the direct path loads the config again and reports what is wrong
    if len(os.fsencode(where.socket)) >= paths.SOCKET_PATH_MAX:
        return None  # too long for a socket: the daemon runs without one
    return where


def _ask(
    where: paths.Where, method: str, target: str, body: Any = None, timeout: float = TIMEOUT
) -> tuple[int, Any]:
    """One request: (HTTP status, parsed JSON or None). Raises ``_ABSENT`` errors when no
    daemon listens, other OSError / HTTPException when it did not answer."""
    status, data, _next = _ask_page(where, method, target, body, timeout)
    return status, data


def _ask_page(
    where: paths.Where, method: str, target: str, body: Any = None, timeout: float = TIMEOUT
) -> tuple[int, Any, str | None]:
    """``_ask``, and the target of the next page its ``Link`` header names (None: the last)."""
    headers = {"X-Vmkeep-Catalog": where.key}
    data = None
    if body is not None:
        data, headers["Content-Type"] = jsontext.dumps(body), "application/json"
    conn = UnixConnection(str(where.socket), timeout)
    try:
        conn.request(method, target, body=data, headers=headers)
        resp = conn.getresponse()
        status, raw, link = resp.status, resp.read(), resp.getheader("Link")
    finally:
        conn.close()
    found = _NEXT.search(link or "")
    try:
        return status, jsontext.loads(raw), found.group(1) if found else None
    except ValueError:
        return status, None, None


def get(c: click.Context, path: str, **query: str | None) -> Any | None:
    """The daemon's answer to ``GET path?query`` (parsed JSON), or None when the caller must read
    the catalog itself: no daemon, a daemon on another catalog, ``VMKEEP_NO_DAEMON``, or a daemon
    that did not answer as one. An error the daemon reports is raised as the same vmkeep error.

    A list comes in pages (``api/paging.py``): every page is read, following the ``Link``
    header, and the rows are returned as one list; ``limit`` is the most rows wanted (the
    pages then hold up to ``MAX_PAGE`` each)."""
    where = _where(c)
    if where is None:
        return None
    args = {k: v for k, v in query.items() if v is not None}
    most = int(args["limit"]) if "limit" in args else None
    if most is not None:
        args["limit"] = str(min(most, MAX_PAGE))
    target: str | None = path + (f"?{urlencode(args)}" if args else "")
    rows: list[Any] = []
    while target is not None:
        data = _get_one(where, target)
        if data is None or not isinstance(data[0], list):
            return data[0] if data is not None and not rows else None
        rows += data[0]
        target = data[1] if most is None or len(rows) < most else None
        if target is not None and "limit" not in args:  # the first page was the default's
            target = _with_limit(target, MAX_PAGE)
    return rows[:most] if most is not None else rows


def _with_limit(target: str, limit: int) -> str:
    path, _, query = target.partition("?")
    args = [(k, v) for k, v in parse_qsl(query) if k != "limit"]
    return f"{path}?{urlencode([*args, ('limit', str(limit))])}"


def _get_one(where: paths.Where, target: str) -> tuple[Any, str | None] | None:
    """One GET: (parsed JSON, the next page's target) or None when the command must read the
    catalog itself. An error the daemon reports is raised as the same vmkeep error."""
    try:
        status, data, next_page = _ask_page(where, "GET", target)
    except _ABSENT:
        return None
    except (OSError, http.client.HTTPException) as err:
        log.warning("the daemon did not answer on %s (%s); reading the catalog", where.socket, err)
        return None
    if status == 200 and data is not None:
        return data, next_page
    if status in (400, 404, 409, 422) and isinstance(data, dict) and "error" in data:
        raise _error(status, data)  # what the command itself would have raised
    # 421: it serves another catalog or host; 401/403: not vmkeep's daemon; 5xx or an answer
    # that is no JSON: the command does the read itself (and reports a failure its own way)
    log.debug("the daemon answered HTTP %d; reading the catalog", status)
    return None


def post(c: click.Context, path: str) -> Any | None:
    """The daemon's answer to ``POST path`` (a quick catalog write it does, e.g. firing a
    backup job's run), or None when no daemon serves this catalog (the command does it
    itself). Its refusal is raised as the command's own error. Never falls back once the
    daemon may have done it."""
    where = _where(c)
    if where is None:
        return None
    try:
        status, data = _ask(where, "POST", path)
    except _ABSENT:
        return None
    except (OSError, http.client.HTTPException) as err:
        raise errors.VmkeepError(
            f"the daemon did not answer on {where.socket} ({err}); see 'vmkeep jobs list' "
            "before trying again"
        ) from err
    if 200 <= status < 300 and data is not None:
        return data
    if status in (401, 403, 421):
        return None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        raise _error(status, data)
    raise errors.VmkeepError(f"the daemon answered HTTP {status} to {path}")


def follow_all(c: click.Context, jobs: list[dict[str, Any]]) -> None:
    """Wait for the end of each of these daemon jobs (their errors are on their rows: the
    caller reads them). Ctrl-C cancels every one that has not ended."""
    where = _where(c)
    assert where is not None
    followed = [Job(where, j) for j in jobs]
    try:
        for job in followed:
            try:
                job.follow(lambda _done, _total: None)
            except errors.VmkeepError:
                continue
    except KeyboardInterrupt:
        for job in followed:
            if job.job["state"] not in ("DONE", "FAILED", "CANCELLED"):
                with suppress(errors.VmkeepError):
                    job.cancel()
        raise


@contextmanager
def _held_signals() -> Iterator[list[int]]:
    """SIGINT and SIGTERM during the block are noted (in the list yielded), not raised."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    before = {n: signal.signal(n, lambda num, _f: held.append(num)) for n in _STOPS}
    try:
        yield held
    finally:
        for n, handler in before.items():
            signal.signal(n, handler)


class Job:
    """A long action the daemon runs for this command: ``submit`` queues it,
    ``follow`` waits for its end. The daemon holds the VM and cleans up whatever happens to this
    process; Ctrl-C here cancels the job (the daemon stops it as the command would have)."""

    def __init__(self, where: paths.Where, job: dict[str, Any]) -> None:
        self.where, self.job = where, job
        self.cancelling = False

    @property
    def id(self) -> int:
        return int(self.job["id"])

    def follow(self, progress: Callable[[int, int], None]) -> tuple[dict[str, Any], list[str]]:
        """Wait for the job's end, reporting its bytes done/total; its result and warnings.
        Raises the job's error as the command's own, KeyboardInterrupt when it was cancelled."""
        while self.job["state"] not in ("DONE", "FAILED", "CANCELLED"):
            try:
                self._poll()
                progress(int(self.job["done_bytes"] or 0), int(self.job["total_bytes"] or 0))
            except KeyboardInterrupt:
                if self.cancelling:
                    raise  # a second Ctrl-C: stop waiting (the daemon still cleans up)
                self.cancel()
        if self.job["state"] == "CANCELLED":
            raise KeyboardInterrupt
        if self.job["state"] == "FAILED":
            err = _error(500, {"error": self.job["error"] or {}})
            err.result = self.job.get("result")  # what the action still has to show
            raise err
        result = dict(self.job["result"] or {})
        return result, list(result.pop("warnings", []))

    def _poll(self) -> None:
        target = f"/v1/jobs/{self.id}?wait={POLL}"
        try:
            status, data = _ask(self.where, "GET", target, timeout=TIMEOUT + POLL)
        except (OSError, http.client.HTTPException) as err:
            raise self._lost(str(err)) from err
        if status != 200 or not isinstance(data, dict):
            raise self._lost(f"HTTP {status}")
        self.job = data

    def cancel(self) -> None:
        """Ask the daemon to cancel the job (it stops it as the command would on Ctrl-C)."""
        self.cancelling = True
        click.echo(f"vmkeep: cancelling job {self.id} (the daemon stops it)", err=True)
        try:
            _ask(self.where, "DELETE", f"/v1/jobs/{self.id}")  # 409: it ended meanwhile
        except (OSError, http.client.HTTPException) as err:
            raise self._lost(str(err)) from err

    def _lost(self, why: str) -> errors.VmkeepError:
        return errors.VmkeepError(
            f"lost the daemon while following job {self.id} ({why}); the daemon's job goes on "
            f"or was recovered: see 'vmkeep jobs show {self.id}'"
        )


class QueuedJob(Job):
    """A job this command queued in the catalog for another host's daemon (its VM lives
    there), followed through the catalog as ``Job`` follows a daemon's: the same progress,
    result, error and Ctrl-C."""

    def __init__(self, ctx: Any, job: dict[str, Any]) -> None:
        super().__init__(paths.Where(Path("/"), "", ""), jsontext.plain(job))
        self.ctx = ctx

    def _poll(self) -> None:
        from vmkeep.engine.core import jobs
        from vmkeep.engine.hosts.records import check_daemon

        self.job = jsontext.plain(jobs.wait(self.ctx, self.id, POLL))
        if self.job["state"] == "QUEUED":
            try:  # a daemon that stopped or fell silent will not take it: never wait forever
                check_daemon(self.ctx, str(self.job["runs_on"]), str(self.job["target"]))
            except errors.HostUnavailable:
                with suppress(errors.VmkeepError):
                    jobs.cancel(self.ctx, self.id)
                if jobs.get(self.ctx, self.id)["state"] == "CANCELLED":
                    raise

    def cancel(self) -> None:
        from vmkeep.engine.core import jobs

        self.cancelling = True
        click.echo(f"vmkeep: cancelling job {self.id} (its host's daemon stops it)", err=True)
        with suppress(errors.VmkeepError):  # it ended meanwhile
            jobs.cancel(self.ctx, self.id)


def submit(c: click.Context, path: str, body: dict[str, Any], method: str = "POST") -> Job | None:
    """Ask the daemon to run a long action (``METHOD path``, the body as the query of a
    DELETE): its queued job, or None when the
    command must run it itself: no daemon, ``VMKEEP_NO_DAEMON``, a daemon on another catalog
    (421) or not vmkeep's (401/403). Its refusal (unknown VM, wrong state, a value out of
    range) is raised as the command's own error. Never falls back once the daemon may have
    queued the job (a timeout, an answer that is not its own): that could run the action twice.
    A Ctrl-C while the request is under way cancels the job it queued."""
    where = _where(c)
    if where is None:
        return None
    with _held_signals() as held:  # a Ctrl-C now must not lose a job the daemon just queued
        try:
            if method == "DELETE":
                query = {k: str(v).lower() if isinstance(v, bool) else v for k, v in body.items()}
                status, data = _ask(where, method, path + (f"?{urlencode(query)}" if query else ""))
            else:
                status, data = _ask(where, method, path, body)
        except _ABSENT:
            status, data = 0, None
        except (OSError, http.client.HTTPException) as err:
            raise errors.VmkeepError(
                f"the daemon did not answer on {where.socket} ({err}); see 'vmkeep jobs list' "
                "before trying again, or set VMKEEP_NO_DAEMON=1 to run the command in this "
                "process"
            ) from err
    if status == 202 and isinstance(data, dict) and isinstance(data.get("job"), dict):
        job = Job(where, data["job"])
        if held:
            job.cancel()  # follow() waits for its end and reports the interruption
        return job
    if held:
        raise KeyboardInterrupt
    if status in (0, 401, 403, 421):
        log.debug("the daemon answered HTTP %d; running the command here", status)
        return None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        raise _error(status, data)  # the engine's refusal (unknown VM, wrong state, ...)
    raise errors.VmkeepError(
        f"the daemon answered HTTP {status} to {path}; see 'vmkeep jobs list' before trying "
        "again, or set VMKEEP_NO_DAEMON=1 to run the command in this process"
    )


def _error(status: int, data: dict[str, Any]) -> errors.VmkeepError:
    """The daemon's error as the exception the command would have raised itself: same message,
    same exit code (the class is named in the answer)."""
    err = data["error"] if isinstance(data["error"], dict) else {}
    out = errors.VmkeepError(err.get("message") or f"the daemon answered HTTP {status}")
    out.exit_code = errors.exit_code_of(err.get("code"))
    return out
