"""Rewrite docs/lifecycle.md's table from src/vmkeep/engine/core/states.py (keeps the prose)."""

from pathlib import Path

from vmkeep.engine.core.states import table_markdown

doc = Path(__file__).resolve().parent.parent / "docs" / "lifecycle.md"
lines = doc.read_text().splitlines()
start = next(i for i, line in enumerate(lines) if line.startswith("| action"))
end = start
while end < len(lines) and lines[end].startswith("|"):
    end += 1
new = lines[:start] + table_markdown().rstrip("\n").splitlines() + lines[end:]
doc.write_text("\n".join(new) + "\n")
