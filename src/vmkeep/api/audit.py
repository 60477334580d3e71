"""The audit log's ASGI side: the outermost layer of the app, it sees every request's answer
(401 and 413 of ``limits.BodyLimit`` included) and hands what ``engine/audit.py`` keeps to
``record``, in a thread, once the answer is sent. Only the method, path, status, client address
and the actor the token check found (``limits.ACTOR``) are taken: never a body or a header."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vmkeep.api.limits import ACTOR
from vmkeep.engine.service import audit
from vmkeep.errors import VmkeepError

log = logging.getLogger(__name__)


class AuditLog:
    def __init__(
        self, app: ASGIApp, record: Callable[..., None], local: Callable[[Scope], bool]
    ) -> None:
        self.app, self.record, self.local = app, record, local

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # when the app fails before answering, the server answers 500
        state = scope.setdefault("state", {})

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            method = str(scope.get("method", ""))
            if audit.wanted(method, status):
                who = state.get(ACTOR)
                entry: dict[str, Any] = {
                    "actor": getattr(who, "name", audit.NOBODY),
                    "role": getattr(who, "role", audit.NOBODY),
                    "method": method,
                    "path": str(scope.get("path", "")),
                    "status": status,
                    "client": _client(scope, self.local(scope)),
                }
                try:
                    with anyio.CancelScope(shield=True):  # a client gone is recorded too
                        await run_in_threadpool(lambda: self.record(**entry))
                except VmkeepError as err:  # an audit write must not fail the request
                    log.error("audit log: %s", err)


def _client(scope: Scope, local: bool) -> str:
    if local:
        return "local"
    client = scope.get("client")
    if not client:
        return "-"
    host, port = client[0], client[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
