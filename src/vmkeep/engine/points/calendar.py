"""Which restore points retention keeps: Proxmox Backup Server's prune rules, on every point of a
VM on a datastore (all its chains). Pure: points in, a mark per point out.

The rules run in this order, each over the points newest first:

- ``keep_last N``: the N newest points;
- ``keep_hourly N``, ``keep_daily N``, ``keep_weekly N`` (ISO weeks, Monday to Sunday),
  ``keep_monthly N``, ``keep_yearly N``: the newest point of each of the N newest periods that
  have one.

A rule only looks at points no earlier rule has decided on: a period an earlier rule already
kept a point of counts as covered (the next rule moves on to older periods), and a point an
earlier rule passed over as an older one of its period stays removed. Protected points are
neither kept nor counted by any rule: they are kept besides. No rule set: every point is kept.
Periods are read in the job's time zone (``[schedule] timezone`` or the host's).
Worked examples: docs/policies.md, "Retention".
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any

# rule -> the period a point falls in (None: each point is its own)
PERIODS: dict[str, Callable[[datetime], str] | None] = {
    "keep_last": None,
    "keep_hourly": lambda t: t.strftime("%Y-%m-%d %H:00"),
    "keep_daily": lambda t: t.strftime("%Y-%m-%d"),
    "keep_weekly": lambda t: "{}-W{:02d}".format(*t.isocalendar()[:2]),
    "keep_monthly": lambda t: t.strftime("%Y-%m"),
    "keep_yearly": lambda t: t.strftime("%Y"),
}


@dataclass(frozen=True)
class Point:
    key: Any  # hashable: (backup id, increment) for vmkeep's points
    taken: datetime  # aware
    protected: bool = False


@dataclass(frozen=True)
class Mark:
    keep: bool
    rule: str  # why: "keep_daily 2026-12-04", "protected", "older point of keep_daily ..."


def select_points(
    points: Sequence[Point], rules: dict[str, int], tz: tzinfo
) -> dict[Hashable, Mark]:
    """A mark for every point. ``rules``: rule name -> N (names from ``PERIODS``)."""
    for name in rules:
        if name not in PERIODS:
            raise ValueError(f"unknown retention rule {name}")
    # newest first; of points taken at the same time, the one listed later is the newer
    order = {id(p): n for n, p in enumerate(points)}
    newest_first = sorted(points, key=lambda p: (p.taken, order[id(p)]), reverse=True)
    if not rules:
        return {p.key: Mark(True, "no retention rule set") for p in newest_first}
    marks: dict[Hashable, Mark] = {}
    kept: set[Hashable] = set()  # kept by a rule (a protected point covers no period)
    passed: dict[Hashable, str] = {}  # in a period an earlier rule covered: why
    for p in newest_first:
        if p.protected:
            marks[p.key] = Mark(True, "protected")
    for name, period_of in PERIODS.items():
        if name not in rules:
            continue
        n = rules[name]

        def period(p: Point, period_of: Callable[[datetime], str] | None = period_of) -> str:
            return period_of(p.taken.astimezone(tz)) if period_of else repr(p.key)

        covered = {period(p) for p in newest_first if p.key in kept}
        taken: list[str] = []
        for p in newest_first:
            if p.key in marks:
                continue
            key = period(p)
            if key in covered:  # left to the next rules (none keeps it: the newer point
                # that covers this period is in every coarser period of it too)
                passed.setdefault(p.key, f"{_label(name, key)} has a newer kept point")
                continue
            if key in taken:
                marks[p.key] = Mark(False, f"an older point of {_label(name, key)}")
                continue
            if len(taken) >= n:
                break
            taken.append(key)
            kept.add(p.key)
            marks[p.key] = Mark(True, f"{name} {len(taken)}/{n}" + _suffix(period_of, key))
    for p in newest_first:
        marks.setdefault(p.key, Mark(False, passed.get(p.key, "no rule keeps it")))
    return marks


def _label(name: str, key: str) -> str:
    return f"{name} {key}" if PERIODS[name] else name


def _suffix(period_of: Callable[[datetime], str] | None, key: str) -> str:
    return f" ({key})" if period_of else ""
