"""The web dashboard, served by ``vmkeep daemon`` at ``/`` from the API's own app: server-made
pages (Jinja2) over the same engine calls as the API, acting only through the action table.
An adapter like ``api/`` and ``cli/``: it imports the engine, the engine never imports it.

``routes(api, app)`` mounts the login (``session.py``), the pages (``pages_*.py``, D's
``restore_pages.py`` and ``files_pages.py``) and ``/static``; docs/web.md shows each page."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from vmkeep.api import limits
from vmkeep.api.base import Api
from vmkeep.web import render as R
from vmkeep.web import session as S
from vmkeep.web.base import Web


def routes(api: Api, app: FastAPI) -> Web:
    """Mount the dashboard on ``app`` (every route out of the OpenAPI document)."""
    from vmkeep.web import (
        files_pages,
        pages_admin,
        pages_overview,
        pages_points,
        pages_vms,
        restore_pages,
    )

    web = Web(api, S.key(api.config.data_dir), secure=api.config.api.tls_cert is not None)
    r = web.router()
    login_routes(web, r)
    app.include_router(r)
    pages = (pages_overview, pages_vms, pages_points, pages_admin, restore_pages, files_pages)
    for module in pages:
        module.routes(web, app)
    app.mount("/static", StaticFiles(directory=R.STATIC), name="static")
    return web


def login_routes(web: Web, r: Any) -> None:
    @r.get("/login")
    def login_page(request: Request, next: str = "/") -> Response:
        return web.render(request, "login.html", next=S.safe_next(next))

    @r.post("/login")
    async def login(request: Request) -> Response:
        form = await S.read_form(request)
        goto = S.safe_next(str(form.get("next") or "/"))
        if not S.same_origin(request):
            raise S.CsrfRefused("the login was sent from another site")
        token = str(form.get("token") or "").strip()
        from starlette.concurrency import run_in_threadpool

        who = await run_in_threadpool(S.actor_of, web.ctx(), token) if token else None
        if who is None:
            why = "Enter a token." if not token else "Unknown or revoked token."
            return web.render(request, "login.html", status=401, next=goto, error=why
                              + " An admin makes one with: vmkeep token create NAME --role viewer")  # fmt: skip
        request.scope.setdefault("state", {})[limits.ACTOR] = who  # the audit log's actor
        response = web.redirect(goto)
        S.set_cookie(response, token, web.secure)
        return response

    @r.post("/logout")
    async def logout(request: Request) -> Response:
        # a session whose token was revoked (or is unknown) is dropped without a CSRF check:
        # it can do nothing anyway, and the browser should not keep sending it
        cookie = S.cookie_of(request)
        from starlette.concurrency import run_in_threadpool

        who = await run_in_threadpool(S.actor_of, web.ctx(), cookie)
        if who is not None and cookie is not None:
            request.scope.setdefault("state", {})[limits.ACTOR] = who
            S.check_csrf(web.key, request, cookie, await S.read_form(request))
        response = web.redirect("/login", "Logged out.")
        S.clear_cookie(response, web.secure)
        return response
