"""Retention on the calendar: a table built from Proxmox Backup Server's documented prune
behaviour (its prune test's cases: the same points, rules and expected kept sets), plus what
vmkeep adds (protected points, explanations)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from vmkeep.engine.points.calendar import Point, select_points

HOURLY = ["2019-11-15T09:39:15", "2019-11-15T10:49:15", "2019-11-15T10:59:15",
          "2019-11-15T11:39:15", "2019-11-15T11:49:15", "2019-11-15T11:59:15"]  # fmt: skip
SIMPLE = ["2019-12-02T11:59:15", "2019-12-03T11:59:15", "2019-12-04T11:59:15",
          "2019-12-04T12:59:15"]  # fmt: skip
SIMPLE2 = ["2018-11-15T11:59:15", "2019-11-15T11:59:15", "2019-11-21T11:59:15",
           "2019-11-22T11:59:15", "2019-11-29T11:59:15", "2019-12-01T11:59:15",
           "2019-12-02T11:59:15", "2019-12-03T11:59:15", "2019-12-04T11:59:15"]  # fmt: skip

# (points, rules, the points kept)
TABLE = [
    (HOURLY, {"keep_hourly": 3}, ["2019-11-15T09:39:15", "2019-11-15T10:59:15",
                                  "2019-11-15T11:59:15"]),
    (HOURLY, {"keep_hourly": 2}, ["2019-11-15T10:59:15", "2019-11-15T11:59:15"]),
    (SIMPLE, {"keep_last": 4}, SIMPLE),
    (SIMPLE, {"keep_last": 3}, SIMPLE[1:]),
    (SIMPLE, {"keep_last": 2}, SIMPLE[2:]),
    (SIMPLE, {"keep_last": 1}, SIMPLE[3:]),
    (SIMPLE, {"keep_last": 2, "keep_daily": 2}, SIMPLE),
    (SIMPLE, {"keep_daily": 3}, ["2019-12-02T11:59:15", "2019-12-03T11:59:15",
                                 "2019-12-04T12:59:15"]),
    (SIMPLE, {"keep_daily": 2}, ["2019-12-03T11:59:15", "2019-12-04T12:59:15"]),
    (SIMPLE, {"keep_weekly": 5}, SIMPLE[3:]),  # one ISO week: one point
    (SIMPLE, {"keep_daily": 1, "keep_weekly": 5}, SIMPLE[3:]),
    (SIMPLE, {"keep_monthly": 6}, SIMPLE[3:]),
    (SIMPLE, {"keep_yearly": 7}, SIMPLE[3:]),
    (SIMPLE, {"keep_weekly": 5, "keep_monthly": 6, "keep_yearly": 7}, SIMPLE[3:]),
    (SIMPLE2, {"keep_daily": 1}, ["2019-12-04T11:59:15"]),
    (SIMPLE2, {"keep_last": 1, "keep_daily": 1}, ["2019-12-03T11:59:15", "2019-12-04T11:59:15"]),
    (SIMPLE2, {"keep_daily": 1, "keep_weekly": 1}, ["2019-12-01T11:59:15",
                                                    "2019-12-04T11:59:15"]),
    (SIMPLE2, {"keep_daily": 1, "keep_weekly": 1, "keep_monthly": 1},
     ["2019-11-22T11:59:15", "2019-12-01T11:59:15", "2019-12-04T11:59:15"]),
    (SIMPLE2, {"keep_monthly": 1, "keep_yearly": 1}, ["2018-11-15T11:59:15",
                                                      "2019-12-04T11:59:15"]),
    (SIMPLE2, {}, SIMPLE2),  # no rule: every point is kept
]  # fmt: skip


def _points(times: list[str], protected: tuple[str, ...] = ()) -> list[Point]:
    return [Point(t, datetime.fromisoformat(t).replace(tzinfo=UTC), t in protected) for t in times]


@pytest.mark.parametrize(("times", "rules", "kept"), TABLE)
def test_pbs_table(times: list[str], rules: dict[str, int], kept: list[str]) -> None:
    marks = select_points(_points(times), rules, UTC)
    assert sorted(k for k, m in marks.items() if m.keep) == kept
    assert set(marks) == set(times)  # every point explained


def test_each_point_says_which_rule_decided() -> None:
    marks = select_points(_points(SIMPLE), {"keep_last": 1, "keep_daily": 2}, UTC)
    assert marks["2019-12-04T12:59:15"].rule == "keep_last 1/1"
    assert marks["2019-12-04T11:59:15"].rule == "keep_daily 2019-12-04 has a newer kept point"
    assert marks["2019-12-03T11:59:15"].rule == "keep_daily 1/2 (2019-12-03)"
    assert marks["2019-12-02T11:59:15"].rule == "keep_daily 2/2 (2019-12-02)"


def test_protected_points_are_kept_and_not_counted() -> None:
    marks = select_points(_points(SIMPLE, protected=(SIMPLE[3],)), {"keep_last": 1}, UTC)
    assert marks[SIMPLE[3]].rule == "protected"
    assert [k for k, m in marks.items() if m.keep and k != SIMPLE[3]] == [SIMPLE[2]]
    # a protected point covers no period: its day still gets a kept point of its own
    marks = select_points(_points(SIMPLE, protected=(SIMPLE[3],)), {"keep_daily": 1}, UTC)
    assert marks[SIMPLE[2]].keep and marks[SIMPLE[2]].rule.startswith("keep_daily 1/1")


def test_periods_are_read_in_the_time_zone() -> None:
    from zoneinfo import ZoneInfo

    # 23:30 and 00:30 UTC are the same day in New York (18:30, 19:30): one daily point there
    times = ["2026-01-05T23:30:00", "2026-01-06T00:30:00"]
    assert sum(m.keep for m in select_points(_points(times), {"keep_daily": 2}, UTC).values()) == 2
    ny = select_points(_points(times), {"keep_daily": 2}, ZoneInfo("America/New_York"))
    assert [k for k, m in ny.items() if m.keep] == ["2026-01-06T00:30:00"]
