"""The API's reads and its quick catalog writes (a VM created PENDING, a datastore added or
removed, a group created, a job cancelled): each answers at once from one engine call. The long
actions are in ``actions.py``, the streams (files, events, a job's end) in ``stream_routes.py``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Query
from fastapi import Path as PathParam
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import Field

from vmkeep.api.base import Api, FastJSON, jsonable
from vmkeep.engine.core import jobs, stores
from vmkeep.engine.core.trust import Actor
from vmkeep.engine.groups import manage
from vmkeep.engine.lifecycle import dispatch
from vmkeep.engine.points import delete, listing
from vmkeep.engine.service import audit
from vmkeep.engine.service.metrics import CatalogCollector
from vmkeep.engine.service.params import NewName, Params
from vmkeep.engine.vm import inventory
from vmkeep.names import MAX_JSON_ID

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


class GroupRequest(Params):
    name: NewName
    vms: list[str] = Field(min_length=1)
    stop_order: list[str] | None = None


def routes(api: Api, r: FastAPI) -> None:
    """Add these routes to ``r``."""
    ctx, read, require = api.ctx, api.read, api.require

    # --- VMs -------------------------------------------------------------------------------
    @r.get("/v1/vms")
    def list_vms(who: Actor = read) -> Any:
        return FastJSON(inventory.list_vms(ctx()))

    @r.get("/v1/vms/{vm}")
    def show_vm(vm: str, who: Actor = read) -> Any:
        return FastJSON(inventory.show_vm(ctx(), vm))

    @r.post("/v1/vms", status_code=201)
    def create_vm(body: CreateVmRequest, who: Actor = require("vm-create")) -> Any:
        return jsonable(
            dispatch.create(ctx(), body.xml, hold=body.hold, origin="api", who=who.name)
        )

    @r.get("/v1/vms/{vm}/history")
    def vm_history(vm: str, who: Actor = read) -> Any:
        return jsonable(dispatch.history(ctx(), vm))

    @r.get("/v1/vms/{vm}/snapshots")
    def vm_snapshots(vm: str, who: Actor = read) -> Any:
        return jsonable(dispatch.snapshots(ctx(), vm))

    # --- backups, datastores, groups -------------------------------------------------------
    @r.get("/v1/backups")
    def list_backups(vm: str | None = None, who: Actor = read) -> Any:
        return FastJSON(listing.list_backups(ctx(), vm))

    @r.get("/v1/backups/{backup}")  # the path's name as the action routes' (one path)
    def show_backup(backup: Id, who: Actor = read) -> Any:
        return FastJSON(listing.show_with_sizes(ctx(), backup))

    @r.get("/v1/datastores")
    def list_datastores(who: Actor = read) -> Any:
        return FastJSON(stores.list_all(ctx()))

    @r.post("/v1/datastores", status_code=201)
    def add_datastore(body: DatastoreRequest, who: Actor = require("datastore-add")) -> Any:
        return jsonable(stores.add(ctx(), body.name, body.driver, body.options))

    @r.delete("/v1/datastores/{ds}")
    def remove_datastore(
        ds: str, force: bool = False, who: Actor = require("datastore-remove")
    ) -> Any:
        return jsonable(delete.remove_datastore(ctx(), ds, force))

    @r.get("/v1/groups")
    def list_groups(who: Actor = read) -> Any:
        return FastJSON(manage.list_groups(ctx()))

    @r.post("/v1/groups", status_code=201)
    def create_group(body: GroupRequest, who: Actor = require("group-create")) -> Any:
        return jsonable(manage.create_group(ctx(), body.name, body.vms, body.stop_order))

    # --- jobs, audit, metrics --------------------------------------------------------------
    @r.get("/v1/jobs")
    def list_jobs(state: str | None = None, who: Actor = read) -> Any:
        return FastJSON(jobs.list_jobs(ctx(), state))

    @r.delete("/v1/jobs/{job_id}")
    def cancel_job(job_id: Id, who: Actor = require("cancel-job")) -> Any:
        return jsonable(jobs.cancel(ctx(), job_id))

    @r.get("/v1/audit")
    def list_audit(
        limit: int = Query(default=100, ge=1, le=100000), who: Actor = require("audit")
    ) -> Any:
        """Who did what, newest first: every mutating request and every failed login."""
        return FastJSON(audit.list_entries(ctx(), limit))

    registry = CollectorRegistry(auto_describe=False)
    registry.register(CatalogCollector(ctx))

    @r.get("/metrics", response_class=PrometheusText)
    def metrics(who: Actor = read) -> PlainTextResponse:
        """The catalog's facts in Prometheus' text format."""
        return PrometheusText(generate_latest(registry))
