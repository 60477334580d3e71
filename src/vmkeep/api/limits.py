"""Bounds on every API client (docs/security.md, "Limits"), as pure ASGI pieces the app wraps.

- ``BodyLimit``: a request body larger than ``[api] max_body_bytes`` is a 413 before it is read
  into memory or parsed: at once when its ``Content-Length`` says so, else as soon as the bytes
  streamed (chunked) pass the limit. A request with a body on a TCP connection is authenticated
  first (401 before a byte of it is read): FastAPI reads a body before it resolves the route's
  token check.
- ``StreamSlots``: the long requests a token may hold at once (``GET /v1/jobs/ID?wait=S``,
  ``GET /v1/events``), ``[api] max_streams_per_token``; 429 beyond. They are served by the event
  loop (no thread held while they wait), and the local socket's admin has no such bound.
- ``HeldStream``: a streamed response that gives its slot back however it ends (done, client
  gone, cancelled before its first byte).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vmkeep.engine.core.trust import Actor
from vmkeep.errors import RequestTooLarge, TooManyRequests, VmkeepError

# scope["state"] keys: the actor a request was authenticated as (by ``BodyLimit`` or the route's
# check), read by the route's check and by the audit log
ACTOR = "vmkeep_actor"


def error_response(err: VmkeepError) -> JSONResponse:
    status = 422 if err.http_status == 400 else err.http_status
    body = {"error": {"code": type(err).__name__, "message": str(err)}}
    return JSONResponse(body, status_code=status)


class BodyTooLarge(HTTPException):
    """Raised by the counting ``receive`` when a streamed body passes the limit: FastAPI lets an
    HTTPException through its body parsing, and the app's handler answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, str(RequestTooLarge(f"more than {limit}", limit)))


def content_length(scope: Scope) -> int | None:
    value = Headers(scope=scope).get("content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def has_body(scope: Scope) -> bool:
    headers = Headers(scope=scope)
    return "transfer-encoding" in headers or (content_length(scope) or 0) > 0


class BodyLimit:
    """The body bound and the token check before any body is read (see the module's text).

    ``authenticate(scope)`` is the app's token check (the local socket's admin included); it
    raises a VmkeepError (401) for a missing, bad or revoked token."""

    def __init__(
        self, app: ASGIApp, limit: int, authenticate: Callable[[Scope], Awaitable[Actor]]
    ) -> None:
        self.app, self.limit, self.authenticate = app, limit, authenticate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = content_length(scope)
        if declared is not None and declared > self.limit:
            await _close(error_response(RequestTooLarge(declared, self.limit)))(
                scope, receive, send
            )
            return
        if has_body(scope):
            try:
                actor = await self.authenticate(scope)
            except VmkeepError as err:
                await _close(error_response(err))(scope, receive, send)
                return
            scope.setdefault("state", {})[ACTOR] = actor
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:
            if started:
                raise
            too_large = RequestTooLarge(f"more than {self.limit}", self.limit)
            await _close(error_response(too_large))(scope, receive, send)


def _close(response: JSONResponse) -> JSONResponse:
    """An answer sent before the body was read: the connection closes after it (the unread
    rest of the body is never taken in)."""
    response.headers["connection"] = "close"
    return response


class StreamSlots:
    """Long requests held per token (event-loop only: no lock needed)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held: dict[str, int] = {}

    def take(self, actor: Actor, exempt: bool = False) -> Callable[[], None]:
        """A slot of ``actor``'s, or TooManyRequests; returns its release (idempotent)."""
        if exempt:
            return lambda: None
        n = self.held.get(actor.name, 0)
        if n >= self.limit:
            raise TooManyRequests(
                "waits and event streams", actor.name, self.limit, "[api] max_streams_per_token"
            )
        self.held[actor.name] = n + 1
        given_back = False

        def release() -> None:
            nonlocal given_back
            if given_back:
                return
            given_back = True
            left = self.held.get(actor.name, 1) - 1
            if left > 0:
                self.held[actor.name] = left
            else:
                self.held.pop(actor.name, None)

        return release

    @contextmanager
    def holding(self, actor: Actor, exempt: bool = False) -> Iterator[None]:
        release = self.take(actor, exempt)
        try:
            yield
        finally:
            release()


class HeldStream(StreamingResponse):
    """A StreamingResponse that calls ``release`` when it ends, however it ends."""

    def __init__(self, content: Any, release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()
