"""The API's backup policy routes: pools (list, show, create, change, delete) and a VM's own
keys and pool (``PATCH /v1/vms/{vm}/config``). Each answers at once from one engine call
(``engine/vm/policy.py``, ``engine/vm/inventory.py: configure``); docs/policies.md."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI
from pydantic import Field

from vmkeep.api.base import Api, FastJSON, jsonable
from vmkeep.engine.core.trust import Actor
from vmkeep.engine.service.params import Name, Params
from vmkeep.engine.vm import inventory, policy

# a policy value as JSON carries it: a number, yes/no as a boolean, or text ("unset" removes)
Value = int | bool | Annotated[str, Field(max_length=64)] | None
# exclude_disks: a list of disk targets, or one text ("vdb,vdc", "none", "unset")
DiskList = (
    Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=64)]
    | Annotated[str, Field(max_length=2048)]
    | None
)


class PolicyKeys(Params):
    """Backup policy keys; a key left out is not changed, ``"unset"`` removes it (inherited
    again), ``keep_last: null`` (or any ``keep_*``) sets no such rule; no rule set keeps every
    restore point."""

    keep_last: Value = None
    keep_hourly: Value = None
    keep_daily: Value = None
    keep_weekly: Value = None
    keep_monthly: Value = None
    keep_yearly: Value = None
    mode: Value = None
    fs_freeze: Value = None
    backup_volatile: Value = None
    memory: Value = None
    exclude: Value = None
    exclude_disks: DiskList = None

    def changes(self) -> dict[str, Any]:
        return self.model_dump(include=self.model_fields_set - {"pool"})


class PoolRequest(Params):
    name: Name
    config: PolicyKeys = PolicyKeys()


class PoolChange(Params):
    config: PolicyKeys


class VmConfigRequest(PolicyKeys):
    """A VM's keys, and ``pool``: a pool's name puts it there, ``null`` takes it out."""

    pool: Name | None = None


def routes(api: Api, r: FastAPI) -> None:
    """Add these routes to ``r``."""
    ctx, read, require = api.ctx, api.read, api.require

    @r.get("/v1/pools")
    def list_pools(who: Actor = read) -> Any:
        return FastJSON(policy.list_pools(ctx()))

    @r.get("/v1/pools/{pool}")
    def show_pool(pool: str, who: Actor = read) -> Any:
        return FastJSON(policy.show_pool(ctx(), pool))

    @r.post("/v1/pools", status_code=201)
    def create_pool(body: PoolRequest, who: Actor = require("pool-edit")) -> Any:
        return jsonable(policy.create_pool(ctx(), body.name, body.config.changes()))

    @r.patch("/v1/pools/{pool}")
    def change_pool(pool: str, body: PoolChange, who: Actor = require("pool-edit")) -> Any:
        """Set or (with ``"unset"``) remove backup keys of a pool; its VMs inherit them."""
        return jsonable(policy.set_pool(ctx(), pool, body.config.changes()))

    @r.delete("/v1/pools/{pool}")
    def delete_pool(pool: str, who: Actor = require("pool-edit")) -> Any:
        """Delete a pool no VM and no backup job uses (409 names them otherwise)."""
        return jsonable(policy.delete_pool(ctx(), pool))

    @r.patch("/v1/vms/{vm}/config")
    def configure_vm(vm: str, body: VmConfigRequest, who: Actor = require("vm-config")) -> Any:
        """Set a VM's backup keys and its pool; answers the VM with its effective config."""
        changes = body.changes()
        if "pool" in body.model_fields_set:
            changes["pool"] = body.pool
        return jsonable(inventory.configure(ctx(), vm, changes))
