"""``restore --in-place --disk vdb`` leaves vda as it is, but the VM's checkpoints are dropped: the
persistent dirty bitmaps they kept in vda's qcow2 go too (``images.drop_bitmaps``), or a later
checkpoint of the same name (a catalog rebuilt by ``datastore scan --import`` numbers its backups
from 1 again) fails with "Bitmap already exists". Real qemu-img; no VM."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from vmkeep.engine.core.chains import CHECKPOINT_PREFIX
from vmkeep.engine.core.images import drop_bitmaps


def bitmaps(image: Path) -> list[str]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(image)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    data = json.loads(out).get("format-specific", {}).get("data", {})
    return sorted(b["name"] for b in data.get("bitmaps", []))


def test_only_vmkeeps_bitmaps_are_dropped(tmp_path: Path) -> None:
    image = tmp_path / "vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    for name in ("vmkeep-1-0", "vmkeep-1-1", "someone-else"):
        subprocess.run(["qemu-img", "bitmap", "--add", str(image), name], check=True)
    assert drop_bitmaps(image, CHECKPOINT_PREFIX) == ["vmkeep-1-0", "vmkeep-1-1"]
    assert bitmaps(image) == ["someone-else"]
    assert drop_bitmaps(image, CHECKPOINT_PREFIX) == []


def test_a_raw_image_has_none(tmp_path: Path) -> None:
    raw = tmp_path / "vdb.raw"
    raw.write_bytes(b"\0" * 4096)
    assert drop_bitmaps(raw, CHECKPOINT_PREFIX) == []
