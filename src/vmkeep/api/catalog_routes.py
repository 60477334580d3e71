"""The API's reads and its quick catalog writes (a VM created PENDING, a datastore added or
removed, a group created, a job cancelled): each answers at once from one engine call. The long
actions are in ``actions.py``, the streams (files, events, a job's end) in ``stream_routes.py``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import Field

from vmkeep.api.base import Api, FastJSON, jsonable
from vmkeep.api.paging import DEFAULT_PAGE, Cursor, Limit, page
from vmkeep.engine.core import jobs, stores
from vmkeep.engine.core.trust import Actor
from vmkeep.engine.groups import manage
from vmkeep.engine.lifecycle import dispatch
from vmkeep.engine.points import delete, listing
from vmkeep.engine.service import audit, overview
from vmkeep.engine.service.metrics import CatalogCollector
from vmkeep.engine.service.params import NewName, Params
from vmkeep.engine.vm import inventory
from vmkeep.names import MAX_JSON_ID

OVERVIEW_MAX_AGE = 1.0  # seconds an overview is answered again (many dashboards poll it)
# catalog ids: a larger one is bad input (422), not a database error
Id = Annotated[int, PathParam(ge=1, le=MAX_JSON_ID)]


class PrometheusText(PlainTextResponse):
    media_type = CONTENT_TYPE_LATEST  # Prometheus' text exposition format


class DatastoreRequest(Params):
    name: NewName
    driver: str = Field(default="dir", max_length=32)
    options: dict[str, Any] = {}


class CreateVmRequest(Params):
    xml: str = Field(min_length=1, max_length=1 << 20)
    hold: bool = False
    host: str | None = Field(default=None, min_length=1, max_length=255)  # pinned to that host


class GroupRequest(Params):
    name: NewName
    vms: list[str] = Field(min_length=1)
    stop_order: list[str] | None = None


def routes(api: Api, r: FastAPI) -> None:
    """Add these routes to ``r``."""
    ctx, read, require = api.ctx, api.read, api.require

    # --- VMs -------------------------------------------------------------------------------
    @r.get("/v1/vms")
    def list_vms(
        request: Request, limit: Limit = DEFAULT_PAGE, cursor: Cursor = None, who: Actor = read
    ) -> Any:
        """A page of the VMs in id order; the next page's URL is in the Link header."""
        return page(
            request, lambda n, after: inventory.list_vms(ctx(), n, after, reuse=True), limit, cursor
        )

    @r.get("/v1/vms/{vm}")
    def show_vm(vm: str, who: Actor = read) -> Any:
        return FastJSON(inventory.show_vm(ctx(), vm))

    @r.post("/v1/vms", status_code=201)
    def create_vm(body: CreateVmRequest, who: Actor = require("vm-create")) -> Any:
        return jsonable(
            dispatch.create(
                ctx(), body.xml, hold=body.hold, host=body.host, origin="api", who=who.name
            )
        )

    @r.get("/v1/vms/{vm}/history")
    def vm_history(vm: str, who: Actor = read) -> Any:
        return jsonable(dispatch.history(ctx(), vm))

    @r.get("/v1/vms/{vm}/snapshots")
    def vm_snapshots(vm: str, who: Actor = read) -> Any:
        return jsonable(dispatch.snapshots(ctx(), vm))

    # --- backups, datastores, groups -------------------------------------------------------
    @r.get("/v1/backups")
    def list_backups(
        request: Request,
        vm: str | None = None,
        limit: Limit = DEFAULT_PAGE,
        cursor: Cursor = None,
        who: Actor = read,
    ) -> Any:
        """A page of the backups (of ``vm``) in id order, each with its points."""
        return page(
            request, lambda n, after: listing.list_backups(ctx(), vm, n, after), limit, cursor
        )

    @r.get("/v1/backups/{backup}")  # the path's name as the action routes' (one path)
    def show_backup(backup: Id, who: Actor = read) -> Any:
        return FastJSON(listing.show_with_sizes(ctx(), backup))

    @r.get("/v1/datastores")
    def list_datastores(
        request: Request, limit: Limit = DEFAULT_PAGE, cursor: Cursor = None, who: Actor = read
    ) -> Any:
        """A page of the datastores in id order, with total and free bytes."""
        return page(request, lambda n, after: stores.list_all(ctx(), n, after), limit, cursor)

    @r.post("/v1/datastores", status_code=201)
    def add_datastore(body: DatastoreRequest, who: Actor = require("datastore-add")) -> Any:
        return jsonable(stores.add(ctx(), body.name, body.driver, body.options))

    @r.delete("/v1/datastores/{ds}")
    def remove_datastore(
        ds: str, force: bool = False, who: Actor = require("datastore-remove")
    ) -> Any:
        return jsonable(delete.remove_datastore(ctx(), ds, force))

    @r.get("/v1/groups")
    def list_groups(
        request: Request, limit: Limit = DEFAULT_PAGE, cursor: Cursor = None, who: Actor = read
    ) -> Any:
        """A page of the groups in id order."""
        return page(request, lambda n, after: manage.list_groups(ctx(), n, after), limit, cursor)

    @r.post("/v1/groups", status_code=201)
    def create_group(body: GroupRequest, who: Actor = require("group-create")) -> Any:
        return jsonable(manage.create_group(ctx(), body.name, body.vms, body.stop_order))

    # --- the dashboard's overview ----------------------------------------------------------
    @r.get("/v1/overview")
    def show_overview(who: Actor = read) -> Any:
        """VMs by protection state, datastore usage, running jobs, the last 24 h's failures."""
        return FastJSON(overview.summary(ctx(), max_age=OVERVIEW_MAX_AGE))

    # --- jobs, audit, metrics --------------------------------------------------------------
    @r.get("/v1/jobs")
    def list_jobs(
        request: Request,
        state: str | None = None,
        limit: Limit = DEFAULT_PAGE,
        cursor: Cursor = None,
        who: Actor = read,
    ) -> Any:
        """A page of the jobs (in ``state``), newest first."""
        return page(request, lambda n, after: jobs.list_jobs(ctx(), state, n, after), limit, cursor)

    @r.delete("/v1/jobs/{job_id}")
    def cancel_job(job_id: Id, who: Actor = require("cancel-job")) -> Any:
        return jsonable(jobs.cancel(ctx(), job_id))

    @r.get("/v1/audit")
    def list_audit(
        request: Request,
        limit: Limit = DEFAULT_PAGE,
        cursor: Cursor = None,
        who: Actor = require("audit"),
    ) -> Any:
        """Who did what, newest first: every mutating request and every failed login."""
        return page(request, lambda n, after: audit.list_entries(ctx(), n, after), limit, cursor)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(CatalogCollector(ctx))

    @r.get("/metrics", response_class=PrometheusText)
    def metrics(who: Actor = read) -> PlainTextResponse:
        """The catalog's facts in Prometheus' text format."""
        return PrometheusText(generate_latest(registry))
