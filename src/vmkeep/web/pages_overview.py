"""The overview page (``/``): every VM's protection in numbers, datastore usage, the running
jobs and the failures of the last 24 h, first; from ``overview.summary`` (``GET /v1/overview``'s
call)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response

from vmkeep.engine.core.trust import Actor
from vmkeep.engine.service import overview
from vmkeep.web.base import Web


def routes(web: Web, app: FastAPI) -> None:
    r = web.router()

    @r.get("/")
    def home(request: Request, who: Actor = web.page_actor) -> Response:
        facts = overview.summary(web.ctx())
        return web.render(request, "overview.html", title="Overview", o=facts)

    app.include_router(r)
