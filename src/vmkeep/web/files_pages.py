"""The file browser, ``/files?backup=ID&increment=N&disk=vda&path=/``: a folder of a restore
point, read-only and without booting it, over the engine call behind ``vmkeep files ls``
(``engine/restore/files.ls``); a disk with several file systems lists its partitions first.
Each file links to ``/files/download``, streamed by the API's own download
(``api/stream_routes.file_download``). Both hold one of the files work slots the API's files
requests take, and need the role of the ``files`` policy key (operator: a viewer sees no file
contents)."""

from __future__ import annotations

import posixpath
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response

from vmkeep.api.stream_routes import file_download, files_slot
from vmkeep.engine.core.trust import Actor
from vmkeep.engine.points import listing
from vmkeep.engine.restore import files
from vmkeep.errors import VmkeepError
from vmkeep.names import MAX_ID
from vmkeep.web.base import Web
from vmkeep.web.restore_pages import chosen_point, disks_of

# a guest's file comes from this site's origin: never sniffed as a page, never run as one (an
# .html or .svg file opened instead of saved would otherwise script the dashboard), not cached
DOWNLOAD_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "sandbox; default-src 'none'",
    "Cache-Control": "no-store",
}


def crumbs(path: str) -> list[tuple[str, str]]:
    """``/a/b`` -> [("/", "/"), ("a", "/a"), ("b", "/a/b")]: the folders on the way."""
    out = [("/", "/")]
    parts = [p for p in path.split("/") if p]
    for i, name in enumerate(parts):
        out.append((name, "/" + "/".join(parts[: i + 1])))
    return out


def routes(web: Web, app: FastAPI) -> None:
    r = web.router()

    @r.get("/files")
    async def files_page(
        request: Request,
        backup: int | None = Query(default=None, ge=1, le=MAX_ID),
        increment: int | None = Query(default=None, ge=0),
        disk: str | None = Query(default=None, max_length=64),
        partition: int | None = Query(default=None, ge=1, le=128),
        path: str = Query(default="/", max_length=4096),
        who: Actor = web.page_actor,
    ) -> Response:
        web.authorize(who, "files")
        if backup is None:  # the wizard's first step picks it
            return RedirectResponse("/restore", status_code=303)
        shown = await run_in_threadpool(listing.show_backup, web.ctx(), backup)
        point = chosen_point(shown, increment)
        path = posixpath.normpath("/" + path.lstrip("/")) if path else "/"

        def ls() -> dict[str, Any]:
            return files.ls(web.ctx(), backup, path, increment, disk, partition)

        listed: dict[str, Any] = {}
        error = None
        status = 200
        release = await files_slot(web.api)
        try:
            listed = await run_in_threadpool(ls)
        except VmkeepError as err:  # a path not in the point: said above the folder it was in
            error, status = str(err), 422 if err.http_status == 400 else err.http_status
        finally:
            release()
        where = {"backup": backup, "increment": listed.get("increment", increment),
                 "disk": listed.get("disk", disk),
                 "partition": listed.get("partition", partition)}  # fmt: skip
        where = {k: v for k, v in where.items() if v is not None}

        def link(route: str, **more: Any) -> str:
            return f"{route}?{urlencode(where | more)}"

        return web.render(
            request,
            "files.html",
            status=status,
            backup=shown,
            point=point,
            disks=disks_of(point) if point else (),
            disk=listed.get("disk", disk),
            folder=path,
            crumbs=crumbs(path),
            listed=listed,
            error=error,
            link=link,
        )

    @r.get("/files/download")
    async def files_download(
        backup: int = Query(ge=1, le=MAX_ID),
        path: str = Query(min_length=1, max_length=4096),
        increment: int | None = Query(default=None, ge=0),
        disk: str | None = Query(default=None, max_length=64),
        partition: int | None = Query(default=None, ge=1, le=128),
        who: Actor = web.page_actor,
    ) -> Response:
        web.authorize(who, "files")
        response = await file_download(web.api, backup, path, increment, disk, partition)
        response.headers.update(DOWNLOAD_HEADERS)
        return response

    app.include_router(r)
