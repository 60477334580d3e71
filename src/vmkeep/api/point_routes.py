"""The API's protection and note routes of restore points (``POST|DELETE
/v1/backups/{backup_id}/protect``, ``PUT /v1/backups/{backup_id}/note``): quick catalog writes,
each one engine call (``engine/points/protect.py``); docs/policies.md, "Protected points and
notes"."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Query
from fastapi import Path as PathParam
from pydantic import Field

from vmkeep.api.base import Api, jsonable
from vmkeep.engine.core.trust import Actor
from vmkeep.engine.points import protect
from vmkeep.engine.service.params import Params
from vmkeep.names import MAX_ID

Id = Annotated[int, PathParam(ge=1, le=MAX_ID)]
Seq = Annotated[int | None, Query(ge=0, le=MAX_ID)]


class NoteRequest(Params):
    """A point's note; ``increment`` null: the newest VALID point; ``text`` "" removes it (its
    length is checked by the engine, which names the limit)."""

    increment: int | None = Field(default=None, ge=0, le=MAX_ID)
    text: str


def routes(api: Api, r: FastAPI) -> None:
    """Add these routes to ``r``."""
    ctx, require = api.ctx, api.require

    @r.post("/v1/backups/{backup_id}/protect")
    def protect_point(
        backup_id: Id, increment: Seq = None, who: Actor = require("backup-protect")
    ) -> Any:
        return jsonable(protect.protect(ctx(), backup_id, increment, actor_name=who.name))

    @r.delete("/v1/backups/{backup_id}/protect")
    def unprotect_point(
        backup_id: Id, increment: Seq = None, who: Actor = require("backup-unprotect")
    ) -> Any:
        return jsonable(protect.unprotect(ctx(), backup_id, increment))

    @r.put("/v1/backups/{backup_id}/note")
    def note_point(backup_id: Id, body: NoteRequest, who: Actor = require("backup-note")) -> Any:
        return jsonable(protect.set_note(ctx(), backup_id, body.increment, body.text))
