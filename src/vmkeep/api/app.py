"""The REST API under /v1 (FastAPI): a thin adapter over engine/.

Reads answer at once; long actions are enqueued as jobs and answer 202 with the job and a
``Location: /v1/jobs/{id}`` header. The state rules are the engine's: before enqueueing, the API
asks ``inventory.check_action`` (the same table ``vm_action`` enforces), so a wrong state is a 409 now,
not a failed job later. Errors carry the error tree's HTTP status and a body
``{"error": {"code", "message"}}``; bad input is a 422, never a 500.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from vmkeep import __version__, jsontext
from vmkeep.api import limits
from vmkeep.api.audit import AuditLog
from vmkeep.config import Config
from vmkeep.engine.core import jobs, stores, trust
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.trust import LOCAL_ADMIN, ROLE_KEY, Actor
from vmkeep.engine.groups import manage
from vmkeep.engine.lifecycle import dispatch
from vmkeep.engine.points import delete, listing, scan
from vmkeep.engine.restore import files
from vmkeep.engine.service import audit, tokens
from vmkeep.engine.service.metrics import CatalogCollector
from vmkeep.engine.service.workers import WorkSlots
from vmkeep.engine.vm import inventory
from vmkeep.errors import Unauthorized, VmkeepError
from vmkeep.paths import daemon_key

# catalog ids are 64-bit integers: a larger one is bad input (422), not a database error
Id = Annotated[int, PathParam(ge=1, le=2**63 - 1)]
EVENT_POLL = 0.5  # seconds between catalog looks of /v1/events
WAIT_POLL = 0.25  # seconds between catalog looks of GET /v1/jobs/ID?wait=S
TOKEN_RECHECK = 3.0  # seconds between looks at a waiting or streaming request's token (revoked?)
FILES_WAIT = 5.0  # seconds a files request waits for a work slot before WorkersBusy (503)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackupRequest(_Body):
    datastore: str = Field(min_length=1, max_length=255)
    reset: bool = False


class GroupBackupRequest(BackupRequest):
    parallel_freeze: bool = False


class RestoreRequest(_Body):
    increment: int | None = Field(default=None, ge=0)
    disk: str | None = Field(default=None, max_length=64)
    name: str | None = Field(default=None, max_length=255)
    path: str | None = Field(default=None, max_length=4096)
    no_nic: bool = False
    no_ip: bool = False
    start: bool = False
    force: bool = False
    in_place: bool = False
    instant: bool = False
    copy_bwlimit: int = Field(default=0, ge=0, le=1 << 20)
    without_memory: bool = False


class DatastoreRequest(_Body):
    name: str = Field(max_length=255)
    driver: str = Field(default="dir", max_length=32)
    options: dict[str, Any] = {}


class DrillRequest(_Body):
    increment: int | None = Field(default=None, ge=0)
    probe: str | None = Field(default=None, min_length=1, max_length=4096)
    timeout: float = Field(default=300.0, ge=1, le=86400)


class CreateVmRequest(_Body):
    xml: str = Field(min_length=1, max_length=1 << 20)
    hold: bool = False


class ActionRequest(_Body):
    """Options of a lifecycle action (each action reads the ones it knows)."""

    hard: bool | None = None
    keep_disks: bool | None = None
    snapshot: int | None = Field(default=None, ge=1, le=2**31 - 1)
    disk: str | None = Field(default=None, max_length=64)
    target: str | None = Field(default=None, max_length=64)
    source: str | None = Field(default=None, max_length=4096)
    size: str | None = Field(default=None, max_length=32)
    format: str | None = Field(default=None, max_length=16)
    bridge: str | None = Field(default=None, max_length=64)
    mac: str | None = Field(default=None, max_length=17)
    model: str | None = Field(default=None, max_length=32)
    vcpus: int | None = Field(default=None, ge=1, le=512)
    memory: int | None = Field(default=None, ge=16, le=1 << 24)
    how: str | None = Field(default=None, pattern="^(success|failure|retry|delete)$")


class CopyRequest(_Body):
    to: str = Field(min_length=1, max_length=255)


class ScanRequest(_Body):
    import_: bool = Field(default=False, alias="import")


class GroupRequest(_Body):
    name: str = Field(max_length=255)
    vms: list[str] = Field(min_length=1)
    stop_order: list[str] | None = None


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def create_app(
    config: Config, local_socket: Path | None = None, slots: WorkSlots | None = None
) -> FastAPI:
    """The app; one engine Context per server thread (a libvirt connection is per thread).
    Every route but /healthz needs a bearer token whose role the action's policy allows, except
    on the daemon's ``local_socket``: only the daemon's user can connect to it, and that user
    could open the catalog itself (as the CLI does without a daemon). A request there names the
    catalog and libvirt URI it means (``X-Vmkeep-Catalog``: ``paths.daemon_key``); a request
    meaning others gets 421, and the CLI reads them itself.

    ``slots``: the daemon's work slots (``[jobs] workers``), which its workers share with the
    files requests; the app makes its own when none is given. Limits: ``api/limits.py``; every
    mutating request and failed login is audited (``engine/audit.py``)."""
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
    async def http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        codes = {404: "NotFound", 405: "MethodNotAllowed", 413: "RequestTooLarge"}
        return _error(err.status_code, codes.get(err.status_code, "HTTPError"), str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_input(_request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, "InvalidValue", f"{where}: {first.get('msg')}")

    local_server = (str(local_socket), None)  # uvicorn's scope["server"] on that socket
    own_key = daemon_key(config.catalog_url, config.libvirt.uri)

    def is_local(scope: Any) -> bool:
        return local_socket is not None and scope.get("server") == local_server

    def require(action: str) -> Any:
        def check(request: Request, authorization: str | None = Header(default=None)) -> Actor:
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

    read = require("read")

    async def body_actor(scope: Any) -> Actor:
        """The token check of a request with a body, before it is read (``limits.BodyLimit``)."""
        if is_local(scope):
            return LOCAL_ADMIN
        header = Request(scope).headers.get("authorization")
        return Actor(*await run_in_threadpool(lambda: tokens.authenticate(ctx(), header)))

    async def token_valid(request: Request) -> bool:
        """Whether a long request's token is still there (not revoked)."""
        if is_local(request.scope):
            return True
        header = request.headers.get("authorization")
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

    def accepted(job: dict[str, Any]) -> JSONResponse:
        return JSONResponse(
            {"job": jsonable(job)}, status_code=202, headers={"Location": f"/v1/jobs/{job['id']}"}
        )

    def enqueue(kind: str, target: str, params: dict[str, Any], who: Actor) -> JSONResponse:
        # the runner applies the actor's places (engine/trust.py) again when the job runs
        params = {**params, ROLE_KEY: who.role, "actor": who.name}
        cap = None if who is LOCAL_ADMIN else config.api.max_queued_per_token
        return accepted(jobs.enqueue(ctx(), kind, target, params, "api", who.name, cap))

    # --- health --------------------------------------------------------------------------------
    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True, "version": __version__}

    # --- VMs -----------------------------------------------------------------------------------
    @app.get("/v1/vms")
    def list_vms(who: Actor = read) -> Any:
        return FastJSON(inventory.list_vms(ctx()))

    @app.get("/v1/vms/{vm}")
    def show_vm(vm: str, who: Actor = read) -> Any:
        return FastJSON(inventory.show_vm(ctx(), vm))

    @app.post("/v1/vms/{vm}/backup", status_code=202)
    def backup_vm(vm: str, body: BackupRequest, who: Actor = require("backup")) -> JSONResponse:
        c = ctx()
        name = inventory.check_action(c, vm, "backup")
        stores.check_exists(c, body.datastore)  # 404 now, not a failed job later
        return enqueue("backup", name, {"vm": name, **body.model_dump()}, who)

    def quiesce_route(action: str) -> Callable[[str], JSONResponse]:
        def route(vm: str, who: Actor = require(action)) -> JSONResponse:
            name = inventory.check_action(ctx(), vm, action)
            return enqueue(action, name, {"vm": name}, who)

        return route

    app.post("/v1/vms/{vm}/quiesce", status_code=202, name="quiesce")(quiesce_route("quiesce"))
    app.post("/v1/vms/{vm}/unquiesce", status_code=202, name="unquiesce")(
        quiesce_route("unquiesce")
    )

    @app.post("/v1/vms", status_code=201)
    def create_vm(body: CreateVmRequest, who: Actor = require("vm-create")) -> Any:
        return jsonable(
            dispatch.create(ctx(), body.xml, hold=body.hold, origin="api", who=who.name)
        )

    def vm_action_route(vm: str, action: str, body: dict[str, Any], who: Actor) -> JSONResponse:
        # 404 / 409 / refused now, not a failed job later (run_action checks again, locked)
        dispatch.check_places(ctx(), action, body, who)
        checked = dispatch.check_allowed(ctx(), vm, action, state=action != "recover")
        name = checked.name if action != "recover" else vm
        return enqueue("vm-action", name, {"vm": name, "action": action, "opts": body}, who)

    for action in dispatch.LIFECYCLE_ACTIONS:
        if action == "create":
            continue
        role = {"recover": "vm-recover", "terminate": "vm-terminate"}.get(action, "vm-action")

        def route(
            vm: str,
            body: ActionRequest | None = None,
            who: Actor = require(role),
            action: str = action,  # bound per route
        ) -> JSONResponse:
            opts = (body or ActionRequest()).model_dump(exclude_none=True)
            return vm_action_route(vm, action, opts, who)

        app.post(f"/v1/vms/{{vm}}/actions/{action}", status_code=202, name=f"vm-{action}")(route)

    @app.get("/v1/vms/{vm}/history")
    def vm_history(vm: str, who: Actor = read) -> Any:
        return jsonable(dispatch.history(ctx(), vm))

    @app.get("/v1/vms/{vm}/snapshots")
    def vm_snapshots(vm: str, who: Actor = read) -> Any:
        return jsonable(dispatch.snapshots(ctx(), vm))

    @app.post("/v1/vms/{vm}/reset-state")
    def reset_state(vm: str, who: Actor = require("reset-state")) -> Any:
        return jsonable(inventory.reset_state(ctx(), vm))

    # --- backups -------------------------------------------------------------------------------
    @app.get("/v1/backups")
    def list_backups(vm: str | None = None, who: Actor = read) -> Any:
        return FastJSON(listing.list_backups(ctx(), vm))

    @app.get("/v1/backups/{backup_id}")
    def show_backup(backup_id: Id, who: Actor = read) -> Any:
        return FastJSON(listing.show_with_sizes(ctx(), backup_id))

    @app.post("/v1/backups/{backup_id}/restore", status_code=202)
    def restore_backup(
        backup_id: Id, body: RestoreRequest, who: Actor = require("restore")
    ) -> JSONResponse:
        if body.path is not None:  # outside the actor's places: a 403 now (the job checks again)
            dest = Path(body.path)
            trust.check_restore_destination(config, who, dest, body.force and dest.is_file())
        shown = listing.show_backup(ctx(), backup_id)
        if body.in_place:  # a VM that is not powered off is a 409 now, not a failed job later
            inventory.check_action(ctx(), str(shown["vm_id"]), "restore in place")
        return enqueue(
            "restore",
            str(backup_id),
            {"backup": backup_id, **body.model_dump(exclude_none=True)},
            who,
        )

    @app.post("/v1/backups/{backup_id}/verify", status_code=202)
    def verify_backup(backup_id: Id, who: Actor = require("verify")) -> JSONResponse:
        listing.show_backup(ctx(), backup_id)
        return enqueue("verify", str(backup_id), {"backup": backup_id}, who)

    @app.post("/v1/backups/{backup_id}/drill", status_code=202)
    def drill_backup(
        backup_id: Id, body: DrillRequest | None = None, who: Actor = require("drill")
    ) -> JSONResponse:
        listing.show_backup(ctx(), backup_id)
        params = {"backup": backup_id, **(body or DrillRequest()).model_dump(exclude_none=True)}
        return enqueue("drill", str(backup_id), params, who)

    async def work_slot() -> Callable[[], None]:
        """A work slot for a files request, waited for without a thread; its release (once).
        WorkersBusy (503) when none is free within FILES_WAIT s. Taken in the route, after its
        token check and its parameters' validation (a dependency's slot would stay taken when
        the validation refuses the request)."""
        deadline = time.monotonic() + FILES_WAIT
        while not work.acquire_files():
            if time.monotonic() >= deadline:
                raise work.busy()
            await asyncio.sleep(0.05)
        released = threading.Event()

        def release() -> None:
            if not released.is_set():
                released.set()
                work.release_files()

        return release

    @app.get("/v1/backups/{backup_id}/files")
    async def list_files(
        backup_id: Id,
        path: str = Query(default="/", max_length=4096),
        increment: int | None = Query(default=None, ge=0),
        disk: str | None = Query(default=None, max_length=64),
        partition: int | None = Query(default=None, ge=1, le=128),
        who: Actor = require("files"),
    ) -> Any:
        def ls() -> Any:
            return files.ls(ctx(), backup_id, path, increment, disk, partition)

        release = await work_slot()
        try:
            return FastJSON(await run_in_threadpool(ls))
        finally:
            release()

    @app.get("/v1/backups/{backup_id}/files/content")
    async def download_file(
        backup_id: Id,
        path: str = Query(min_length=1, max_length=4096),
        increment: int | None = Query(default=None, ge=0),
        disk: str | None = Query(default=None, max_length=64),
        partition: int | None = Query(default=None, ge=1, le=128),
        who: Actor = require("files"),
    ) -> StreamingResponse:
        def opened() -> Iterator[bytes]:
            chunks = files.stream(ctx(), backup_id, path, increment, disk, partition)
            next(chunks)  # opens the point: a bad path is a 4xx before any byte is sent
            return chunks

        release = await work_slot()
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

    @app.post("/v1/backups/{backup_id}/copy", status_code=202)
    def copy_backup(backup_id: Id, body: CopyRequest, who: Actor = require("copy")) -> JSONResponse:
        listing.show_backup(ctx(), backup_id)
        stores.check_exists(ctx(), body.to)
        return enqueue("copy", str(backup_id), {"backup": backup_id, "to": body.to}, who)

    @app.delete("/v1/backups/{backup_id}")
    def delete_backup(
        backup_id: Id, increment: int | None = None, who: Actor = require("backup-delete")
    ) -> Any:
        return jsonable(delete.delete_backup(ctx(), backup_id, increment))

    # --- datastores and groups -----------------------------------------------------------------
    @app.get("/v1/datastores")
    def list_datastores(who: Actor = read) -> Any:
        return FastJSON(stores.list_all(ctx()))

    @app.post("/v1/datastores", status_code=201)
    def add_datastore(body: DatastoreRequest, who: Actor = require("datastore-add")) -> Any:
        return jsonable(stores.add(ctx(), body.name, body.driver, body.options))

    @app.delete("/v1/datastores/{ds}")
    def remove_datastore(
        ds: str, force: bool = False, who: Actor = require("datastore-remove")
    ) -> Any:
        return jsonable(delete.remove_datastore(ctx(), ds, force))

    @app.post("/v1/datastores/{ds}/scan")
    def scan_datastore(ds: str, body: ScanRequest, who: Actor = require("datastore-scan")) -> Any:
        return jsonable(scan.scan(ctx(), ds, body.import_))

    @app.get("/v1/groups")
    def list_groups(who: Actor = read) -> Any:
        return FastJSON(manage.list_groups(ctx()))

    @app.post("/v1/groups", status_code=201)
    def create_group(body: GroupRequest, who: Actor = require("group-create")) -> Any:
        return jsonable(manage.create_group(ctx(), body.name, body.vms, body.stop_order))

    @app.post("/v1/groups/{group}/backup", status_code=202)
    def backup_group(
        group: str, body: GroupBackupRequest, who: Actor = require("group-backup")
    ) -> JSONResponse:
        name = manage.show_group(ctx(), group)["name"]
        stores.check_exists(ctx(), body.datastore)
        return enqueue("group-backup", name, {"group": name, **body.model_dump()}, who)

    # --- events (Server-Sent Events) -----------------------------------------------------------
    @app.get("/v1/events")
    async def events(
        request: Request, max_seconds: float | None = None, who: Actor = read
    ) -> StreamingResponse:
        """Job state/progress and VM state changes as SSE (``event: job`` / ``event: vm``), first
        the current state, then every change; ``max_seconds`` ends the stream (tests, curl).
        A token holds at most ``[api] max_streams_per_token`` streams and waits at once (429
        beyond); its streams end (``event: end``) within TOKEN_RECHECK s of its revocation.
        No thread is held between the catalog looks."""
        release = streams.take(who, exempt=is_local(request.scope))

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
                if time.monotonic() - checked >= TOKEN_RECHECK:
                    if not await token_valid(request):
                        yield 'event: end\ndata: {"reason": "token revoked"}\n\n'
                        return
                    checked = time.monotonic()
                await asyncio.sleep(EVENT_POLL)

        return limits.HeldStream(stream(), release, media_type="text/event-stream")

    # --- metrics -------------------------------------------------------------------------------
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CatalogCollector(ctx))

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics(who: Actor = read) -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # --- jobs ----------------------------------------------------------------------------------
    @app.get("/v1/jobs")
    def list_jobs(state: str | None = None, who: Actor = read) -> Any:
        return FastJSON(jobs.list_jobs(ctx(), state))

    @app.get("/v1/jobs/{job_id}")
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
        with streams.holding(who, exempt=is_local(request.scope)):
            deadline = checked = time.monotonic()
            deadline += wait
            while True:
                job = await run_in_threadpool(look)
                now = time.monotonic()
                if job["state"] in jobs.FINAL or now >= deadline:
                    return FastJSON(job)
                if await request.is_disconnected():  # its slot is free at once
                    return FastJSON(job)
                if now - checked >= TOKEN_RECHECK:
                    if not await token_valid(request):
                        raise Unauthorized("the token was revoked")
                    checked = now
                await asyncio.sleep(min(WAIT_POLL, deadline - now))

    @app.delete("/v1/jobs/{job_id}")
    def cancel_job(job_id: Id, who: Actor = require("cancel-job")) -> Any:
        return jsonable(jobs.cancel(ctx(), job_id))

    # --- audit ---------------------------------------------------------------------------------
    @app.get("/v1/audit")
    def list_audit(
        limit: int = Query(default=100, ge=1, le=100000), who: Actor = require("audit")
    ) -> Any:
        """Who did what, newest first: every mutating request and every failed login."""
        return FastJSON(audit.list_entries(ctx(), limit))

    return app


class FastJSON(JSONResponse):
    """Reads answer straight from the engine's plain dicts (FastAPI's ``jsonable_encoder``
    walked every value of a 1,000-VM list twice), in the CLI's JSON (``jsontext``)."""

    def render(self, content: Any) -> bytes:
        return jsontext.dumps(content)


def jsonable(data: Any) -> Any:
    from fastapi.encoders import jsonable_encoder

    return jsonable_encoder(data)
