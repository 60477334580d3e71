"""The API's host routes (``engine/hosts/records.py``; docs/hosts.md): list and show (read),
add, enable, disable and remove (``host-edit``, admin)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import FastAPI
from pydantic import Field

from vmkeep.api.base import Api, FastJSON, jsonable
from vmkeep.engine.core.trust import Actor
from vmkeep.engine.hosts import records
from vmkeep.engine.service.params import NewName, Params


class HostRequest(Params):
    name: NewName
    uri: Annotated[str, Field(max_length=255, pattern=f"^{records.URI_PATTERN}$")]
    vmm: Literal["native", "exec"] = "native"
    vmm_dir: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    vmm_args: Annotated[str, Field(max_length=255)] = ""
    max_backups: Annotated[int, Field(ge=1, le=1000)] | None = None


class DisableRequest(Params):
    offline: bool = False


def routes(api: Api, r: FastAPI) -> None:
    """Add these routes to ``r``."""
    ctx, read, require = api.ctx, api.read, api.require

    @r.get("/v1/hosts")
    def list_hosts(who: Actor = read) -> Any:
        """Every host: state, its VMs, the last monitoring's figures, its daemon (alive, silent
        or none)."""
        return FastJSON(records.list_hosts(ctx()))

    @r.get("/v1/hosts/{host}")
    def show_host(host: str, who: Actor = read) -> Any:
        return FastJSON(records.show(ctx(), host))

    @r.post("/v1/hosts", status_code=201)
    def add_host(body: HostRequest, who: Actor = require("host-edit")) -> Any:
        """Add a host (INIT until its daemon monitors it)."""
        return jsonable(
            records.add(
                ctx(), body.name, body.uri, body.vmm, body.vmm_dir, body.vmm_args, body.max_backups
            )  # fmt: skip
        )

    @r.post("/v1/hosts/{host}/enable")
    def enable_host(host: str, who: Actor = require("host-edit")) -> Any:
        return jsonable(records.enable(ctx(), host))

    @r.post("/v1/hosts/{host}/disable")
    def disable_host(
        host: str, body: DisableRequest | None = None, who: Actor = require("host-edit")
    ) -> Any:
        """DISABLED (nothing new placed on it), or with ``offline`` OFFLINE (not monitored)."""
        return jsonable(records.disable(ctx(), host, offline=bool(body and body.offline)))

    @r.delete("/v1/hosts/{host}")
    def remove_host(host: str, who: Actor = require("host-edit")) -> Any:
        """Forget a host (409 while VMs live on it or jobs wait for it)."""
        return jsonable(records.remove(ctx(), host))
