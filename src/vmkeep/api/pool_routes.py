"""The API's backup policy routes: pools (list, show, create, change, delete) and a VM's own
keys and pool (``PATCH /v1/vms/{vm}/config``). Each answers at once from one engine call
(``engine/vm/policy.py``, ``engine/vm/inventory.py: configure``); docs/policies.md."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import FastAPI
from pydantic import AfterValidator, Field, StrictBool, WithJsonSchema

from vmkeep.api.base import Api, FastJSON, jsonable
from vmkeep.engine.core.backup_config import MAX_DISKS, MAX_KEEP, NO_WORDS, YES_WORDS
from vmkeep.engine.core.trust import Actor
from vmkeep.engine.service.params import Name, NewName, Params
from vmkeep.engine.vm import inventory, policy
from vmkeep.model import BackupMode, FsFreeze
from vmkeep.names import DISK_PATTERN

# each policy key's values as backup_config.validate takes them ("unset" removes the key, so
# that it is inherited again; a key left out is not changed)
Keep = Annotated[int, Field(ge=1, le=MAX_KEEP)] | Literal["all", "none", "unset"] | None
YES_NO = (*YES_WORDS, *NO_WORDS, "unset")  # the engine's words, as the schema shows them


def _yes_no_word(value: str) -> str:
    if value not in YES_NO:
        raise ValueError(f"use true, false or one of {', '.join(YES_NO)}")
    return value


YesNo = (
    StrictBool
    | Annotated[
        str, AfterValidator(_yes_no_word), WithJsonSchema({"type": "string", "enum": list(YES_NO)})
    ]
)
MODES = [*(m.lower() for m in BackupMode), "incremental", "inc", "unset"]
FREEZES = [*(f.lower() for f in FsFreeze), "unset"]
# mode and fs_freeze: any case, checked by the engine, which says what is allowed in words
Mode = Annotated[str, Field(max_length=16, json_schema_extra={"enum": MODES})]
Freeze = Annotated[str | None, WithJsonSchema({"enum": [*FREEZES, None]})]
UNCHANGED: Any = None  # the default of a key whose type has no null: not given, not changed
Disk = Annotated[str, Field(pattern=f"^{DISK_PATTERN}$")]
# exclude_disks: a list of disk targets, or one text of them ("vdb,vdc"), "none" or "unset"
DISKS_TEXT = f"^(?:none|unset|{DISK_PATTERN}(?:,{DISK_PATTERN})*)$"
DiskList = (
    Annotated[list[Disk], Field(max_length=MAX_DISKS)]
    | Annotated[str, Field(pattern=DISKS_TEXT)]
    | None
)


class PolicyKeys(Params):
    """Backup policy keys; a key left out is not changed, ``"unset"`` removes it (inherited
    again), ``keep_last: null`` (or any ``keep_*``) sets no such rule; no rule set keeps every
    restore point."""

    keep_last: Keep = None
    keep_hourly: Keep = None
    keep_daily: Keep = None
    keep_weekly: Keep = None
    keep_monthly: Keep = None
    keep_yearly: Keep = None
    mode: Mode = UNCHANGED
    fs_freeze: Freeze = None
    backup_volatile: YesNo = UNCHANGED
    memory: YesNo = UNCHANGED
    exclude: YesNo = UNCHANGED
    exclude_disks: DiskList = None

    def changes(self) -> dict[str, Any]:
        return self.model_dump(include=self.model_fields_set - {"pool"})


def _no_unset(schema: dict[str, Any]) -> dict[str, Any]:
    """A key's schema without "unset" (a backup's own policy has no layer to inherit)."""
    if "enum" in schema:
        return {**schema, "enum": [v for v in schema["enum"] if v != "unset"]}
    if "const" in schema and schema["const"] == "unset":
        return {"not": {}}
    if "pattern" in schema:
        return {**schema, "pattern": schema["pattern"].replace("|unset", "")}
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return {**schema, key: [_no_unset(s) for s in schema[key]]}
    return schema


def policy_schema() -> dict[str, Any]:
    """The JSON Schema of a backup's (or an action's) ``policy``: the keys above, no "unset"."""
    props = PolicyKeys.model_json_schema()["properties"]
    keys = {k: _no_unset({n: v for n, v in p.items() if n != "default"}) for k, p in props.items()}
    disks = keys["exclude_disks"]  # a policy's values are no lists (params.Policy): text only
    disks["anyOf"] = [s for s in disks["anyOf"] if s.get("type") != "array"]
    return {"type": "object", "properties": keys, "additionalProperties": False}


class PoolRequest(Params):
    name: NewName
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
