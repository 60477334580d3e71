"""The pages' HTML: one Jinja2 environment (autoescape on: every value a page shows is escaped,
a VM named ``<script>`` included), the filters the templates share (sizes, times, ages) and the
SVG plots drawn on the server (no chart library in the browser)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup, escape

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

# the navigation: (path, label, least role that sees it)
NAV = [
    ("/", "Overview", "viewer"),
    ("/vms", "VMs", "viewer"),
    ("/backups", "Backups", "viewer"),
    ("/restore", "Restore", "operator"),
    ("/jobs", "Jobs", "viewer"),
    ("/groups", "Groups", "viewer"),
    ("/datastores", "Datastores", "viewer"),
    ("/schedules", "Schedules", "viewer"),
    ("/pools", "Pools", "viewer"),
    ("/hosts", "Hosts", "viewer"),
    ("/tokens", "Tokens", "admin"),
]


def size(n: Any) -> str:
    """Bytes as people read them: 1.5 GiB."""
    if n is None or n == "":
        return "–"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def when(value: Any) -> datetime | None:
    """A catalog time (datetime or ISO text) as an aware datetime (UTC when it has no zone)."""
    if value is None or value == "":
        return None
    t = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def time_tag(value: Any) -> Markup:
    """``<time datetime=ISO>``: the page's script shows it in the browser's time zone."""
    t = when(value)
    if t is None:
        return Markup("–")
    iso = t.astimezone(UTC).isoformat(timespec="seconds")
    text = t.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return Markup('<time datetime="{}">{}</time>').format(iso, text)


def duration(seconds: Any) -> str:
    if seconds is None:
        return "–"
    s = int(float(seconds))
    if s < 90:
        return f"{s} s"
    if s < 5400:
        return f"{s // 60} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def age(value: Any, now: datetime | None = None) -> str:
    """How long ago: '3 h ago'."""
    t = when(value)
    if t is None:
        return "never"
    return duration(((now or datetime.now(UTC)) - t).total_seconds()) + " ago"


def between(start: Any, end: Any) -> float | None:
    a, b = when(start), when(end)
    return (b - a).total_seconds() if a and b else None


def ms(value: Any) -> str:
    """Milliseconds, whole: '40 ms' (freeze times)."""
    return "–" if value is None else f"{round(float(value))} ms"


def percent(done: Any, total: Any) -> int:
    try:
        return max(0, min(100, round(100 * float(done) / float(total))))
    except (TypeError, ValueError, ZeroDivisionError):
        return 0


def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(size=size, time=time_tag, age=age, duration=duration, percent=percent, ms=ms)
    env.globals.update(between=between)
    env.policies["json.dumps_kwargs"] = {"sort_keys": False, "default": str}
    return env


# --- plots -------------------------------------------------------------------------------------
def plot(
    points: list[tuple[Any, float | None]],
    title: str,
    unit: str,
    width: int = 640,
    height: int = 160,
) -> Markup:
    """A line plot as inline SVG: ``points`` are (time, value), oldest first. ``unit``: "bytes"
    (axis in sizes) or "seconds". An empty series draws a note instead of an empty box."""
    values = [(when(t), v) for t, v in points if v is not None and when(t) is not None]
    if not values:
        return Markup('<p class="empty">No data to plot yet.</p>')
    left, bottom, top, right = 72, 24, 12, 12
    times = [t.timestamp() for t, _ in values if t]
    t0, t1 = min(times), max(times)
    vmax = max(float(v) for _, v in values if v is not None) or 1.0
    span = (t1 - t0) or 1.0

    def xy(t: datetime, v: float) -> tuple[float, float]:
        x = left + (t.timestamp() - t0) / span * (width - left - right) if t1 > t0 else width / 2
        y = top + (1 - v / vmax) * (height - top - bottom)
        return round(x, 1), round(y, 1)

    label = size if unit == "bytes" else duration
    coords = [xy(t, float(v)) for t, v in values if t is not None and v is not None]
    path = " ".join(f"{x},{y}" for x, y in coords)
    dots = "".join(
        Markup('<circle cx="{}" cy="{}" r="3"><title>{}: {}</title></circle>').format(
            x, y, t.strftime("%Y-%m-%d %H:%M") if t else "", label(v)
        )
        for (x, y), (t, v) in zip(coords, values, strict=True)
    )
    first = values[0][0].strftime("%Y-%m-%d") if values[0][0] else ""
    last = values[-1][0].strftime("%Y-%m-%d") if values[-1][0] else ""
    return Markup(
        '<figure class="plot"><svg role="img" viewBox="0 0 {w} {h}" width="100%" '
        'preserveAspectRatio="xMidYMid meet" aria-label="{title}"><title>{title}</title>'
        '<line class="axis" x1="{l}" y1="{b}" x2="{r}" y2="{b}"/>'
        '<line class="axis" x1="{l}" y1="{t}" x2="{l}" y2="{b}"/>'
        '<text x="{lt}" y="{ty}" text-anchor="end">{vmax}</text>'
        '<text x="{lt}" y="{b}" text-anchor="end">0</text>'
        '<text x="{l}" y="{hy}">{first}</text>'
        '<text x="{r}" y="{hy}" text-anchor="end">{last}</text>'
        '<polyline points="{path}"/>{dots}</svg><figcaption>{title}</figcaption></figure>'
    ).format(
        w=width, h=height, title=title, l=left, r=width - right, t=top, b=height - bottom,
        lt=left - 6, ty=top + 10, vmax=label(vmax), hy=height - 6, first=first, last=last,
        path=path, dots=Markup(dots),
    )  # fmt: skip


def bar(used: Any, total: Any, label: str) -> Markup:
    """A usage bar (``<meter>``) with its words beside it."""
    if not total:
        return Markup("<span>{} used</span>").format(size(used))
    return Markup(
        '<meter min="0" max="{t}" value="{u}" aria-label="{l}"></meter> {p} % of {ts}'
    ).format(t=int(total), u=int(used or 0), l=label, p=percent(used, total), ts=size(total))


def escaped(text: Any) -> str:
    return str(escape(text))
