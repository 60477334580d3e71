"""When a backup job runs: its ``--schedule`` text, checked and made canonical once (``parse``),
and the slots it names (``latest_due``, ``next_after``). Pure: the scheduler passes the time.

Forms (docs/policies.md has examples):

- a cron expression, five fields (``0 2 * * *``: every night at 02:00), read by croniter;
- a calendar event like Proxmox's: ``hourly``, ``daily``, ``weekly``, ``monthly``, ``yearly``;
  ``HH:MM`` (every day); ``DAYS HH:MM`` with DAYS ``mon..fri`` or ``sat,sun``; ``*/N`` (every
  N minutes);
- a one-shot: ``now``, ``+SECONDS`` (from when the job is created), or an ISO time
  (``2026-12-24T22:00``, the host's time zone unless it names one).

Cron and calendar slots are read in a backup job's time zone, fixed when it is made:
``[schedule] timezone``, else the host's zone (``TZ``, ``/etc/localtime``). A zone name, never a
fixed offset: a night whose clocks go back has one 02:30, and every daemon reads the slots alike.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from vmkeep.errors import InvalidValue

FORMS = (
    "a cron expression ('0 2 * * *'), a calendar event ('daily', 'mon..fri 02:00', '*/15'), "
    "'now', '+SECONDS' or an ISO time ('2026-12-24T22:00')"
)
_ALIASES = {
    "hourly": "0 * * * *",
    "daily": "0 0 * * *",
    "weekly": "0 0 * * 1",
    "monthly": "0 0 1 * *",
    "yearly": "0 0 1 1 *",
    "annually": "0 0 1 1 *",
}
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_EVENT = re.compile(r"^(?:(?P<days>[a-z.,]+)\s+)?(?P<h>\d{1,2}):(?P<m>\d{2})$")
_AT = "at "  # the canonical text of a one-shot: "at <ISO time, UTC>"


@dataclass(frozen=True)
class Spec:
    """A checked schedule: ``text`` is what the catalog stores (a cron expression, or ``at``
    and a UTC time for a one-shot); ``given`` is what the user typed."""

    text: str
    given: str

    @property
    def once(self) -> datetime | None:
        return datetime.fromisoformat(self.text.removeprefix(_AT)) if self.is_once else None

    @property
    def is_once(self) -> bool:
        return self.text.startswith(_AT)


def host_zone() -> str:
    """The host's time zone by name: ``TZ``, else where ``/etc/localtime`` points, else
    ``/etc/timezone``; UTC when none names one."""
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    with contextlib.suppress(OSError):
        link = os.readlink("/etc/localtime")
        candidates.append(link.split("zoneinfo/", 1)[1] if "zoneinfo/" in link else "")
    with contextlib.suppress(OSError):
        candidates.append(Path("/etc/timezone").read_text().strip())
    for name in candidates:
        if name and known_zone(name):
            return name
    return "UTC"


def known_zone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def zone_name(configured: str = "") -> str:
    """The zone a new backup job reads its slots in: ``[schedule] timezone``, or the host's."""
    if configured and not known_zone(configured):
        raise InvalidValue("[schedule] timezone", configured, "use a zone name like Europe/Berlin")
    return configured or host_zone()


def zone(name: str = "") -> tzinfo:
    """The zone ``name`` (``zone_name``'s choice when empty)."""
    return ZoneInfo(zone_name(name))


def parse(text: str, now: datetime, tz: tzinfo | None = None) -> Spec:
    """The schedule ``text`` checked and made canonical; ``now`` anchors ``+SECONDS``."""
    given = " ".join(text.split())
    low = given.lower()
    tz = tz or zone()
    if not low:
        raise InvalidValue("--schedule", text, f"give {FORMS}")
    if low == "now":
        return Spec(_AT + now.astimezone(tz).isoformat(), given)
    if low.startswith("+"):
        try:
            seconds = int(low[1:])
        except ValueError:
            raise InvalidValue("--schedule", text, "use +SECONDS, e.g. +3600") from None
        if seconds < 0:
            raise InvalidValue("--schedule", text, "use +SECONDS, e.g. +3600")
        return Spec(_AT + (now + timedelta(seconds=seconds)).astimezone(tz).isoformat(), given)
    if re.match(r"^\d{4}-\d{2}-\d{2}", low):
        try:
            at = datetime.fromisoformat(given)
        except ValueError:
            raise InvalidValue(
                "--schedule", text, "use an ISO time, e.g. 2026-12-24T22:00"
            ) from None
        at = at.replace(tzinfo=tz) if at.tzinfo is None else at
        if at < now:
            raise InvalidValue("--schedule", text, "that time has passed; 'now' runs it at once")
        return Spec(_AT + at.isoformat(), given)
    cron = _cron_of(low)
    if cron is None or not croniter.is_valid(cron):
        raise InvalidValue("--schedule", text, f"give {FORMS}")
    try:  # valid fields that name no day (30 February) are no schedule either
        croniter(cron, now.astimezone(tz)).get_next(datetime)
    except (CroniterBadDateError, ValueError):
        raise InvalidValue("--schedule", text, "it names no time that ever comes") from None
    return Spec(cron, given)


def _cron_of(low: str) -> str | None:
    """A calendar event (or a cron expression) as a cron expression; None when it is neither."""
    if low in _ALIASES:
        return _ALIASES[low]
    if m := re.fullmatch(r"\*/(\d{1,4})", low):
        return f"*/{int(m[1])} * * * *" if 0 < int(m[1]) < 60 else None
    if m := _EVENT.match(low):
        hour, minute = int(m["h"]), int(m["m"])
        if hour > 23 or minute > 59:
            return None
        days = _days(m["days"]) if m["days"] else "*"
        return None if days is None else f"{minute} {hour} * * {days}"
    return low if len(low.split()) == 5 else None


def _days(text: str) -> str | None:
    """``mon..fri`` / ``sat,sun`` as cron's day-of-week field."""
    out = []
    for part in text.split(","):
        first, dots, last = part.partition("..")
        ends = [first[:3], last[:3]] if dots else [first[:3]]
        if any(e not in _DAYS for e in ends):
            return None
        out.append("-".join(str(_DAYS.index(e)) for e in ends))
    return ",".join(out)


def latest_due(spec: Spec, now: datetime, tz: tzinfo | None = None) -> datetime | None:
    """The newest slot at or before ``now`` (None: none yet)."""
    if spec.is_once:
        at = spec.once
        return at if at is not None and at <= now else None
    local = now.astimezone(tz or zone())
    it = croniter(spec.text, local + timedelta(seconds=1))
    slot: datetime = it.get_prev(datetime)
    while slot > now:
        slot = it.get_prev(datetime)
    return slot


def next_after(spec: Spec, after: datetime, tz: tzinfo | None = None) -> datetime | None:
    """The first slot after ``after`` (None: a one-shot that is past)."""
    if spec.is_once:
        at = spec.once
        return at if at is not None and at > after else None
    nxt: datetime = croniter(spec.text, after.astimezone(tz or zone())).get_next(datetime)
    return nxt


def stored(text: str) -> Spec:
    """A schedule as the catalog holds it (checked when it was stored)."""
    return Spec(text, text)
