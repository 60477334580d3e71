"""The API's backup jobs (``engine/service/backupjobs.py``): define, show, fire now. The jobs a
run queues are ordinary jobs (``/v1/jobs``)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from pydantic import Field

from vmkeep.api.base import Api, FastJSON, jsonable
from vmkeep.engine.core import jobs
from vmkeep.engine.core.trust import Actor
from vmkeep.engine.service import backupjobs, scheduler
from vmkeep.engine.service.backupjobs import EXECUTIONS
from vmkeep.engine.service.params import NewName, Params, Policy


class BackupJobChange(Params):
    """Fields of a backup job; in a PATCH only those given change (a policy key set to null
    goes back to the VMs' own)."""

    vms: list[str] | None = None
    group: str | None = Field(default=None, max_length=255)
    pool: str | None = Field(default=None, max_length=255)
    all: bool | None = None
    datastore: str | None = Field(default=None, max_length=255)
    schedule: str | None = Field(default=None, max_length=255)
    priority: int | None = Field(default=None, ge=0, le=99)
    # checked by the engine, which names the choices
    execution: str | None = Field(default=None, json_schema_extra={"enum": [*EXECUTIONS, None]})
    options: dict[str, str | int | bool | None] | None = None
    copy_to: str | None = Field(default=None, max_length=255)
    repeat_missed: bool | None = None
    enabled: bool | None = None
    task: Literal["backup", "prune", "verify", "drill"] | None = None


class BackupJobRequest(BackupJobChange):
    name: NewName
    datastore: str = Field(max_length=255)
    schedule: str = Field(max_length=255)
    options: Policy = {}


def routes(api: Api, r: FastAPI) -> None:
    ctx, read, require = api.ctx, api.read, api.require

    @r.get("/v1/backupjobs")
    def list_backupjobs(who: Actor = read) -> Any:
        return FastJSON(backupjobs.list_all(ctx()))

    @r.get("/v1/backupjobs/{name}")
    def show_backupjob(name: str, who: Actor = read) -> Any:
        return FastJSON(backupjobs.show(ctx(), name))

    @r.post("/v1/backupjobs", status_code=201)
    def create_backupjob(body: BackupJobRequest, who: Actor = require("backupjob-edit")) -> Any:
        sel = {"vms": body.vms, "group": body.group, "pool": body.pool, "all": body.all}
        return jsonable(
            backupjobs.create(
                ctx(),
                body.name,
                sel,
                body.datastore,
                body.schedule,
                priority=jobs.DEFAULT_PRIORITY if body.priority is None else body.priority,
                execution=body.execution or "sequential",
                options=dict(body.options),
                copy_to=body.copy_to,
                repeat_missed=body.repeat_missed is not False,
                enabled=body.enabled is not False,
                task=body.task or "backup",
                owner=who.name,
                role=who.role,
            )  # fmt: skip
        )

    @r.patch("/v1/backupjobs/{name}")
    def edit_backupjob(
        name: str, body: BackupJobChange, who: Actor = require("backupjob-edit")
    ) -> Any:
        changes = body.model_dump(exclude_unset=True)
        if "all" in changes:
            changes["all"] = bool(changes["all"])
        return jsonable(backupjobs.edit(ctx(), name, changes, by=(who.name, who.role)))

    @r.delete("/v1/backupjobs/{name}")
    def delete_backupjob(name: str, who: Actor = require("backupjob-edit")) -> Any:
        return jsonable(backupjobs.remove(ctx(), name))

    @r.post("/v1/backupjobs/{name}/run", status_code=201)
    def run_backupjob(name: str, who: Actor = require("backup")) -> Any:
        """A run now: its jobs are queued (``/v1/jobs``), the run is answered."""
        return jsonable(scheduler.run_now(ctx(), name, who.name))
