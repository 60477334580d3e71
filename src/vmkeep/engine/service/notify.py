"""Notifications of finished jobs (``[notify]``; docs/notifications.md): an outbox in the catalog.

The daemon's worker calls ``job_ended`` when a job ends; it only writes one PENDING row per
configured target (``notifications`` table) and never raises or waits for a network. The
daemon's notify thread (``loop``) sends the rows that are due (``deliver_due``), claiming each
with a conditional UPDATE first, so two daemons on one catalog never send a row twice. A failed
send is retried with back-off (``[notify] retry_after``, doubling, at most ``MAX_DELAY``) until
``[notify] max_attempts``, then the row is FAILED. ``notify_send.py`` does the sending and the
redaction: a target's URL and the webhook secret never reach a log, a row or the output.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from vmkeep.catalog.tables import Backup, BackupJob, BackupJobRun, Notification, Vm
from vmkeep.config import Config, NotifyConfig
from vmkeep.engine.core.context import Context
from vmkeep.engine.service import actions
from vmkeep.engine.service.notify_send import Target, scrub, send, short_error, targets
from vmkeep.errors import ConfigError, InvalidValue, NotificationFailed
from vmkeep.model import JobState

log = logging.getLogger(__name__)

# the kinds users want a report of (and any job of a backup job's run)
REPORTED = frozenset({"backup", "group-backup", "verify", "drill", "group-drill", "copy", "prune"})
STATES = ("PENDING", "SENT", "FAILED")
MAX_DELAY = 3600.0  # seconds: the longest wait between two attempts
BATCH = 100  # rows looked at per deliver_due
TICK = 1.0  # seconds between the loop's looks
# Set when a row is queued in this process: the notify thread (``loop``) sends it at once.
WAKE = threading.Event()
NO_TARGET = (
    "no notification target is set; set [notify] webhook_url (or the environment variable "
    "VMKEEP_NOTIFY_WEBHOOK_URL) or [notify] urls in the config file"
)


def _lease(cfg: NotifyConfig) -> timedelta:
    """How long a claimed row is left to its sender before another may try it (a sender that
    died mid-send): well beyond one attempt's longest time."""
    return timedelta(seconds=max(60.0, cfg.timeout * 4))


def retry_delay(cfg: NotifyConfig, attempts: int) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: retry_after, doubling."""
    return min(cfg.retry_after * 2 ** max(attempts - 1, 0), MAX_DELAY)


def status_of(job: dict[str, Any]) -> str | None:
    """ok | warnings | failed | cancelled; None while the job has not ended."""
    state = job.get("state")
    if state == JobState.DONE:
        result = job.get("result")
        return "warnings" if isinstance(result, dict) and result.get("warnings") else "ok"
    if state == JobState.FAILED:
        return "failed"
    return "cancelled" if state == JobState.CANCELLED else None


def _iso(value: Any) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else value


def _duration(job: dict[str, Any]) -> float | None:
    started, finished = job.get("started"), job.get("finished")
    if isinstance(started, str):
        started = datetime.fromisoformat(started)
    if isinstance(finished, str):
        finished = datetime.fromisoformat(finished)
    if isinstance(started, datetime) and isinstance(finished, datetime):
        return round((finished - started).total_seconds(), 1)
    return None


def _subject(ctx: Context, job: dict[str, Any]) -> str | None:
    """The VM the job acted on (the group of a group backup), from its target."""
    a = actions.ACTIONS.get(str(job.get("kind")))
    target = job.get("target")
    if a is None or not target:
        return None
    if a.target in ("vm", "group"):
        return str(target)
    if a.target == "backup" and str(target).isdigit():
        with ctx.catalog.session() as s:
            q = select(Vm.name).join(Backup, Backup.vm_id == Vm.id)
            return s.execute(q.where(Backup.id == int(target))).scalar()
    return None


def _backupjob(ctx: Context, run_id: int | None) -> str | None:
    if run_id is None:
        return None
    with ctx.catalog.session() as s:
        q = select(BackupJob.name).join(BackupJobRun, BackupJobRun.backup_job_id == BackupJob.id)
        return s.execute(q.where(BackupJobRun.id == run_id)).scalar()


def payload_of(ctx: Context, job: dict[str, Any], status: str) -> dict[str, Any]:
    """What every target of a finished job gets (docs/notifications.md, "Payload")."""
    result = job.get("result")
    warnings = result.get("warnings") if isinstance(result, dict) else None
    return {
        "event": "job.finished",
        "status": status,
        "job": job.get("id"),
        "kind": job.get("kind"),
        "target": job.get("target"),
        "vm": _subject(ctx, job),
        "backupjob": _backupjob(ctx, job.get("run")),
        "run": job.get("run"),
        "error": job.get("error"),
        "warnings": [str(w) for w in warnings or []],
        "duration_s": _duration(job),
        "started": _iso(job.get("started")),
        "finished": _iso(job.get("finished")),
        "host": job.get("host") or socket.gethostname(),
    }


def wanted(cfg: NotifyConfig, job: dict[str, Any]) -> str | None:
    """The job's status when it is reported under ``[notify] on``, else None. ``failure``
    means FAILED only: a job done with warnings or cancelled by someone is not reported."""
    status = status_of(job)
    if status is None or (job.get("kind") not in REPORTED and job.get("run") is None):
        return None
    if cfg.on == "failure" and status != "failed":
        return None
    return status


def job_ended(ctx: Context, job: dict[str, Any]) -> int:
    """Queue the notifications of a finished job: one PENDING row per configured target; the
    rows written. Never raises and never sends: a notification cannot fail or hold up a job.

    Wiring (``api/daemon.py: _worker``): right after ``job = jobs.execute(ctx, job_id,
    RUNNERS)``, call ``notify.job_ended(ctx, job)``. It sets ``WAKE``, so the notify thread
    (``loop``) of this process sends at once."""
    try:
        status = wanted(ctx.config.notify, job)
        if status is None:
            return 0
        return _queue(ctx, int(job["id"]), lambda: payload_of(ctx, job, status))
    except Exception as err:  # noqa: BLE001 - never fail (or block) the job for a report
        log.warning("notifications of job %s not queued: %s", job.get("id"), scrub(str(err)))
        return 0


def run_left_out(ctx: Context, backupjob: str, run_id: int, left_out: list[dict[str, str]]) -> int:
    """A backup job's run that could not queue some VMs (refused when queued: a state that
    allows no backup, a datastore gone, ...): reported as a failure, whatever ``on`` says, so a
    night's backups never stop without a word. VMs left out by their policy (``exclude``) are
    not reported. Never raises."""
    if not left_out:
        return 0
    now = datetime.now(UTC).isoformat()
    reasons = "; ".join(f"{x['vm']}: {x['reason']}" for x in left_out)
    payload: dict[str, Any] = {
        "event": "run.left_out", "status": "failed", "job": None, "kind": "backupjob run",
        "target": backupjob, "vm": _names(x["vm"] for x in left_out), "backupjob": backupjob,
        "run": run_id, "error": {"code": "LeftOut", "message": f"not backed up: {reasons}"},
        "warnings": [], "duration_s": None, "started": now, "finished": now,
        "host": socket.gethostname(),
    }  # fmt: skip
    try:
        return _queue(ctx, 0, lambda: payload)
    except Exception as err:  # noqa: BLE001 - never fail the scheduler for a report
        log.warning("notifications of run %s not queued: %s", run_id, scrub(str(err)))
        return 0


def _names(names: Iterable[str], most: int = 10) -> str:
    """``a, b, c`` (``... and N more`` past ``most``: a title stays a title)."""
    shown = list(names)
    more = f" and {len(shown) - most} more" if len(shown) > most else ""
    return ", ".join(shown[:most]) + more


def _queue(ctx: Context, job_id: int, payload: Callable[[], dict[str, Any]]) -> int:
    """One PENDING row per configured target (``job_id`` 0: a run's report, no job)."""
    found = targets(ctx.config.notify)
    if not found:
        return 0
    body = payload()
    now = datetime.now(UTC)
    with ctx.catalog.session() as s:
        for t in found:
            s.add(Notification(job_id=job_id, target=t.name, payload=body, state="PENDING",
                               attempts=0, next_at=now, created_at=now))  # fmt: skip
    WAKE.set()  # the notify thread of this process sends them at once
    return len(found)


def _claim(ctx: Context, row_id: int, attempts: int, now: datetime) -> Notification | None:
    """Take a due row for this sender: PENDING with ``attempts`` unchanged -> attempts + 1 and
    leased (next_at in the future). Exactly one of several concurrent senders wins."""
    lease = _lease(ctx.config.notify)
    with ctx.catalog.session() as s:
        won = s.execute(  # type: ignore[attr-defined]
            update(Notification)
            .where(
                Notification.id == row_id,
                Notification.state == "PENDING",
                Notification.attempts == attempts,
            )
            .values(attempts=attempts + 1, next_at=now + lease)
        ).rowcount
        return s.get(Notification, row_id) if won == 1 else None


def _record(
    ctx: Context, row: Notification, now: datetime, error: str | None, last: bool = False
) -> None:
    """The attempt's outcome: SENT, or PENDING again after the back-off, or FAILED at last
    (``last``: no retry can help)."""
    cfg = ctx.config.notify
    values: dict[str, Any]
    if error is None:
        values = {"state": "SENT", "sent_at": now, "error": None}
    elif last or row.attempts >= cfg.max_attempts:
        values = {"state": "FAILED", "error": error}
        log.warning(
            "notification %s of job %s to %s FAILED after %d attempts: %s",
            row.id, row.job_id, row.target, row.attempts, error,
        )  # fmt: skip
    else:
        later = now + timedelta(seconds=retry_delay(cfg, row.attempts))
        values = {"next_at": later, "error": error}
        log.info("notification %s to %s failed (attempt %d): %s; retry at %s",
                 row.id, row.target, row.attempts, error, later.isoformat())  # fmt: skip
    with ctx.catalog.session() as s:
        s.execute(
            update(Notification)
            .where(Notification.id == row.id, Notification.attempts == row.attempts)
            .values(**values)
        )


def _target(cfg: NotifyConfig, name: str) -> Target | None:
    return next((t for t in targets(cfg) if t.name == name), None)


def _deliver(ctx: Context, row_id: int, attempts: int, now: datetime) -> bool:
    row = _claim(ctx, row_id, attempts, now)
    if row is None:
        return False  # another sender has it
    cfg = ctx.config.notify
    target = _target(cfg, row.target)
    if target is None:
        gone = (
            f"target {row.target} is no longer in [notify] (webhook_url, urls); nothing to send to"
        )
        _record(ctx, row, now, gone, last=True)
        return False
    error = send(cfg, target, row.payload)
    _record(ctx, row, now, None if error is None else short_error(error))
    return error is None


def deliver_due(ctx: Context, now: datetime | None = None) -> int:
    """Send the PENDING rows whose time has come (``next_at <= now``); the rows sent. Never
    raises: a failed send is stored on its row and retried later."""
    now = now or datetime.now(UTC)
    try:
        with ctx.catalog.session() as s:
            q = select(Notification.id, Notification.attempts)
            q = q.where(Notification.state == "PENDING", Notification.next_at <= now)
            due = s.execute(q.order_by(Notification.next_at, Notification.id).limit(BATCH)).all()
    except Exception as err:  # noqa: BLE001 - the catalog may be away for a moment
        log.warning("notifications: cannot read the outbox: %s", scrub(str(err)))
        return 0
    sent = 0
    for row_id, attempts in due:
        try:
            sent += _deliver(ctx, row_id, attempts, now)
        except Exception as err:  # noqa: BLE001 - one row's trouble never stops the others
            log.warning("notification %s not sent: %s", row_id, scrub(str(err)))
    return sent


def loop(config: Config, stop: threading.Event, wake: threading.Event | None = None) -> None:
    """The daemon's notify thread: ``deliver_due`` every TICK s, or at once when ``wake`` is
    set; ends when ``stop`` is set. It never dies on an error (logged, then the next tick).

    Wiring (``api/daemon.py: serve``), next to the monitor thread::

        pool.append(threading.Thread(target=notify.loop, args=(config, stop, notify.WAKE),
                                     name="notify", daemon=True))

    and on shutdown, after ``stop.set()``, ``notify.WAKE.set()`` so that it sees ``stop`` at
    once. The workers never wait for it: ``job_ended`` only writes rows."""
    ctx = Context(config)
    while not stop.is_set():
        try:
            deliver_due(ctx)
        except Exception as err:  # noqa: BLE001 - deliver_due never raises; belt and braces
            log.warning("notifications: %s", scrub(str(err)))
        if wake is None:
            stop.wait(TICK)
        else:
            wake.wait(TICK)
            wake.clear()


def row_dict(n: Notification) -> dict[str, Any]:
    """A row as lists show it: the target by name, never its URL."""
    return {
        "id": n.id,
        "job": n.job_id,
        "target": n.target,
        "state": n.state,
        "attempts": n.attempts,
        "next_at": n.next_at if n.state == "PENDING" else None,
        "error": n.error,
        "status": n.payload.get("status"),
        "created": n.created_at,
        "sent": n.sent_at,
    }


def list_rows(ctx: Context, state: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
    """The outbox, newest first; ``state``: PENDING, SENT or FAILED. Each row's ``to`` is its
    target's destination, redacted."""
    if state is not None and state.upper() not in STATES:
        raise InvalidValue("state", state, f"use one of {', '.join(STATES)}")
    shown = {t.name: t.shown for t in targets(ctx.config.notify)}
    with ctx.catalog.session() as s:
        q = select(Notification).order_by(Notification.id.desc()).limit(limit)
        if state:
            q = q.where(Notification.state == state.upper())
        rows = [row_dict(n) for n in s.execute(q).scalars()]
    for r in rows:
        r["to"] = shown.get(r["target"], "(no longer configured)")
    return rows


def send_test(ctx: Context) -> dict[str, Any]:
    """Send one test notification to every configured target now (not through the outbox):
    ``{"targets": [{target, to, ok, error}, ...]}``. ConfigError when no target is set;
    NotificationFailed, carrying the same dict as its result, when a target failed."""
    cfg = ctx.config.notify
    found = targets(cfg)
    if not found:
        raise ConfigError("[notify]", NO_TARGET)
    now = datetime.now(UTC)
    payload: dict[str, Any] = {
        "event": "notify.test", "status": "ok", "job": None, "kind": "test", "target": None,
        "vm": None, "backupjob": None, "run": None, "error": None, "warnings": [],
        "duration_s": 0.0, "started": now.isoformat(), "finished": now.isoformat(),
        "host": socket.gethostname(),
    }  # fmt: skip
    results = []
    for t in found:
        error = send(cfg, t, payload)
        results.append({"target": t.name, "to": t.shown, "ok": error is None, "error": error})
    failed = [r for r in results if not r["ok"]]
    if failed:
        names = ", ".join(f"{r['target']} ({r['to']})" for r in failed)
        err = NotificationFailed(names, "see each target's error above")
        err.result = {"targets": results}
        raise err
    return {"targets": results}
