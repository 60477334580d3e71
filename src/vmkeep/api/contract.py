"""The OpenAPI document as the API's contract: every route declares each status it can answer,
with the body and headers it then sends, so that a client generated from ``/openapi.json``
knows every answer (docs/api-contract.md; ``tests/fuzz/test_api_schema.py`` holds the API to it
with schemathesis' full check set).

One pass over the app's routes once every router has added its own (``declare``), driven by
what a route can raise:

- a token check (``require``): 401 (no token, a bad or revoked one), 403 (its role may not);
  421 on the daemon's local socket (a request meaning another catalog);
- any parameter: 422 (bad input: the error tree's 400s and the request's validation);
- a body: 413 (``[api] max_body_bytes``, ``limits.BodyLimit``);
- a path parameter, a body or a text query parameter (not a page's cursor): 404 (what it
  names does not exist);
- a write (POST, PUT, PATCH, DELETE): 409 (a refused state, a name taken, in use);
- an action of the table (202): 429 (``[api] max_queued_per_token``) and ``Location``;
- any engine call: 5XX (the catalog 500, the hypervisor or a datastore 502/503/504, no space
  507, every work slot busy 503);
- a JSON read: 304 and ``ETag`` (``If-None-Match``), ``Link`` when it pages (``cursor``).

A route adds what the pass cannot see through FastAPI's own ``responses=`` (``errors``), e.g.
the 429 of a long request; what it declares wins. Every error body is ``ErrorBody``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.routing import Match
from starlette.types import Scope

ERROR_REF = "#/components/schemas/ErrorBody"
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})

# why each status is answered (the description in the document)
WHY: dict[int | str, str] = {
    304: "Not modified: the ETag sent in If-None-Match is still the body's",
    401: "Not authenticated: no bearer token, or a bad or revoked one",
    403: "The token's role may not do this ([api.policy]), or the action is refused to it",
    404: "What the request names does not exist",
    409: "Refused in the current state: a wrong state, a name taken, in use or busy",
    413: "Request body larger than [api] max_body_bytes",
    421: "Local socket only: this daemon serves another catalog or libvirt host",
    422: "Bad input: the error names the value and what is allowed",
    429: "Too many queued jobs or long requests for this token: wait for some to end",
    "5XX": "The engine failed: catalog (500), hypervisor or datastore (502, 503, 504), "
    "no space (507), every work slot busy (503)",
}
ETAG = {"description": "A strong hash of the body (send it back in If-None-Match)",
        "schema": {"type": "string"}}  # fmt: skip
LINK = {"description": 'The next page, RFC 8288: <...?limit=N&cursor=C>; rel="next" '
        "(absent on the last page)", "schema": {"type": "string"}}  # fmt: skip
LOCATION = {"description": "The queued job: /v1/jobs/{id}", "schema": {"type": "string"}}


class ErrorDetail(BaseModel):
    code: str  # the error class's name (errors.py), e.g. VmNotFound, InvalidValue
    message: str  # what went wrong and how to fix it, as the CLI says it


class ErrorBody(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


def errors(*codes: int | str) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` declaring error answers of ``codes`` with ``ErrorBody``."""
    return {
        code: {
            "description": WHY.get(code, "Error"),
            "content": {"application/json": {"schema": {"$ref": ERROR_REF}}},
        }
        for code in codes
    }


def token_check(route: APIRoute) -> bool:
    """Whether the route depends on ``require`` (its check carries the policy key)."""
    return any(hasattr(d.call, "action") for d in route.dependant.dependencies)


def _params(d: Dependant, where: str) -> list[Any]:
    """The ``where`` params (path, query, header, cookie) of ``d`` and its dependencies."""
    return [*getattr(d, f"{where}_params"), *(p for s in d.dependencies for p in _params(s, where))]


def error_codes(route: APIRoute, local_socket: bool) -> list[int | str]:
    """The error statuses ``route`` can answer (see the module's text)."""
    d = route.dependant
    params = [p for w in ("path", "query", "header", "cookie") for p in _params(d, w)]
    has_body = route.body_field is not None
    codes: list[int | str] = []
    if token_check(route):
        codes += [401, 403] + ([421] if local_socket else []) + ["5XX"]
    if params or has_body:
        codes.append(422)
    if has_body:
        codes.append(413)
    texts = [
        q
        for q in _params(d, "query")
        if q.field_info.annotation in (str, str | None) and q.alias != "cursor"  # a bad one: 422
    ]
    if _params(d, "path") or has_body or texts:
        codes.append(404)
    if (route.methods or set()) & WRITES:
        codes.append(409)
    if route.status_code == 202:
        codes.append(429)
    return codes


def json_read(route: APIRoute) -> bool:
    response_class: Any = getattr(route.response_class, "value", route.response_class)
    json = isinstance(response_class, type) and issubclass(response_class, JSONResponse)
    return route.methods == {"GET"} and token_check(route) and json


def success(route: APIRoute) -> dict[int | str, dict[str, Any]]:
    """Headers of the success answer, and 304 on a JSON read."""
    out: dict[int | str, dict[str, Any]] = {}
    status = route.status_code or 200
    if status == 202:
        out[202] = {"headers": {"Location": LOCATION}}
    if json_read(route):
        headers = {"ETag": ETAG}
        if any(q.alias == "cursor" for q in route.dependant.query_params):
            headers["Link"] = LINK
        out[status] = {"headers": headers}
        out[304] = {"description": WHY[304], "headers": {"ETag": ETAG}}
    return out


def declare(app: FastAPI, local_socket: bool) -> None:
    """Declare every documented route's answers; call after every router added its routes."""
    for route in app.routes:
        if isinstance(route, APIRoute) and route.include_in_schema:
            declared = {**success(route), **errors(*error_codes(route, local_socket))}
            declared |= route.responses  # the route's own win
            route.responses = dict(sorted(declared.items(), key=lambda kv: str(kv[0])))
    original = app.openapi

    def openapi() -> dict[str, Any]:
        fresh = app.openapi_schema is None
        doc = original()
        if fresh:  # ErrorBody and what it refers to, under components
            schema = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            components.update(schema.pop("$defs", {}))
            components["ErrorBody"] = schema
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def allowed_methods(routes: Iterable[Any], scope: Scope) -> list[str]:
    """The methods of every route at ``scope``'s path (the ``Allow`` header of a 405)."""
    methods: set[str] = set()
    for route in routes:
        methods_of = getattr(route, "methods", None)
        if methods_of and route.matches(scope)[0] in (Match.FULL, Match.PARTIAL):
            methods |= set(methods_of)
    return sorted(methods)
