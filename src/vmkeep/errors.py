"""One exception tree for vmkeep.

Each class keeps its message template in its docstring, its process exit code and its HTTP status
on the class (after borg's ``Error`` classes). The CLI's ``main()`` and the API read them; nothing
else decides an exit code. docs/exit-codes.md is generated from this module's table and a unit test
keeps the two in sync.

    VmkeepError                    2  500
    ├── ConfigError                3  400
    ├── CatalogError               5  500
    ├── NotFound                   6  404
    │   ├── VmNotFound
    │   ├── DomainNotFound
    │   ├── DatastoreNotFound
    │   ├── BackupNotFound
    │   ├── IncrementNotFound
    │   ├── HostNotFound
    │   └── JobNotFound
    ├── AlreadyExists              7  409
    ├── WrongState                 4  409
    ├── Locked                     8  409
    ├── InvalidValue               9  400
    │   └── MissingValue
    ├── HypervisorError           10  502
    │   ├── HypervisorUnreachable 11  503
    │   │   └── HypervisorConnectionLost
    │   ├── VmmError              27  502
    │   ├── AgentUnavailable      12  409
    │   ├── AgentTimeout          13  504
    │   └── CheckpointInvalid     14  409
    ├── BackupFailed              15  500
    ├── BackupCancelled           16  409
    ├── ChecksumMismatch          17  500
    │   └── IncrementDamaged
    ├── DatastoreError            18  502
    │   └── DatastoreUnreachable  24  503
    ├── GroupBackupFailed         20  500
    ├── InsufficientSpace         21  507
    ├── Unauthorized              22  401
    ├── Forbidden                 23  403
    │   └── NotPermitted
    ├── RequestTooLarge           28  413
    ├── TooManyRequests           29  429
    │   └── WorkersBusy           29  503
    ├── Refused                   25  409
    ├── DrillFailed               26  422
    │   └── GroupDrillFailed
    ├── NotificationFailed        30  502
    ├── HostUnavailable           31  503
    └── LabError                  19  500

Exit codes 0 (success), 1 (finished with warnings) and 130 (interrupted) are not errors.
"""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_WARNINGS = 1
EXIT_INTERRUPTED = 130


class VmkeepError(Exception):
    """{}"""

    exit_code = 2
    http_status = 500
    # what the failed action still has to show (a drill's evidence): kept on its job and shown
    # with the error by the CLI, whether the daemon or the command ran it
    result: dict[str, Any] | None = None

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)

    def __str__(self) -> str:
        template = (type(self).__doc__ or "{}").strip().splitlines()[0]
        try:
            return template.format(*self.args)
        except (IndexError, KeyError):
            return " ".join(str(a) for a in self.args) or template


class ConfigError(VmkeepError):
    """Configuration error at {}: {}"""

    exit_code = 3
    http_status = 400


class WrongState(VmkeepError):
    """VM {} is {}; {} needs {}."""

    exit_code = 4
    http_status = 409


class CatalogError(VmkeepError):
    """Catalog error: {}"""

    exit_code = 5


class NotFound(VmkeepError):
    """{} not found."""

    exit_code = 6
    http_status = 404


class VmNotFound(NotFound):
    """VM '{}' is not in the catalog; see 'vmkeep vm list' or import it with 'vmkeep vm import'."""


class DomainNotFound(NotFound):
    """libvirt domain '{}' does not exist on {}."""


class DatastoreNotFound(NotFound):
    """Datastore '{}' does not exist; see 'vmkeep datastore list'."""


class BackupNotFound(NotFound):
    """Backup {} does not exist; see 'vmkeep backups list'."""


class IncrementNotFound(NotFound):
    """Backup {} has no increment {}; it has increments {}."""


class GroupNotFound(NotFound):
    """Group '{}' does not exist; see 'vmkeep group list'."""


class GroupBackupNotFound(NotFound):
    """Group backup {} does not exist; see 'vmkeep group backups'."""


class PoolNotFound(NotFound):
    """Pool '{}' does not exist; see 'vmkeep pool list' or create it with 'vmkeep pool create'."""


class JobNotFound(NotFound):
    """Job {} does not exist; see 'vmkeep jobs list'."""


class BackupJobNotFound(NotFound):
    """Backup job '{}' does not exist; see 'vmkeep backupjob list'."""


class HostNotFound(NotFound):
    """Host '{}' does not exist; see 'vmkeep host list' or add it with 'vmkeep host add'."""


class AlreadyExists(VmkeepError):
    """{} already exists."""

    exit_code = 7
    http_status = 409


class Locked(VmkeepError):
    """{} is busy: {} by pid {} on {} since {}. Wait for it to finish, or cancel it ('vmkeep jobs cancel ID'; a backup: 'vmkeep backup cancel VM')."""

    exit_code = 8
    http_status = 409


class InvalidValue(VmkeepError):
    """Invalid value for {}: {!r}; {}"""

    exit_code = 9
    http_status = 400


class MissingValue(InvalidValue):
    """{} is required: {}"""


class HypervisorError(VmkeepError):
    """Hypervisor error: {}"""

    exit_code = 10
    http_status = 502


class HypervisorUnreachable(HypervisorError):
    """Cannot connect to libvirt at {}: {}. Is libvirtd running? Start it with 'libvirtd -d'."""

    exit_code = 11
    http_status = 503


class HypervisorConnectionLost(HypervisorUnreachable):
    """libvirtd connection lost ({}: {}): the daemon was stopped or restarted. vmkeep reconnects and cleans up; run the action again."""


class VmmError(HypervisorError):
    """VMM driver '{}' failed at {}: {}"""

    exit_code = 27
    http_status = 502


class AgentUnavailable(HypervisorError):
    """The guest agent of VM '{}' is not available: {}. Install and start qemu-guest-agent in the guest, or set --fs-freeze none|suspend."""

    exit_code = 12
    http_status = 409


class AgentTimeout(HypervisorError):
    """The guest agent of VM '{}' did not answer '{}' within {} s."""

    exit_code = 13
    http_status = 504


class CheckpointInvalid(HypervisorError):
    """Checkpoint '{}' of VM '{}' is missing or inconsistent: {}"""

    exit_code = 14
    http_status = 409


class BackupFailed(VmkeepError):
    """Backup of VM '{}' failed: {}"""

    exit_code = 15


class BackupCancelled(VmkeepError):
    """Backup of VM '{}' was cancelled; partial files were removed."""

    exit_code = 16
    http_status = 409


class ChecksumMismatch(VmkeepError):
    """Checksum mismatch for {}: expected {}, got {}. The backup copy is damaged."""

    exit_code = 17


class IncrementDamaged(ChecksumMismatch):
    """Increment {} of backup {} is DAMAGED ({}); restore another point: {}."""


class DatastoreError(VmkeepError):
    """Datastore '{}' error: {}"""

    exit_code = 18
    http_status = 502


class DatastoreUnreachable(DatastoreError):
    """Datastore '{}' is unreachable: {}. Check that the host is up and reachable (vmkeep retried {} times)."""

    exit_code = 24
    http_status = 503


class Refused(VmkeepError):
    """{} refused: {}. {}"""

    exit_code = 25
    http_status = 409


class DrillFailed(VmkeepError):
    """Restore drill {} of backup {} point {} FAILED at {}"""

    exit_code = 26
    http_status = 422


class GroupDrillFailed(DrillFailed):
    """Group drill {} of group backup {} FAILED at {}"""


class NotificationFailed(VmkeepError):
    """Notification to {} failed: {}. Check the target in [notify] (webhook_url, urls) and that its receiver is up, then run 'vmkeep notify test' again."""

    exit_code = 30
    http_status = 502


class GroupBackupFailed(VmkeepError):
    """Group backup {} of '{}' failed at member '{}': {}. Every member was thawed, partial data removed; each member's chain stays usable."""

    exit_code = 20


class InsufficientSpace(VmkeepError):
    """Not enough free space in {}: the backup needs about {} and {} is free. {}"""

    exit_code = 21
    http_status = 507


class Unauthorized(VmkeepError):
    """Not authenticated: {}. Send 'Authorization: Bearer TOKEN' (create one with 'vmkeep token create NAME --role ROLE')."""

    exit_code = 22
    http_status = 401


class Forbidden(VmkeepError):
    """Token '{}' has role {}; {} needs {}."""

    exit_code = 23
    http_status = 403


class NotPermitted(Forbidden):
    """{} refused: {}. {}"""


class RequestTooLarge(VmkeepError):
    """Request body too large: {} bytes, the limit is {} ([api] max_body_bytes)."""

    exit_code = 28
    http_status = 413


class TooManyRequests(VmkeepError):
    """Too many {} for token '{}': {} at most ({}); wait for some to end."""

    exit_code = 29
    http_status = 429


class WorkersBusy(TooManyRequests):
    """All {} work slots are busy (running jobs and file requests share [jobs] workers); try again when one ends."""

    http_status = 503


class HostUnavailable(VmkeepError):
    """Host '{}' cannot take this now: {}. {}"""

    exit_code = 31
    http_status = 503


class LabError(VmkeepError):
    """Test lab error: {}"""

    exit_code = 19


def all_error_classes() -> list[type[VmkeepError]]:
    """Every error class, parents first, for the documentation table."""
    seen: list[type[VmkeepError]] = []

    def walk(cls: type[VmkeepError]) -> None:
        seen.append(cls)
        for sub in cls.__subclasses__():
            walk(sub)

    walk(VmkeepError)
    return seen


def exit_code_table() -> str:
    """The Markdown table of exit codes that docs/exit-codes.md holds."""
    rows = [
        "| exit code | HTTP | error | meaning |",
        "|---|---|---|---|",
        "| 0 | 200 | – | success |",
        "| 1 | 200 | – | finished with warnings (e.g. crash-consistent backup because the agent was missing) |",
    ]
    for cls in all_error_classes():
        template = (cls.__doc__ or "").strip().splitlines()[0].replace("|", "\\|")
        rows.append(f"| {cls.exit_code} | {cls.http_status} | `{cls.__name__}` | {template} |")
    rows.append("| 130 | – | – | interrupted (Ctrl-C / SIGTERM); work in progress was cleaned up |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(exit_code_table(), end="")


def exit_code_of(code: str | None) -> int:
    """The exit code of the error class named ``code`` (a job's or an API answer's error code);
    VmkeepError's for a name that is no error class here."""
    cls = globals().get(str(code))
    if isinstance(cls, type) and issubclass(cls, VmkeepError):
        return cls.exit_code
    return VmkeepError.exit_code
