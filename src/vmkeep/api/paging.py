"""What the API's lists and reads share over HTTP: pages, cursors and ETags.

Pages: a list route takes ``?limit=N`` (``DEFAULT_PAGE``, at most ``MAX_PAGE``) and
``?cursor=C``, answers a JSON array (no envelope) and announces the next page with an RFC 8288
header ``Link: </v1/vms?limit=100&cursor=...>; rel="next"`` (absent on the last page). A cursor
is opaque to clients: it holds the key of the last row shown, and the engine's list continues
after it (keyset, never OFFSET: a row added or removed meanwhile neither repeats nor skips
another). Every text of the cursor's form is a valid cursor; one of another form is a 422.

ETags: every JSON 200 answer of a GET carries ``ETag`` (a strong hash of its body) and a request
whose ``If-None-Match`` names it gets 304 with no body (``ETags``, around the whole app).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from typing import Annotated, Any
from urllib.parse import urlencode

import blake3
from fastapi import Query, Request
from pydantic import AfterValidator, WithJsonSchema

from vmkeep.api.base import FastJSON

DEFAULT_PAGE = 100
MAX_PAGE = 1000
_DIGITS = string.digits + string.ascii_lowercase
CURSOR_LEN = 12  # base 36: every 12-character text is below 2**63, a valid catalog id
CURSOR_PATTERN = f"^[0-9a-z]{{1,{CURSOR_LEN}}}$"


def encode(key: int) -> str:
    """The cursor after the row whose key is ``key`` (a catalog id)."""
    out = ""
    while True:
        key, digit = divmod(key, 36)
        out = _DIGITS[digit] + out
        if key == 0:
            return out


def decode(cursor: str) -> int:
    return int(cursor, 36)


def _checked(cursor: str | None) -> str | None:
    if cursor is not None and (
        not 1 <= len(cursor) <= CURSOR_LEN or any(c not in _DIGITS for c in cursor)
    ):
        raise ValueError(
            'not a cursor of this API; use the URL of the Link header\'s rel="next" as it is, '
            "or leave cursor out to start at the first page"
        )
    return cursor


Limit = Annotated[
    int,
    Query(
        ge=1,
        le=MAX_PAGE,
        description=f"Rows per page (default {DEFAULT_PAGE}, at most {MAX_PAGE}).",
    ),
]
Cursor = Annotated[
    str | None,
    Query(
        max_length=CURSOR_LEN,
        description='Where the page starts: from the Link header (rel="next") of the page '
        "before; none for the first page.",
    ),
    AfterValidator(_checked),
    # the schema: a string of the cursor's form (checked by ``_checked``, whose message says
    # what to do); a route's default, None, is the first page
    WithJsonSchema({"type": "string", "maxLength": CURSOR_LEN, "pattern": CURSOR_PATTERN}),
]


def page(
    request: Request,
    read: Callable[[int, int | None], Sequence[dict[str, Any]]],
    limit: int,
    cursor: str | None,
    key: str = "id",
) -> FastJSON:
    """One page of a list: ``read(n, after)`` returns up to ``n`` rows after the key ``after``
    (None: from the start) in the list's order; the answer has ``limit`` of them and, when more
    follow, the Link header of the next page."""
    rows = list(read(limit + 1, None if cursor is None else decode(cursor)))
    headers = {}
    if len(rows) > limit:
        rows = rows[:limit]
        query = [
            (k, v) for k, v in request.query_params.multi_items() if k not in ("limit", "cursor")
        ]
        query += [("limit", str(limit)), ("cursor", encode(int(rows[-1][key])))]
        headers["Link"] = f'<{request.url.path}?{urlencode(query)}>; rel="next"'
    return FastJSON(rows, headers=headers)


# --- ETags -------------------------------------------------------------------------------------
def etag(body: bytes) -> str:
    return '"' + blake3.blake3(body).hexdigest(length=16) + '"'


def _matches(header: str, tag: str) -> bool:
    """``If-None-Match`` against our ETag (RFC 9110: weak comparison; ``*`` matches any)."""
    for given in header.split(","):
        given = given.strip()
        if given == "*" or given.removeprefix("W/") == tag:
            return True
    return False


class ETags:
    """ASGI middleware: a GET answered 200 with a JSON body gets its ETag, or 304
    without the body when ``If-None-Match`` names it. Other answers (streams, pages, errors)
    pass through untouched and unbuffered."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        # several If-None-Match fields are one list (RFC 9110 5.3): a client or proxy may split it
        given = [v.decode("latin-1") for k, v in scope["headers"] if k == b"if-none-match"]
        wanted = ", ".join(given) if given else None
        start: dict[str, Any] | None = None
        chunks: list[bytes] = []

        async def buffered(message: dict[str, Any]) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                json = headers.get(b"content-type", b"").startswith(b"application/json")
                if message["status"] == 200 and json and b"etag" not in headers:
                    start = message
                    return
                await send(message)
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            tag = etag(body)
            if wanted is not None and _matches(wanted, tag):
                keep = [(k, v) for k, v in start["headers"] if k.lower() in _KEPT_ON_304]
                await send({"type": "http.response.start", "status": 304,
                            "headers": [*keep, (b"etag", tag.encode())]})  # fmt: skip
                await send({"type": "http.response.body", "body": b""})
                return
            await send(start | {"headers": [*start["headers"], (b"etag", tag.encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, buffered)


# what a 304 repeats of the 200 it stands for (RFC 9110 15.4.5)
_KEPT_ON_304 = frozenset(
    {b"cache-control", b"content-location", b"date", b"expires", b"vary", b"link"}
)
