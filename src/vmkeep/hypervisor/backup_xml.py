"""libvirt backup and checkpoint XML (push mode), as pure functions (golden-file tested in
tests/unit/test_backup_xml.py).

A disk not listed in either XML takes no part: it is not copied and gets no bitmap (a disk
excluded from backups, docs/architecture.md "Chains that follow the disks").
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from xml.sax.saxutils import quoteattr


def backup_xml(
    targets: dict[str, str], incremental: str | None = None, full: Collection[str] = ()
) -> str:
    """Push-mode backup of the disks in ``targets`` (disk target -> qcow2 file to create). With
    ``incremental`` (the checkpoint of the parent point) every disk is copied since then, but
    those in ``full``, which are copied whole (``backupmode='full'``, libvirt 7.6 or later): a
    disk that joined the VM's chain after that checkpoint has no bitmap of it."""
    inc = f"\n  <incremental>{incremental}</incremental>" if incremental else ""

    def mode(dev: str) -> str:
        return " backupmode='full'" if incremental and dev in full else ""

    disks = "".join(
        f"""
    <disk name={quoteattr(dev)} backup='yes' type='file'{mode(dev)}>
      <target file={quoteattr(path)}/>
      <driver type='qcow2'/>
    </disk>"""
        for dev, path in targets.items()
    )
    return f"<domainbackup mode='push'>{inc}\n  <disks>{disks}\n  </disks>\n</domainbackup>\n"


def checkpoint_xml(name: str, bitmap_disks: Sequence[str], other_disks: Sequence[str] = ()) -> str:
    """A checkpoint with a persistent dirty bitmap on each qcow2 disk (raw disks cannot hold one)."""
    disks = "".join(
        f"\n    <disk name={quoteattr(d)} checkpoint='bitmap'/>" for d in bitmap_disks
    ) + "".join(f"\n    <disk name={quoteattr(d)} checkpoint='no'/>" for d in other_disks)
    return (
        f"<domaincheckpoint>\n  <name>{name}</name>\n  <disks>{disks}\n  </disks>\n"
        "</domaincheckpoint>\n"
    )
