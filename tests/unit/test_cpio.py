import gzip
import shutil
import subprocess
from pathlib import Path

import pytest

from vmkeep.lab.cpio import Archive


@pytest.mark.skipif(
    shutil.which("cpio") is None and shutil.which("busybox") is None,
    reason="needs cpio or busybox to read the archive back",
)
def test_archive_unpacks_with_a_real_cpio(tmp_path: Path) -> None:
    arc = Archive()
    arc.file("bin/hello", b"hi\n", 0o755)
    arc.symlink("bin/sh", "hello")
    arc.directory("empty")
    (tmp_path / "a.cpio").write_bytes(gzip.decompress(arc.to_gzip()))
    out = tmp_path / "out"
    out.mkdir()
    tool = ["cpio"] if shutil.which("cpio") else ["busybox", "cpio"]
    subprocess.run(
        [*tool, "-i", "-d", "-F", str(tmp_path / "a.cpio")],
        cwd=out,
        check=True,
        capture_output=True,
    )
    assert (out / "bin/hello").read_bytes() == b"hi\n"
    assert (out / "bin/hello").stat().st_mode & 0o111
    assert (out / "bin/sh").is_symlink() and (out / "bin/sh").readlink() == Path("hello")
    assert (out / "empty").is_dir()
