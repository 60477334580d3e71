"""Backup policies: pools of VMs that share one, and the one rule for a VM's effective policy.

``effective`` layers, most specific first: a backup job's options (``"backupjob"``), the VM's own
keys (``"vm"``), its pool's (``"pool NAME"``), ``[backup]`` of the config file (``"config"``),
then the defaults (``"default"``); it says which layer set each key. ``Policies`` gives the same
answer for many VMs (``vm list``) from one read of the pools table, resolving each distinct
combination of layers once.

A key is removed from a VM or a pool with the value ``unset`` (``backup_config.UNSET``): it is
inherited again. A pool used by a VM or named by a backup job's selector cannot be deleted.
docs/policies.md is the operator's page.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.orm import Session

from vmkeep import jsontext
from vmkeep.catalog.tables import BackupJob, Pool, Vm
from vmkeep.engine.core.backup_config import BackupConfig, changed, resolve_named
from vmkeep.engine.core.context import Context
from vmkeep.errors import AlreadyExists, InvalidValue, PoolNotFound, Refused
from vmkeep.names import check_name, is_id

Layers = list[tuple[str, dict[str, Any] | None]]
# the layer names ``effective`` gives (a pool's is ``pool NAME``)
BACKUPJOB, VM, CONFIG = "backupjob", "vm", "config"


def layers(
    vm_config: dict[str, Any] | None,
    pool: str | None,
    pool_config: dict[str, Any] | None,
    config_layer: dict[str, Any] | None,
    overrides: dict[str, Any] | None = None,
) -> Layers:
    """The named layers of a VM's policy, most specific first (``resolve_named``'s input)."""
    out: Layers = [(BACKUPJOB, overrides)] if overrides else []
    out.append((VM, vm_config))
    if pool is not None:
        out.append((f"pool {pool}", pool_config))
    out.append((CONFIG, config_layer))
    return out


def effective(
    ctx: Context, vm: Vm, overrides: dict[str, Any] | None = None
) -> tuple[BackupConfig, dict[str, str]]:
    """The VM's effective backup policy and, per key, the layer that set it: ``overrides``
    (a backup job's options) -> the VM -> its pool -> ``[backup]`` -> the defaults. ``vm`` is a
    VM row (attached or detached). A pool that no longer exists adds no layer."""
    pool_config = None
    if vm.pool is not None:
        with ctx.catalog.session() as s:
            pool_config = s.execute(
                select(Pool.backup_config).where(Pool.name == vm.pool)
            ).scalar_one_or_none()
    return resolve_named(
        layers(vm.backup_config, vm.pool, pool_config, ctx.config.backup.layer(), overrides)
    )


def check_overrides(overrides: dict[str, Any] | None) -> dict[str, Any] | None:
    """A backup job's options as ``effective`` takes them, each validated (``InvalidValue``
    naming the key and ``backupjob``): a backup refuses bad ones before it locks anything."""
    if not overrides:
        return None
    resolve_named([(BACKUPJOB, overrides)])
    return dict(overrides)


def _key(layer: dict[str, Any] | None) -> bytes:
    return orjson.dumps(layer or {}, option=orjson.OPT_SORT_KEYS)


@functools.lru_cache(maxsize=256)
def _resolved(
    vm_json: bytes, pool: str | None, pool_json: bytes | None, config_json: bytes
) -> tuple[bytes, bytes]:
    pool_config = None if pool_json is None else jsontext.loads(pool_json)
    cfg, sources = resolve_named(
        layers(jsontext.loads(vm_json), pool, pool_config, jsontext.loads(config_json))
    )
    return jsontext.dumps(cfg.as_dict()), jsontext.dumps(sources)


class Policies:
    """Effective policies (as ``effective`` gives them, in JSON values) of many VMs, from one
    read of the pools table. Most VMs share their layers: each combination is resolved once
    and copied per VM (1,000 VMs in ``vm list``)."""

    def __init__(self, ctx: Context, s: Session) -> None:
        rows = s.execute(select(Pool.name, Pool.backup_config)).all()
        self._pools = {name: _key(cfg) for name, cfg in rows}
        self._config = _key(ctx.config.backup.layer())

    def _of(self, vm_config: dict[str, Any] | None, pool: str | None) -> tuple[bytes, bytes]:
        pool_json = None if pool is None else self._pools.get(pool)
        return _resolved(_key(vm_config), pool, pool_json, self._config)

    def config(self, vm_config: dict[str, Any] | None, pool: str | None) -> dict[str, Any]:
        """The effective config of a VM with these keys in this pool."""
        out: dict[str, Any] = jsontext.loads(self._of(vm_config, pool)[0])
        return out

    def of(
        self, vm_config: dict[str, Any] | None, pool: str | None
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """The effective config and its sources."""
        cfg, sources = self._of(vm_config, pool)
        return jsontext.loads(cfg), jsontext.loads(sources)


# --- pools ---------------------------------------------------------------------------------------
def find_pool(s: Session, ref: str) -> Pool:
    """A pool by name or numeric id."""
    query = select(Pool).where(Pool.id == int(ref) if is_id(ref) else Pool.name == ref)
    pool = s.execute(query).scalar_one_or_none()
    if pool is None:
        raise PoolNotFound(ref)
    return pool


def pool_for_vm(s: Session, value: Any) -> str:
    """The pool a VM is put in (``vm config --pool``): it must exist."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidValue(
            "pool", value, "name a pool (see 'vmkeep pool list'), or use --no-pool to leave it"
        )
    return find_pool(s, value).name


def _names_pool(selector: dict[str, Any] | None, name: str) -> bool:
    value = (selector or {}).get("pool")
    return value == name or (isinstance(value, list) and name in value)


def _users(s: Session, name: str) -> tuple[list[str], list[str]]:
    """The VMs in pool ``name`` and the backup jobs whose selector names it."""
    vms = list(s.execute(select(Vm.name).where(Vm.pool == name).order_by(Vm.name)).scalars())
    jobs = [
        job
        for job, selector in s.execute(
            select(BackupJob.name, BackupJob.selector).order_by(BackupJob.name)
        )
        if _names_pool(selector, name)
    ]
    return vms, jobs


def _pool_effective(
    ctx: Context, name: str, own: dict[str, Any]
) -> tuple[BackupConfig, dict[str, str]]:
    return resolve_named([(f"pool {name}", own), (CONFIG, ctx.config.backup.layer())])


def _pool_dict(ctx: Context, pool: Pool, vms: list[str], jobs: list[str]) -> dict[str, Any]:
    cfg, sources = _pool_effective(ctx, pool.name, pool.backup_config)
    return {
        "id": pool.id,
        "name": pool.name,
        "backup_config": dict(pool.backup_config or {}),
        "effective": cfg.as_dict(),
        "sources": sources,
        "vms": vms,
        "backup_jobs": jobs,
        "created_at": pool.created_at,
    }


def create_pool(ctx: Context, name: str, changes: dict[str, Any]) -> dict[str, Any]:
    """A new pool with these backup keys (validated; errors name the bad value)."""
    check_name("pool name", name)
    own = changed({}, changes)
    with ctx.catalog.session() as s:
        if s.execute(select(Pool.id).where(Pool.name == name)).first():
            raise AlreadyExists(f"pool {name!r} (change its keys with 'vmkeep pool set {name}')")
        pool = Pool(name=name, backup_config=own)
        s.add(pool)
        s.flush()
        return _pool_dict(ctx, pool, [], [])


def set_pool(ctx: Context, ref: str, changes: dict[str, Any]) -> dict[str, Any]:
    """Set (or, with ``unset``, remove) backup keys of a pool; its VMs inherit them."""
    with ctx.catalog.session() as s:
        pool = find_pool(s, ref)
        pool.backup_config = changed(pool.backup_config, changes)
        s.flush()
        return _pool_dict(ctx, pool, *_users(s, pool.name))


def show_pool(ctx: Context, ref: str) -> dict[str, Any]:
    """A pool: its own keys, its effective config over ``[backup]`` with their sources, its VMs
    and the backup jobs whose selector names it."""
    with ctx.catalog.session() as s:
        pool = find_pool(s, ref)
        return _pool_dict(ctx, pool, *_users(s, pool.name))


def list_pools(ctx: Context) -> list[dict[str, Any]]:
    """Every pool as ``show_pool`` shows it (three queries, however many pools)."""
    with ctx.catalog.session() as s:
        pools = list(s.execute(select(Pool).order_by(Pool.name)).scalars())
        vms: dict[str, list[str]] = {p.name: [] for p in pools}
        for vm, pool in s.execute(
            select(Vm.name, Vm.pool).where(Vm.pool.is_not(None)).order_by(Vm.name)
        ):
            if pool in vms:  # a pool that no longer exists lists no VM
                vms[pool].append(vm)
        jobs: dict[str, list[str]] = {p.name: [] for p in pools}
        for job, selector in s.execute(
            select(BackupJob.name, BackupJob.selector).order_by(BackupJob.name)
        ):
            for p in pools:
                if _names_pool(selector, p.name):
                    jobs[p.name].append(job)
        return [_pool_dict(ctx, p, vms[p.name], jobs[p.name]) for p in pools]


def _listed(kind: str, names: Iterable[str], most: int = 10) -> str:
    names = list(names)
    shown = ", ".join(names[:most]) + (
        f" and {len(names) - most} more" if len(names) > most else ""
    )
    return f"{kind} {shown}"


def delete_pool(ctx: Context, ref: str) -> dict[str, Any]:
    """Delete a pool no VM and no backup job uses (``Refused`` names them and the fix)."""
    with ctx.catalog.session() as s:
        pool = find_pool(s, ref)
        vms, jobs = _users(s, pool.name)
        if vms or jobs:
            users = [_listed("VMs", vms)] if vms else []
            users += [_listed("backup jobs", jobs)] if jobs else []
            fixes = (
                []
                if not vms
                else ["move its VMs out with 'vmkeep vm config VM --no-pool' (or --pool OTHER)"]
            )
            fixes += ["delete or change the backup jobs that select it"] if jobs else []
            raise Refused(
                f"delete of pool {pool.name}",
                f"it is used by {' and '.join(users)}",
                "First " + ", and ".join(fixes) + ".",
            )
        s.delete(pool)
        return {"name": pool.name, "deleted": True}
