"""Rewrite the table in docs/exit-codes.md from src/vmkeep/errors.py (keeps the prose around it)."""

from pathlib import Path

from vmkeep.errors import exit_code_table

doc = Path(__file__).resolve().parent.parent / "docs" / "exit-codes.md"
lines = doc.read_text().splitlines()
start = next(i for i, line in enumerate(lines) if line.startswith("| exit code"))
end = start
while end < len(lines) and lines[end].startswith("|"):
    end += 1
new = lines[:start] + exit_code_table().rstrip("\n").splitlines() + lines[end:]
doc.write_text("\n".join(new) + "\n")
