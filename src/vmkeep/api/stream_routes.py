"""The API's long requests: a point's files (listed and downloaded, each holding a work slot),
the ``/v1/events`` stream, and a job followed to its end (``GET /v1/jobs/ID?wait=S``). None
holds a server thread while it waits; each ends when its token is revoked."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from vmkeep.api import contract, limits
from vmkeep.api.base import Api, FastJSON, jsonable
from vmkeep.api.catalog_routes import Id
from vmkeep.engine.core import jobs
from vmkeep.engine.core.trust import Actor
from vmkeep.engine.restore import files
from vmkeep.errors import Unauthorized

EVENT_POLL = 0.5  # seconds between catalog looks of /v1/events
WAIT_POLL = 0.25  # seconds between catalog looks of GET /v1/jobs/ID?wait=S
TOKEN_RECHECK = 3.0  # seconds between looks at a waiting or streaming request's token (revoked?)
FILES_WAIT = 5.0  # seconds a files request waits for a work slot before WorkersBusy (503)


async def files_slot(api: Api) -> Callable[[], None]:
    """A work slot for a files request (the API's and the dashboard's), waited for without a
    thread; its release (once). WorkersBusy (503) when none is free within FILES_WAIT s. Taken
    in the route, after its token check and its parameters' validation (a dependency's slot
    would stay taken when the validation refuses the request)."""
    deadline = time.monotonic() + FILES_WAIT
    while not api.work.acquire_files():
        if time.monotonic() >= deadline:
            raise api.work.busy()
        await asyncio.sleep(0.05)
    released = threading.Event()

    def release() -> None:
        if not released.is_set():
            released.set()
            api.work.release_files()

    return release


async def file_download(
    api: Api,
    backup_id: int,
    path: str,
    increment: int | None,
    disk: str | None,
    partition: int | None,
) -> StreamingResponse:
    """One file of a point, streamed (``files.stream``) while it holds a files slot (the API's
    and the dashboard's download)."""

    def opened() -> Iterator[bytes]:
        chunks = files.stream(api.ctx(), backup_id, path, increment, disk, partition)
        next(chunks)  # opens the point: a bad path is a 4xx before any byte is sent
        return chunks

    release = await files_slot(api)
    try:  # the slot is held until the last byte is sent (or the client is gone)
        chunks = await run_in_threadpool(opened)
    except BaseException:
        release()
        raise
    name = re.sub(r"[^A-Za-z0-9._-]", "_", path.rstrip("/").rsplit("/", 1)[-1]) or "file"
    return limits.HeldStream(
        chunks,
        release,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


class FileBytes(StreamingResponse):
    media_type = "application/octet-stream"  # the document's content type of a download


class EventStream(StreamingResponse):
    media_type = "text/event-stream"  # the document's content type of /v1/events


def routes(api: Api, r: FastAPI) -> None:
    """Add these routes to ``r``."""
    ctx, read, require = api.ctx, api.read, api.require

    # a point that cannot be read (not VALID, a chain with a gap, locked): the engine's 409,
    # which the contract's pass declares for writes only
    @r.get("/v1/backups/{backup}/files", responses=contract.errors(409))
    async def list_files(
        backup: Id,
        path: str = Query(default="/", max_length=4096),
        increment: int | None = Query(default=None, ge=0),
        disk: str | None = Query(default=None, max_length=64),
        partition: int | None = Query(default=None, ge=1, le=128),
        who: Actor = require("files"),
    ) -> Any:
        def ls() -> Any:
            return files.ls(ctx(), backup, path, increment, disk, partition)

        release = await files_slot(api)
        try:
            return FastJSON(await run_in_threadpool(ls))
        finally:
            release()

    @r.get(
        "/v1/backups/{backup}/files/content",
        response_class=FileBytes,
        responses=contract.errors(409),
    )
    async def download_file(
        backup: Id,
        path: str = Query(min_length=1, max_length=4096),
        increment: int | None = Query(default=None, ge=0),
        disk: str | None = Query(default=None, max_length=64),
        partition: int | None = Query(default=None, ge=1, le=128),
        who: Actor = require("files"),
    ) -> StreamingResponse:
        return await file_download(api, backup, path, increment, disk, partition)

    @r.get("/v1/events", response_class=EventStream, responses=contract.errors(429))
    async def events(
        request: Request,
        max_seconds: float | None = Query(default=None, gt=0, le=86400),
        who: Actor = read,
    ) -> StreamingResponse:
        """Job state/progress and VM state changes as SSE (``event: job`` / ``event: vm``), first
        the current state, then every change; ``max_seconds`` ends the stream (tests, curl), and
        so does the daemon's stop (``event: end``).
        A token holds at most ``[api] max_streams_per_token`` streams and waits at once (429
        beyond); its streams end (``event: end``) within TOKEN_RECHECK s of its revocation.
        No thread is held between the catalog looks."""
        release = api.streams.take(who, exempt=api.is_local(request.scope))

        def changes(since: Any) -> Any:
            return jobs.changes_since(ctx(), since)

        async def stream() -> AsyncIterator[str]:
            since = None
            end = None if max_seconds is None else time.monotonic() + max_seconds
            checked = time.monotonic()
            while end is None or time.monotonic() < end:
                changed_jobs, changed_vms, since = await run_in_threadpool(changes, since)
                for kind, rows in (("job", changed_jobs), ("vm", changed_vms)):
                    for row in rows:
                        yield f"event: {kind}\ndata: {json.dumps(jsonable(row))}\n\n"
                if await request.is_disconnected():
                    return
                if api.stopping.is_set():  # the daemon stops: it waits for open requests
                    yield 'event: end\ndata: {"reason": "the daemon is stopping"}\n\n'
                    return
                if time.monotonic() - checked >= TOKEN_RECHECK:
                    if not await api.token_valid(request):
                        yield 'event: end\ndata: {"reason": "token revoked"}\n\n'
                        return
                    checked = time.monotonic()
                await asyncio.sleep(EVENT_POLL)

        return limits.HeldStream(stream(), release, media_type="text/event-stream")

    @r.get("/v1/jobs/{job_id}", responses=contract.errors(429))
    async def show_job(
        request: Request,
        job_id: Id,
        wait: float = Query(default=0.0, ge=0, le=jobs.WAIT_MAX),
        who: Actor = read,
    ) -> Any:
        """``?wait=S``: answer when the job has ended, or after S seconds as it is then. A wait
        holds no thread (a catalog look every WAIT_POLL s), counts against the token's
        ``[api] max_streams_per_token`` (429 beyond) and ends (401) when the token is revoked."""

        def look() -> dict[str, Any]:
            return jobs.get(ctx(), job_id)

        if not wait:
            return FastJSON(await run_in_threadpool(look))
        with api.streams.holding(who, exempt=api.is_local(request.scope)):
            deadline = checked = time.monotonic()
            deadline += wait
            while True:
                job = await run_in_threadpool(look)
                now = time.monotonic()
                if job["state"] in jobs.FINAL or now >= deadline:
                    return FastJSON(job)
                if await request.is_disconnected() or api.stopping.is_set():
                    return FastJSON(job)  # as it is now (its slot is free at once)
                if now - checked >= TOKEN_RECHECK:
                    if not await api.token_valid(request):
                        raise Unauthorized("the token was revoked")
                    checked = now
                await asyncio.sleep(min(WAIT_POLL, deadline - now))
