"""The README's shell examples run on a fresh machine as written: every program they call is
vmkeep, make, a shell builtin, or installed by scripts/setup.sh (the README's first command)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILTINS = {"export", "cd", "echo", "source", "set"}
OURS = {"vmkeep", "make"}


def _programs() -> set[str]:
    text = (ROOT / "README.md").read_text()
    found: set[str] = set()
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            code = line.split(" #", 1)[0].strip()
            if not code or code.startswith(("#", "[", "--", "-")):
                continue  # a comment, or the continued options of the line before
            # a vmkeep usage line uses "|" for "or"; other lines are shell: pipes, $(...)
            parts = [code] if code.startswith("vmkeep ") else re.split(r"\||\$\(|;|&&", code)
            for part in parts:
                words = part.split()
                if words and re.fullmatch(r"[a-z][a-z0-9_.-]*", words[0]):
                    found.add(words[0])
    return found


def _setup_packages() -> set[str]:
    script = (ROOT / "scripts" / "setup.sh").read_text()
    listed = re.search(r"PACKAGES=\((.*?)\)", script, flags=re.S)
    assert listed, "scripts/setup.sh lists its Debian packages in PACKAGES=(...)"
    return set(listed.group(1).split())


def test_every_program_of_the_readme_is_installed_by_setup() -> None:
    programs = _programs()
    assert {"vmkeep", "curl", "jq"} <= programs, programs  # the parse sees the API example
    missing = programs - BUILTINS - OURS - _setup_packages()
    assert missing == set(), f"add {sorted(missing)} to PACKAGES in scripts/setup.sh"
