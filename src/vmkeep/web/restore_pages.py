"""The restore wizard, ``/restore``: three steps on one page, each a plain form.

1. ``?backup=ID``: the point (the chain's increments with their times, sizes and states);
2. ``&increment=N``: how (``restore_form.KINDS``: as a new VM, in place, instant, one disk,
   files -- the last goes on to the file browser, ``/files``);
3. ``&kind=K``: that kind's options, read off the restore action's params model, and the
   confirm button, a POST that queues the restore through the action table (``Web.act``: the
   role its policy key needs, its checks) and goes on to the job's page.

A refusal (a state, a name taken, a place outside the operator's) is shown above the form in
words, the CLI's, and the form keeps what was typed. Without ``?backup`` the page lists the
points to pick from."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import Response

from vmkeep.engine.core.trust import Actor
from vmkeep.engine.points import listing
from vmkeep.errors import VmkeepError
from vmkeep.names import MAX_ID
from vmkeep.web import restore_form as F
from vmkeep.web.base import Web
from vmkeep.web.session import Posted

PICK_LIMIT = 200  # points listed when no backup is given (newest first); ?vm= narrows them


def disks_of(point: Mapping[str, Any]) -> tuple[str, ...]:
    """The disk targets a point holds (vda, vdb), in its files' order."""
    return tuple(str(f["disk"]) for f in point.get("files", []) if f.get("disk"))


def chosen_point(backup: Mapping[str, Any], increment: int | None) -> dict[str, Any] | None:
    """The increment asked for, else the newest VALID one."""
    incs = backup["increments"]
    if increment is not None:
        return next((i for i in incs if i["id"] == increment), None)
    valid = [i for i in incs if i["status"] == "VALID"]
    return valid[-1] if valid else None


def routes(web: Web, app: FastAPI) -> None:
    r = web.router()

    def page(
        request: Request,
        backup_id: int | None,
        increment: int | None,
        kind_key: str | None,
        vm: str | None = None,
        typed: Mapping[str, str] | None = None,
        error: str | None = None,
        status: int = 200,
    ) -> Response:
        ctx = web.ctx()
        if backup_id is None:
            rows = [b for b in listing.list_backups(ctx, vm or None) if b["status"] == "VALID"]
            rows.reverse()  # newest first
            return web.render(request, "restore_pick.html", backups=rows[:PICK_LIMIT],
                              more=max(0, len(rows) - PICK_LIMIT), vm=vm or "")  # fmt: skip
        backup = listing.show_backup(ctx, backup_id)
        point = chosen_point(backup, increment)
        if point is None and increment is not None:  # not a point of this backup: pick again
            error = error or f"Backup {backup_id} has no point {increment}: pick one below."
            increment, status = None, 404
            point = chosen_point(backup, None)
        elif point is not None and point["status"] != "VALID":
            error = (
                error
                or f"Point {increment} of backup {backup_id} is {point['status']}: pick a valid one."
            )
            increment, status = None, 409
            point = chosen_point(backup, None)
        kind = F.KINDS.get(kind_key or "") if increment is not None and point else None
        fields = F.form_fields(kind, disks_of(point)) if kind and point else []
        return web.render(
            request,
            "restore.html",
            status=status,
            backup=backup,
            point=point,
            step=3 if kind else 2 if increment is not None and point else 1,
            kinds=list(F.KINDS.values()),
            kind=kind,
            fields=fields,
            typed=typed or {},
            error=error,
        )

    @r.get("/restore")
    def restore_page(
        request: Request,
        backup: int | None = Query(default=None, ge=1, le=MAX_ID),
        increment: int | None = Query(default=None, ge=0),
        kind: str | None = Query(default=None, max_length=16),
        vm: str | None = Query(default=None, max_length=255),
        who: Actor = web.page_actor,
    ) -> Response:
        return page(request, backup, increment, kind, vm)

    @r.post("/restore")
    def restore_post(request: Request, posted: Posted = web.form_actor("restore")) -> Response:
        form = {k: str(v) for k, v in posted.form.items()}
        try:
            backup = int(form.get("backup", ""))
            increment = int(form["increment"]) if form.get("increment", "") != "" else None
        except ValueError:
            return page(request, None, None, None, error="Pick a restore point first.", status=422)
        kind = F.KINDS.get(form.get("kind", ""))
        if kind is None or kind.key == "files":
            return page(request, backup, increment, None, error="Pick how to restore.", status=422)
        try:
            p = F.params_from_form(kind, backup, increment, form)
            return web.act(posted.actor, "restore", p.model_dump(exclude_defaults=True))
        except VmkeepError as err:
            status = 422 if err.http_status == 400 else err.http_status
            return page(request, backup, increment, kind.key, typed=form, error=str(err),
                        status=status)  # fmt: skip

    app.include_router(r)
