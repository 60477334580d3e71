"""The REST API under /v1 (FastAPI): a thin adapter over engine/.

Reads answer at once (``catalog_routes.py``); long actions are the action table's
(``engine/service/actions.py``), whose routes are generated (``actions.py``): each is enqueued
as a job and answers 202 with the job and a ``Location: /v1/jobs/{id}`` header, once the
action's checks pass (a wrong state is a 409 now, not a failed job later). Files, events and a
job's end are streams (``stream_routes.py``). Errors carry the error tree's HTTP status and a
body ``{"error": {"code", "message"}}``; bad input is a 422, never a 500.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from vmkeep import __version__, web
from vmkeep.api import (
    actions,
    catalog_routes,
    contract,
    host_routes,
    limits,
    notify_routes,
    paging,
    point_routes,
    pool_routes,
    schedule_routes,
    stream_routes,
)
from vmkeep.api.audit import AuditLog
from vmkeep.api.base import Api
from vmkeep.config import Config
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.trust import LOCAL_ADMIN, Actor
from vmkeep.engine.service import audit, tokens
from vmkeep.engine.service.workers import WorkSlots
from vmkeep.errors import Unauthorized, VmkeepError
from vmkeep.paths import daemon_key
from vmkeep.web import session as web_session

# the bearer token in the document (``securitySchemes``); the check reads the header itself
BEARER = HTTPBearer(auto_error=False, description="A token of 'vmkeep token create NAME'")


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(
    config: Config,
    local_socket: Path | None = None,
    slots: WorkSlots | None = None,
    stopping: threading.Event | None = None,
) -> FastAPI:
    """The app; one engine Context per server thread (a libvirt connection is per thread).
    Every route but /healthz needs a bearer token whose role the action's policy allows, except
    on the daemon's ``local_socket``: only the daemon's user can connect to it, and that user
    could open the catalog itself (as the CLI does without a daemon). A request there names the
    catalog and libvirt URI it means (``X-Vmkeep-Catalog``: ``paths.daemon_key``); a request
    meaning others gets 421, and the CLI reads them itself.

    ``slots``: the daemon's work slots (``[jobs] workers``), which its workers share with the
    files requests; the app makes its own when none is given. ``stopping``: set by the server
    when it begins to stop, so that open streams end (``/v1/events``, a job's wait). Limits: ``api/limits.py``; every
    mutating request and failed login is audited (``engine/service/audit.py``)."""
    app = FastAPI(title="vmkeep", version=__version__, openapi_url="/openapi.json")
    local = threading.local()
    work = slots if slots is not None else WorkSlots(config.jobs.workers)
    streams = limits.StreamSlots(config.api.max_streams_per_token)

    def ctx() -> Context:
        if not hasattr(local, "ctx"):
            local.ctx = Context(config)
        c: Context = local.ctx
        return c

    @app.exception_handler(VmkeepError)
    async def vmkeep_error(_request: Request, err: VmkeepError) -> JSONResponse:
        return limits.error_response(err)  # the body limit's refusals have the same shape

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == 400:  # a body FastAPI could not read (not UTF-8): bad input
            return _error(422, "InvalidValue", f"body: {err.detail}; send JSON in UTF-8")
        codes = {404: "NotFound", 405: "MethodNotAllowed", 413: "RequestTooLarge"}
        headers = dict(err.headers or {})
        if err.status_code == 405:  # every method of the path, not only one route's
            headers["Allow"] = ", ".join(contract.allowed_methods(app.routes, request.scope))
        code = codes.get(err.status_code, "HTTPError")
        return _error(err.status_code, code, str(err.detail), headers)

    @app.exception_handler(RequestValidationError)
    async def bad_input(_request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, "InvalidValue", f"{where}: {first.get('msg')}")

    local_server = (str(local_socket), None)  # uvicorn's scope["server"] on that socket
    own_key = daemon_key(config.catalog_url, config.libvirt.uri)

    def is_local(scope: Any) -> bool:
        return local_socket is not None and scope.get("server") == local_server

    def credential(scope: Any, authorization: str | None) -> str | None:
        """The ``Authorization`` header, or for a GET the dashboard's session cookie as one (a
        page's ``EventSource('/v1/events')`` cannot send a header). Mutating requests need the
        header: a cookie alone never changes anything through the API (no CSRF there)."""
        if authorization or scope.get("method") not in ("GET", "HEAD"):
            return authorization
        cookie = Request(scope).cookies.get(web_session.COOKIE)
        return f"Bearer {cookie}" if cookie else None

    def require(action: str) -> Any:
        """The dependency of a route: the caller's Actor once its token's role may ``action``
        (a policy key of ``tokens.POLICY``)."""

        def check(request: Request, _bearer: Any = Security(BEARER)) -> Actor:
            authorization = credential(request.scope, request.headers.get("authorization"))
            state = request.scope.setdefault("state", {})
            if is_local(request.scope):
                if request.headers.get("x-vmkeep-catalog", own_key) != own_key:
                    raise StarletteHTTPException(421, "this daemon serves another catalog or host")
                state[limits.ACTOR] = LOCAL_ADMIN
                return LOCAL_ADMIN  # the daemon's user: who could open the catalog itself
            who = state.get(limits.ACTOR)  # a request with a body: checked before it was read
            if who is None:
                who = Actor(*tokens.authenticate(ctx(), authorization))
                state[limits.ACTOR] = who  # the audit log's actor
            tokens.authorize(who.name, who.role, action, config.api.policy)
            return who

        check.action = action  # type: ignore[attr-defined]  # the route table's policy column
        return Depends(check)

    async def body_actor(scope: Any) -> Actor:
        """The token check of a request with a body, before it is read (``limits.BodyLimit``)."""
        if is_local(scope):
            return LOCAL_ADMIN
        if not str(scope.get("path", "")).startswith("/v1/"):
            return web_session.NOT_YET  # a page's form: its session is checked by the page
        header = Request(scope).headers.get("authorization")
        return Actor(*await run_in_threadpool(lambda: tokens.authenticate(ctx(), header)))

    async def token_valid(request: Request) -> bool:
        """Whether a long request's token is still there (not revoked)."""
        if is_local(request.scope):
            return True
        header = credential(request.scope, request.headers.get("authorization"))
        try:
            await run_in_threadpool(lambda: tokens.authenticate(ctx(), header))
        except Unauthorized:
            return False
        return True

    def record(**entry: Any) -> None:
        audit.record(ctx(), **entry)

    # outermost last: the audit log sees the body limit's 401 and 413 too
    app.add_middleware(limits.BodyLimit, limit=config.api.max_body_bytes, authenticate=body_actor)
    app.add_middleware(AuditLog, record=record, local=is_local)
    app.add_middleware(paging.ETags)  # ETag / 304 on every JSON GET (api/paging.py)

    # --- health --------------------------------------------------------------------------------
    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True, "version": __version__}

    api = Api(config, ctx, require, is_local, token_valid, work, streams,
              stopping if stopping is not None else threading.Event())  # fmt: skip
    for module in (catalog_routes, point_routes, pool_routes, actions, stream_routes,
                   schedule_routes, notify_routes, host_routes):  # fmt: skip
        module.routes(api, app)
    web.routes(api, app)  # the dashboard at /, after the API (docs/web.md)
    contract.declare(app, local_socket is not None)
    return app
