"""Restores check the chain while qemu-img converts it: what may never happen meanwhile (real
qemu-img on small images; a catalog without the backup, so nothing is marked)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from vmkeep.checksums import Stopped, digest_file
from vmkeep.cli.output import emit_json
from vmkeep.config import load_config
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.images import backing_name, check_backing_names
from vmkeep.engine.restore.point import convert_verified
from vmkeep.errors import ChecksumMismatch, VmkeepError


def qcow2(path: Path, backing: str | None = None, data: bytes = b"") -> Path:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        argv += ["-u", "-b", backing, "-F", "qcow2"]
    subprocess.run([*argv, str(path), "1M"], check=True)
    if data:
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {len(data)}", str(path)],
            check=True,
            capture_output=True,
        )
    return path


@pytest.fixture
def chain(tmp_path: Path) -> dict[str, Path]:
    base = qcow2(tmp_path / "0.vda.qcow2", data=b"x" * 65536)
    top = qcow2(tmp_path / "1.vda.qcow2", backing="0.vda.qcow2")
    return {base.name: base, top.name: top}


def test_a_good_chain_lands_and_a_damaged_one_leaves_the_destination_alone(
    tmp_path: Path, chain: dict[str, Path]
) -> None:
    ctx = Context(load_config())
    expected = {n: digest_file(p) for n, p in chain.items()}
    dest = tmp_path / "out" / "vda.qcow2"
    dest.parent.mkdir()
    convert_verified(ctx, 1, "vm/1", expected, chain, {"1.vda.qcow2": dest})
    assert backing_name(dest) is None  # flattened
    dest.write_text("precious")  # a file the user asked to overwrite (--force)
    bad = dict(expected, **{"0.vda.qcow2": "blake3:" + "0" * 64})
    with pytest.raises(ChecksumMismatch, match="0.vda.qcow2"):
        convert_verified(ctx, 1, "vm/1", bad, chain, {"1.vda.qcow2": dest})
    assert dest.read_text() == "precious"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["vda.qcow2"]  # no half image


def test_a_backing_reference_outside_the_chain_is_refused_before_qemu_img_reads_it(
    tmp_path: Path, chain: dict[str, Path]
) -> None:
    check_backing_names(chain)
    evil = qcow2(tmp_path / "2.vda.qcow2", backing="/etc/shadow")
    files = dict(chain, **{evil.name: evil})
    with pytest.raises(VmkeepError, match="not a file of its chain"):
        check_backing_names(files)
    ctx = Context(load_config())
    expected = {n: digest_file(p) for n, p in files.items()}  # even with matching checksums
    dest = tmp_path / "evil.qcow2"
    with pytest.raises(VmkeepError, match="altered outside vmkeep"):
        convert_verified(ctx, 1, "vm/1", expected, files, {evil.name: dest})
    assert not dest.exists()


def test_hashing_stops_between_slices_when_asked(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"a" * 1024)
    with pytest.raises(Stopped):
        digest_file(f, stop=lambda: True)
    assert digest_file(f, stop=lambda: False).startswith("blake3:")
    with pytest.raises(VmkeepError, match="unknown checksum algorithm"):
        digest_file(f, "md4")


def test_json_output_falls_back_for_what_orjson_refuses(capsys: pytest.CaptureFixture[str]) -> None:
    emit_json({"name": "a\udcff", "big": 1 << 70})  # a guest file name that is not UTF-8
    out = capsys.readouterr().out
    assert '"a\\udcff"' in out and str(1 << 70) in out
