"""docs/test-matrix.md, generated: each README command and each API route -> the real-guest
tests (tests/e2e, tests/faults) that run it.

How a test is found to run a command: the test modules are read (``ast``, nothing imported);
a call whose first positional arguments are literal strings (``vmkeep("vm", "nic", "attach",
name)``), or a list of literal strings after ``vmkeep.cli.main`` (a daemon started with
``subprocess``), names the CLI command they spell (the longest command path of the click tree);
a literal or f-string path ``/v1/...`` in a call ``.get/.post/.put/.patch/.delete/.request``
names the API route it matches. What a function of the module (a helper, a fixture) runs is
counted for every test that uses it, by name or as a fixture argument, in that module; the
fixtures of tests/e2e/conftest.py and tests/faults/conftest.py count for the tests that ask for
them.

    python scripts/test_matrix.py          # rewrite docs/test-matrix.md
    python scripts/test_matrix.py --check  # exit 1 when it is stale or a README command has no test
"""

from __future__ import annotations

import ast
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "test-matrix.md"
SUITES = ("e2e", "faults")  # real libvirtd, real QEMU guests
HTTP_METHODS = {"get", "post", "put", "patch", "delete", "head"}


GROUPS: set[tuple[str, ...]] = set()  # command paths that only hold subcommands


def cli_commands() -> set[tuple[str, ...]]:
    """Every command path of the CLI (groups included): ("vm", "nic", "attach"), ...; the
    groups that cannot run by themselves go to GROUPS too."""
    from vmkeep.cli.main import cli

    out: set[tuple[str, ...]] = set()
    ctx = click.Context(cli)

    def walk(cmd: click.Command, path: tuple[str, ...]) -> None:
        if path:
            out.add(path)
        if isinstance(cmd, click.Group):  # the lazily loaded groups too
            if path and not cmd.invoke_without_command and not hasattr(cmd, "default"):
                GROUPS.add(path)
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                if sub is not None and not sub.hidden:
                    walk(sub, (*path, name))

    walk(cli, ())
    return out


def api_routes() -> list[tuple[str, str]]:
    """Every (METHOD, path template) of the API's OpenAPI document."""
    import tempfile

    from vmkeep.api.app import create_app
    from vmkeep.config import load_config

    root = Path(tempfile.mkdtemp(prefix="vmkeep-matrix-"))
    (root / "config.toml").write_text('version = 1\n[libvirt]\nuri = "test:///default"\n')
    config = load_config(root / "config.toml", environ={"VMKEEP_DATA_DIR": str(root / "data")})
    paths = create_app(config).openapi()["paths"]
    return sorted((m.upper(), p) for p, ops in paths.items() for m in ops)


def longest_command(words: list[str], commands: set[tuple[str, ...]]) -> tuple[str, ...] | None:
    for n in range(len(words), 0, -1):
        if tuple(words[:n]) in commands:
            return tuple(words[:n])
    return None


def readme_commands(commands: set[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """The commands the README shows (``vmkeep WORDS`` in code blocks and inline code, and the
    siblings it lists after them: ``vmkeep pool list|show web | set web``), never a bare group."""
    text = (ROOT / "README.md").read_text()
    code = re.findall(r"```.*?\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", text)
    found: set[tuple[str, ...]] = set()
    for line in "\n".join(code).splitlines():
        for m in re.finditer(r"\bvmkeep\s+([^#]*)", line):
            words = m.group(1).split()
            path = longest_command(words, commands)
            if path is None:
                continue
            found.add(path)
            group = path if path in GROUPS else path[:-1]
            for alt in re.split(r"[|,]", " ".join(words[len(group) :])):
                for n in range(len(group), 0, -1):  # a sibling, or a cousin: "nic attach"
                    sibling = longest_command([*group[:n], *alt.split()], commands)
                    if sibling is not None and len(sibling) > n:
                        found.add(sibling)
                        group = sibling if sibling in GROUPS else sibling[:-1]
                        break
    return sorted(found - GROUPS)


def _strings(nodes: list[ast.expr]) -> list[str]:
    words = []
    for n in nodes:
        if not (isinstance(n, ast.Constant) and isinstance(n.value, str)):
            break
        words.append(n.value)
    return words


def _path(node: ast.expr) -> str | None:
    """A literal or f-string URL path, its {placeholders} as '{}'."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        text = node.value
    elif isinstance(node, ast.JoinedStr):
        text = "".join(str(v.value) if isinstance(v, ast.Constant) else "{}" for v in node.values)
    else:
        return None
    return text.split("?")[0] if text.startswith("/") else None


@dataclass
class Uses:
    commands: set[tuple[str, ...]] = field(default_factory=set)
    routes: set[tuple[str, str]] = field(default_factory=set)
    names: set[str] = field(default_factory=set)  # functions/fixtures of the module it uses


def _scan(
    fn: ast.AST, commands: set[tuple[str, ...]], routes: list[tuple[str, str, re.Pattern[str]]]
) -> Uses:
    uses = Uses()
    for node in ast.walk(fn):
        if isinstance(node, ast.Name):
            uses.names.add(node.id)
        if isinstance(node, ast.arg):
            uses.names.add(node.arg)
        if isinstance(node, ast.List | ast.Tuple):
            words = [
                e.value
                for e in node.elts
                if isinstance(e, ast.Constant) and isinstance(e.value, str)
            ]
            if "vmkeep.cli.main" in words:
                after = words[words.index("vmkeep.cli.main") + 1 :]
                path = longest_command(after, commands)
                if path:
                    uses.commands.add(path)
        if not isinstance(node, ast.Call):
            continue
        path = longest_command(_strings(node.args), commands)
        if path:
            uses.commands.add(path)
        if isinstance(node.func, ast.Attribute) and isinstance(
            node.func.value, ast.Name | ast.Attribute
        ):
            verb = node.func.attr
            args = list(node.args)
            if verb == "request" and args and isinstance(args[0], ast.Constant):
                method, args = str(args[0].value).upper(), args[1:]
            elif verb in HTTP_METHODS:
                method = verb.upper()
            else:
                continue
            url = _path(args[0]) if args else None
            if url is None:
                continue
            for m, template, rx in routes:
                if m == method and rx.fullmatch(url):
                    uses.routes.add((m, template))
    return uses


def _route_pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{[^}]+\}", template)
    return re.compile(r"(?:[^/]+|\{\})".join(re.escape(p) for p in parts))


def test_uses(commands: set[tuple[str, ...]], api: list[tuple[str, str]]) -> dict[str, Uses]:
    """``module::test`` -> what it runs (its own calls, its helpers' and fixtures')."""
    routes = [(m, t, _route_pattern(t)) for m, t in api]
    out: dict[str, Uses] = {}
    for suite in SUITES:
        folder = ROOT / "tests" / suite
        shared: dict[str, Uses] = {}
        conftest = folder / "conftest.py"
        for fn in ast.parse(conftest.read_text()).body if conftest.exists() else []:
            if isinstance(fn, ast.FunctionDef):
                shared[fn.name] = _scan(fn, commands, routes)
        for module in sorted(folder.glob("test_*.py")):
            defs = {
                fn.name: fn
                for fn in ast.parse(module.read_text()).body
                if isinstance(fn, ast.FunctionDef | ast.ClassDef)
            }
            local = {name: _scan(fn, commands, routes) for name, fn in defs.items()}
            scope = shared | local
            for name in defs:
                if not name.startswith("test_"):
                    continue
                total, seen, todo = Uses(), set(), [name]
                while todo:  # the test, then every function and fixture it reaches
                    cur = todo.pop()
                    if cur in seen or cur not in scope:
                        continue
                    seen.add(cur)
                    total.commands |= scope[cur].commands
                    total.routes |= scope[cur].routes
                    todo.extend(scope[cur].names - seen)
                out[f"tests/{suite}/{module.name}::{name}"] = total
    return out


def build() -> tuple[str, list[tuple[str, ...]]]:
    """The document, and the README commands no real-guest test runs."""
    commands = cli_commands()
    api = api_routes()
    uses = test_uses(commands, api)
    readme = readme_commands(commands)
    by_command: dict[tuple[str, ...], list[str]] = defaultdict(list)
    by_route: dict[tuple[str, str], list[str]] = defaultdict(list)
    for test, u in sorted(uses.items()):
        for c in u.commands:
            by_command[c].append(test)
        for r in u.routes:
            by_route[r].append(test)

    def cell(tests: list[str]) -> str:
        modules = sorted({t.split("::")[0].removeprefix("tests/") for t in tests})
        return f"{len(tests)}: " + ", ".join(modules) if tests else "**none**"

    lines = [
        "# Test matrix (generated)",
        "",
        "Each command the README shows, and each API route, with the real-guest tests (tests/e2e,",
        "tests/faults: real libvirtd, QEMU guests) that run it: how many, and in which modules.",
        "Generated by `python scripts/test_matrix.py` from the test sources; CI (a unit test) fails",
        "when this file is stale or a README command has no test. Unit, contract and fuzz tests",
        "are not counted here.",
        "",
        "## README commands",
        "",
        "| command | tests |",
        "|---|---|",
    ]
    lines += [f"| `vmkeep {' '.join(c)}` | {cell(by_command[c])} |" for c in readme]
    lines += ["", "## API routes", "", "| route | tests |", "|---|---|"]
    lines += [f"| `{m} {p}` | {cell(by_route[(m, p)])} |" for m, p in api]
    others = sorted(c for c in commands if c not in readme and by_command.get(c))
    lines += ["", "## Other CLI commands run by tests", "", "| command | tests |", "|---|---|"]
    lines += [f"| `vmkeep {' '.join(c)}` | {cell(by_command[c])} |" for c in others]
    missing = [c for c in readme if not by_command[c]]
    return "\n".join(lines) + "\n", missing


def main() -> int:
    text, missing = build()
    if "--check" in sys.argv[1:]:
        stale = not DOC.exists() or DOC.read_text() != text
        if stale:
            print("docs/test-matrix.md is stale: run python scripts/test_matrix.py")
        for c in missing:
            print(f"README command without a real-guest test: vmkeep {' '.join(c)}")
        return 1 if stale or missing else 0
    DOC.write_text(text)
    for c in missing:
        print(f"README command without a real-guest test: vmkeep {' '.join(c)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
