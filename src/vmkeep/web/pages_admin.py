"""The pages around the VMs: ``/groups`` (members in start order, group backups with their
freeze windows), ``/datastores`` (usage, free space, scan and import, a plot of the bytes kept),
``/schedules`` (backup jobs: ``engine/service/backupjobs.py``), ``/pools``, ``/hosts`` (state,
daemon, capacity, VMs: ``engine/hosts/records.py``) and ``/tokens``
(admin: list, create with the secret shown once, revoke)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from vmkeep.engine.core import stores
from vmkeep.engine.core.trust import Actor
from vmkeep.engine.groups import manage
from vmkeep.engine.hosts import records
from vmkeep.engine.points import listing
from vmkeep.engine.service import backupjobs, overview, tokens
from vmkeep.engine.vm import policy
from vmkeep.errors import Forbidden
from vmkeep.web import render as R
from vmkeep.web.base import Web
from vmkeep.web.session import Posted

GROUP_BACKUPS_SHOWN = 20  # per group, newest first


def routes(web: Web, app: FastAPI) -> None:
    r = web.router()

    @r.get("/groups")
    def group_list(request: Request, who: Actor = web.page_actor) -> Response:
        ctx = web.ctx()
        groups = manage.list_groups(ctx)
        backups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for gb in reversed(manage.list_group_backups(ctx)):
            if len(backups[gb["group"]]) < GROUP_BACKUPS_SHOWN:
                backups[gb["group"]].append(gb)
        names = [d["name"] for d in stores.list_all(ctx)] if groups else []
        return web.render(request, "groups.html", title="Groups", groups=groups,
                          backups=backups, datastores=names)  # fmt: skip

    @r.get("/datastores")
    def datastore_list(request: Request, who: Actor = web.page_actor) -> Response:
        ctx = web.ctx()
        rows = stores.list_all(ctx)
        used = {d["name"]: d for d in overview.summary(ctx)["datastores"]} if rows else {}
        kept = _kept_over_time(ctx) if rows else {}
        plots = {d["name"]: R.plot(kept.get(d["name"], []), f"Bytes kept on {d['name']}", "bytes")
                 for d in rows}  # fmt: skip
        return web.render(request, "datastores.html", title="Datastores", rows=rows, used=used,
                          plots=plots)  # fmt: skip

    @r.get("/schedules")
    def schedule_list(request: Request, who: Actor = web.page_actor) -> Response:
        return web.render(request, "schedules.html", title="Schedules",
                          jobs=backupjobs.list_all(web.ctx()))  # fmt: skip

    @r.get("/pools")
    def pool_list(request: Request, who: Actor = web.page_actor) -> Response:
        return web.render(request, "pools.html", title="Pools", pools=policy.list_pools(web.ctx()))

    @r.get("/hosts")
    def host_list(request: Request, who: Actor = web.page_actor) -> Response:
        return web.render(request, "hosts.html", title="Hosts", hosts=records.list_hosts(web.ctx()))

    @r.get("/tokens")
    def token_list(request: Request, who: Actor = web.page_actor) -> Response:
        _admin(who)
        return web.render(request, "tokens.html", title="Tokens", tokens=tokens.list_tokens(web.ctx()),
                          created=None, roles=_roles())  # fmt: skip

    @r.post("/tokens")
    def token_create(request: Request, posted: Posted = web.form_actor(None)) -> Response:
        _admin(posted.actor)
        ctx = web.ctx()
        made = tokens.create(
            ctx, str(posted.form.get("name") or ""), str(posted.form.get("role") or "")
        )
        return web.render(request, "tokens.html", title="Tokens", tokens=tokens.list_tokens(ctx),
                          created=made, roles=_roles())  # fmt: skip

    @r.post("/tokens/{name}/revoke")
    def token_revoke(name: str, posted: Posted = web.form_actor(None)) -> Response:
        _admin(posted.actor)
        tokens.revoke(web.ctx(), name)
        return web.redirect("/tokens", f"Token {name} revoked.")

    app.include_router(r)


def _admin(who: Actor) -> None:
    """Tokens are the admin's (as ``vmkeep token`` is the catalog owner's)."""
    if not who.is_admin:
        raise Forbidden(who.name, who.role, "tokens", "admin")


def _roles() -> tuple[str, ...]:
    from vmkeep.model import ROLES

    return tuple(ROLES)


def _kept_over_time(ctx: Any) -> dict[str, list[tuple[Any, float | None]]]:
    """Per datastore: the bytes of the points it keeps now, summed by when each was written."""
    points: dict[str, list[tuple[Any, int]]] = defaultdict(list)
    for b in listing.list_backups(ctx):
        for inc in b["increments"]:
            if inc["status"] == "VALID" and inc["finished"]:
                points[b["datastore"]].append((R.when(inc["finished"]), int(inc["size"] or 0)))
    out: dict[str, list[tuple[Any, float | None]]] = {}
    for name, rows in points.items():
        rows.sort(key=lambda p: p[0])
        total = 0
        series: list[tuple[Any, float | None]] = []
        for at, size in rows:
            total += size
            series.append((at, float(total)))
        out[name] = series
    return out
