"""The typed params of every long action (pydantic): what a job row's ``params`` hold, what the
API's action routes take (the target from the path, the rest from the body) and what the CLI
fills from its options. Bounds here are the one place a value's range is stated; the engine
checks meaning (a VM exists, a state allows the action) when the action runs.

Only pydantic and the names rule (``names.py``) here: the CLI imports this module to hand an
action to the daemon without loading the engine.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)
from pydantic_core import PydanticCustomError

from vmkeep.errors import InvalidValue
from vmkeep.names import DISK_PATTERN, MAX_JSON_ID, MAX_LEN, NAME_PATTERN, RULE, check_name


def _new_name(value: str) -> str:
    """names.py's rule (an all-digit name is refused, it would be read as an id)."""
    try:
        return check_name("name", value)
    except InvalidValue:
        raise PydanticCustomError("name", RULE) from None  # the rule alone, as the engine says it


def _id_as_text(value: object) -> object:
    """A snapshot id sent as a number (``{"snapshot": 3}``) is the reference ``"3"``."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


Name = Annotated[str, Field(min_length=1, max_length=255)]  # a reference: a name or an id
# a name given to something new (a datastore, group, pool, backup job, snapshot, restored VM):
# names.py's rule, as the schema shows it and in words when refused (the engine checks it too)
NAME_SCHEMA = {"pattern": f"^{NAME_PATTERN}$", "minLength": 1, "maxLength": MAX_LEN}
NewName = Annotated[str, AfterValidator(_new_name), Field(json_schema_extra=NAME_SCHEMA)]
# a catalog id; 0 is simply not found (the API's routes refuse ids below 1 as bad input)
CatalogId = Annotated[int, Field(ge=0, le=MAX_JSON_ID)]
DiskName = Annotated[str, Field(max_length=64)]
# a new disk's target (names.py's disk rule, checked by the engine)
NewDisk = Annotated[str, Field(json_schema_extra={"pattern": f"^{DISK_PATTERN}$"})]
SnapshotName = NewName
# a snapshot's name, or its id (all digits), as ``onevm snapshot-revert`` takes it
SnapshotRef = Annotated[str, BeforeValidator(_id_as_text), Field(min_length=1, max_length=MAX_LEN)]


class Params(BaseModel):
    """Params of one action: unknown fields are refused (a typo is an error, not ignored)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# --- VMs ----------------------------------------------------------------------------------------
class VmParams(Params):
    vm: Name


# a backup job's policy keys over the VM's (backup_config.validate checks them when they apply)
Policy = dict[str, str | int | bool | None]  # None: keep_last 'all'


class BackupParams(VmParams):
    datastore: Name
    reset: bool = False
    policy: Policy = {}
    copy_to: Name | None = None  # then copy the new point there and verify it (3-2-1)
    bwlimit: int | None = Field(default=None, ge=1, le=1 << 30)  # KiB/s to a remote datastore


# --- points -------------------------------------------------------------------------------------
class PointParams(Params):
    backup: CatalogId


class RestoreParams(PointParams):
    increment: int | None = Field(default=None, ge=0)
    disk: DiskName | None = None
    name: NewName | None = None
    path: str | None = Field(default=None, max_length=4096)
    no_nic: bool = False
    no_ip: bool = False
    start: bool = False
    force: bool = False
    in_place: bool = False
    instant: bool = False
    copy_bwlimit: int = Field(default=0, ge=0, le=1 << 20)
    without_memory: bool = False


class CopyParams(PointParams):
    to: Name


class DeleteParams(PointParams):
    increment: int | None = Field(default=None, ge=0)
    force: bool = False  # protected points too: admin only (runners.check_delete)


class DrillParams(PointParams):
    increment: int | None = Field(default=None, ge=0)
    probe: str | None = Field(default=None, min_length=1, max_length=4096)
    timeout: float = Field(default=300.0, ge=1, le=86400)


class PruneParams(VmParams):
    """Retention now: on every datastore the VM has points on (or ``datastore``), with the VM's
    policy; a ``keep_*`` given here replaces that rule for this run."""

    datastore: Name | None = None
    dry_run: bool = False
    keep_last: int | None = Field(default=None, ge=1, le=1_000_000)
    keep_hourly: int | None = Field(default=None, ge=1, le=1_000_000)
    keep_daily: int | None = Field(default=None, ge=1, le=1_000_000)
    keep_weekly: int | None = Field(default=None, ge=1, le=1_000_000)
    keep_monthly: int | None = Field(default=None, ge=1, le=1_000_000)
    keep_yearly: int | None = Field(default=None, ge=1, le=1_000_000)

    def rules(self) -> dict[str, int]:
        return {
            k: v
            for k in type(self).model_fields
            if k.startswith("keep_") and (v := getattr(self, k))
        }


class ScanParams(Params):
    datastore: Name
    import_: bool = Field(default=False, alias="import")


# --- groups -------------------------------------------------------------------------------------
class GroupParams(Params):
    group: Name


class GroupBackupParams(GroupParams):
    datastore: Name
    parallel_freeze: bool = False
    reset: bool = False
    policy: Policy = {}
    copy_to: Name | None = None
    bwlimit: int | None = Field(default=None, ge=1, le=1 << 30)


class GroupStartParams(GroupParams):
    wait_agent: bool = True
    timeout: float = Field(default=120.0, ge=0)  # per member


class GroupStopParams(GroupParams):
    force: bool = False
    timeout: float = Field(default=60.0, ge=0)  # per member; 0 with force: destroy at once


class GroupRecoverParams(GroupParams):
    """``group recover GROUP --redeploy``: members on failed hosts brought up on ``host``."""

    host: Name | None = None
    from_backup: bool = False


class GroupRestoreParams(Params):
    group_backup: CatalogId
    suffix: str | None = Field(default=None, max_length=64)
    start: bool = False


Command = Annotated[str, Field(min_length=1, max_length=4096)]


class MemberCommand(Params):
    member: Name
    command: Command


class GroupDrillParams(Params):
    group_backup: CatalogId
    probes: dict[Name, Command] = Field(default={}, max_length=64)  # member -> its own probe
    cross_probe: MemberCommand | None = None  # run in that member: the cut works as a whole
    timeout: float = Field(default=300.0, ge=1, le=86400)  # per member's boot


# --- lifecycle actions (each reads its own options) ----------------------------------------------
class HardParams(VmParams):
    hard: bool = False


class TerminateParams(HardParams):
    keep_disks: bool = False


class ResizeParams(VmParams):
    vcpus: int | None = Field(default=None, ge=1, le=512)
    memory: int | None = Field(default=None, ge=16, le=1 << 24)


class DiskResizeParams(VmParams):
    disk: DiskName | None = None
    size: str = Field(min_length=1, max_length=32)


class SnapshotCreateParams(VmParams):
    name: SnapshotName | None = None


class SnapshotParams(VmParams):
    snapshot: SnapshotRef


class DiskParams(VmParams):
    disk: DiskName | None = None


class DiskSnapshotCreateParams(DiskParams):
    name: SnapshotName | None = None


class DiskAttachParams(VmParams):
    source: str | None = Field(default=None, max_length=4096)
    size: str | None = Field(default=None, max_length=32)
    target: NewDisk | None = None
    format: str | None = Field(default=None, max_length=16)


class DiskDetachParams(VmParams):
    target: DiskName


class NicAttachParams(VmParams):
    bridge: str | None = Field(default=None, max_length=64)
    mac: str | None = Field(default=None, max_length=17)
    model: str | None = Field(default=None, max_length=32)


class NicDetachParams(VmParams):
    mac: str = Field(min_length=1, max_length=17)


class MigrateParams(VmParams):
    host: Name  # the destination host (``vmkeep host list``)
    live: bool = False  # a running VM runs on during the copy (else paused for it)
    copy_storage: bool = False  # copy the disks too (host-local storage at the same paths)
    bandwidth: int = Field(default=0, ge=0, le=1 << 20)  # MiB/s of the copy; 0: no limit


class DeployParams(VmParams):
    host: Name | None = None  # pinned there (else placed when the catalog has hosts)


class RecoverParams(VmParams):
    """``how`` ends a stuck state; ``redeploy`` brings the VM of a failed host up on another
    (``host``, else placed), from its disks or ``from_backup``: exactly one of the two."""

    how: Literal["success", "failure", "retry", "delete"] | None = None
    redeploy: bool = False
    host: Name | None = None
    from_backup: bool = False

    @model_validator(mode="after")
    def _one_way(self) -> RecoverParams:
        if (self.how is None) == (not self.redeploy):
            raise PydanticCustomError(
                "recover", "give one of --success, --failure, --retry, --delete or --redeploy"
            )
        if not self.redeploy and (self.host is not None or self.from_backup):
            raise PydanticCustomError("recover", "--host and --from-backup go with --redeploy")
        return self
