"""libvirt backup and checkpoint XML (push mode), as pure functions (golden-file tested).

See https://libvirt.org/formatbackup.html and https://libvirt.org/formatcheckpoint.html.
"""

from __future__ import annotations

from collections.abc import Sequence
from xml.sax.saxutils import quoteattr


def backup_xml(targets: dict[str, str], incremental: str | None = None) -> str:
    """Push-mode backup of the disks in ``targets`` (disk target -> qcow2 file to create)."""
    inc = f"\n  <incremental>{incremental}</incremental>" if incremental else ""
    disks = "".join(
        f"""
    <disk name={quoteattr(dev)} backup='yes' type='file'>
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
