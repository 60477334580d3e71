"""The API's protection and note routes of restore points (``POST|DELETE
/v1/backups/{backup}/protect``, ``PUT /v1/backups/{backup}/note``): quick catalog writes,
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
from vmkeep.engine.points.protect import NOTE_MAX
from vmkeep.engine.service.params import Params
from vmkeep.names import MAX_JSON_ID

Id = Annotated[int, PathParam(ge=1, le=MAX_JSON_ID)]
Seq = Annotated[int | None, Query(ge=0, le=MAX_JSON_ID)]
# protect.set_note's rule as the schema shows it (the engine checks it and says it in words):
# at most NOTE_MAX characters, no control character but tab and newline
NOTE_SCHEMA = {"maxLength": NOTE_MAX, "pattern": "^[^\\x00-\\x08\\x0b-\\x1f]*$"}


class NoteRequest(Params):
    """A point's note; ``increment`` null: the newest VALID point; ``text`` "" removes it (its
    length and characters are checked by the engine, which names the limit)."""

    increment: int | None = Field(default=None, ge=0, le=MAX_JSON_ID)
    text: Annotated[str, Field(json_schema_extra=NOTE_SCHEMA)]


def routes(api: Api, r: FastAPI) -> None:
    """Add these routes to ``r``."""
    ctx, require = api.ctx, api.require

    @r.post("/v1/backups/{backup}/protect")
    def protect_point(
        backup: Id, increment: Seq = None, who: Actor = require("backup-protect")
    ) -> Any:
        return jsonable(protect.protect(ctx(), backup, increment, actor_name=who.name))

    @r.delete("/v1/backups/{backup}/protect")
    def unprotect_point(
        backup: Id, increment: Seq = None, who: Actor = require("backup-unprotect")
    ) -> Any:
        return jsonable(protect.unprotect(ctx(), backup, increment))

    @r.put("/v1/backups/{backup}/note")
    def note_point(backup: Id, body: NoteRequest, who: Actor = require("backup-note")) -> Any:
        return jsonable(protect.set_note(ctx(), backup, body.increment, body.text))
