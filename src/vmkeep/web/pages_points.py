"""The restore points and the jobs: ``/backups`` (every point, filtered by VM, datastore and
status, with verify, drill, copy, delete, protect and a link to the restore wizard), ``/jobs``
and ``/jobs/{id}`` (live progress from ``/v1/events``, cancel, the error in full). Protecting a
point and cancelling a job are quick catalog writes, as the API's routes make them."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from vmkeep.api.catalog_routes import Id
from vmkeep.engine.core import jobs, stores
from vmkeep.engine.core.trust import Actor
from vmkeep.engine.points import listing, protect
from vmkeep.errors import InvalidValue
from vmkeep.web import buttons
from vmkeep.web.base import Web
from vmkeep.web.session import Posted

SHOWN = 300  # points a page lists, newest first (a filter narrows them)
STATUSES = ("VALID", "RUNNING", "FAILED", "DAMAGED", "CANCELLED")
JOB_STATES = ("QUEUED", "RUNNING", "DONE", "FAILED", "CANCELLED")


def _seq(value: Any) -> int | None:
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidValue("increment", value, "give a point's number: 0, 1, ...") from None


def routes(web: Web, app: FastAPI) -> None:
    r = web.router()

    @r.get("/backups")
    def backup_list(
        request: Request, vm: str = "", datastore: str = "", status: str = "",
        who: Actor = web.page_actor,
    ) -> Response:  # fmt: skip
        ctx = web.ctx()
        chains = listing.list_backups(ctx, vm or None)
        rows = []
        for b in reversed(chains):
            if datastore and b["datastore"] != datastore:
                continue
            for inc in reversed(b["increments"]):
                if status and inc["status"] != status:
                    continue
                rows.append((b, inc, buttons.point_buttons(web, who, b, inc)))
        stores_ = [d["name"] for d in stores.list_all(ctx)]
        return web.render(
            request, "backups.html", title="Backups", rows=rows[:SHOWN], more=len(rows) > SHOWN,
            shown=SHOWN, vm=vm, datastore=datastore, status=status, statuses=STATUSES,
            datastores=stores_, vms=sorted({b["vm"] for b in chains}) if not vm else [vm],
        )  # fmt: skip

    @r.post("/backups/{backup_id}/protect")
    def protect_point(backup_id: Id, posted: Posted = web.form_actor("backup-protect")) -> Response:
        seq = _seq(posted.form.get("increment"))
        done = protect.protect(web.ctx(), backup_id, seq, actor_name=posted.actor.name)
        return web.redirect(
            _back(posted), f"Protected point {backup_id}.{done.get('increment', seq)}."
        )

    @r.post("/backups/{backup_id}/unprotect")
    def unprotect_point(
        backup_id: Id, posted: Posted = web.form_actor("backup-unprotect")
    ) -> Response:
        seq = _seq(posted.form.get("increment"))
        protect.unprotect(web.ctx(), backup_id, seq)
        return web.redirect(_back(posted), f"Point {backup_id}.{seq} is no longer protected.")

    @r.get("/jobs")
    def job_list(request: Request, state: str = "", who: Actor = web.page_actor) -> Response:
        shown = state.upper() if state.upper() in JOB_STATES else None
        rows = jobs.list_jobs(web.ctx(), shown)
        return web.render(request, "jobs.html", title="Jobs", jobs=rows, state=shown or "",
                          states=JOB_STATES)  # fmt: skip

    @r.get("/jobs/{job_id}")
    def job_page(request: Request, job_id: Id, who: Actor = web.page_actor) -> Response:
        job = jobs.get(web.ctx(), job_id)
        return web.render(request, "job.html", title=f"Job {job_id}", job=job,
                          final=job["state"] in jobs.FINAL)  # fmt: skip

    @r.post("/jobs/{job_id}/cancel")
    def cancel_job(job_id: Id, posted: Posted = web.form_actor("cancel-job")) -> Response:
        jobs.cancel(web.ctx(), job_id)
        return web.redirect(f"/jobs/{job_id}", f"Asked job {job_id} to stop.")

    app.include_router(r)


def _back(posted: Posted) -> str:
    from vmkeep.web.session import safe_next

    return safe_next(str(posted.form.get("next") or "/backups"))
