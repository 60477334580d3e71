"""Shell completion (``cli/complete.py``): the scripts ``vmkeep completion SHELL`` prints, and
click's bash protocol end to end: the CLI as a real process, asked the way the bash script asks
it, offering what the catalog (or the daemon) holds, and nothing at all when it cannot."""

from __future__ import annotations

import json
import os
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from vmkeep.catalog.tables import Backup, Datastore, Group, Job, Vm
from vmkeep.config import load_config
from vmkeep.engine.core.context import Context

VK = [sys.executable, "-m", "vmkeep.cli.main"]
BACKUPS = 12  # ids 1..12: the prefix "1" keeps 1 and 10-12


def vk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VK, *args], capture_output=True, text=True, timeout=60)


def offered(line: str) -> list[str]:
    """What ``vmkeep`` offers for the command line ``line`` (completing its last word, empty
    when the line ends with a space), asked as the bash script asks: the values of its
    ``plain,VALUE`` lines. The process must exit 0 and print nothing on stderr."""
    env = dict(os.environ, COMP_WORDS=line, COMP_CWORD=str(len(line.split(" ")) - 1))
    env["_VMKEEP_COMPLETE"] = "bash_complete"
    proc = subprocess.run(VK, capture_output=True, text=True, env=env, timeout=60)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    # no items: click prints one empty line (the script offers nothing for it)
    kinds_values = [ln.split(",", 1) for ln in proc.stdout.splitlines() if ln]
    assert all(kind == "plain" for kind, _ in kinds_values), proc.stdout
    return [value for _, value in kinds_values]


@pytest.fixture
def catalog(clean_env: Path) -> Context:
    """A catalog with VMs web and db, datastore local, backups 1..12 of web, group tier and
    job 1 (rows as the other unit tests write them; no daemon, no libvirt)."""
    ctx = Context(load_config())
    with ctx.catalog.session() as s:
        web = Vm(name="web", uuid="uuid-web", host_uri="qemu:///system", state="ACTIVE",
                 lcm_state="RUNNING")  # fmt: skip
        db = Vm(name="db", uuid="uuid-db", host_uri="qemu:///system", state="ACTIVE",
                lcm_state="RUNNING")  # fmt: skip
        ds = Datastore(name="local", driver="dir", options={"path": "/nonexistent"})
        s.add_all([web, db, ds, Group(name="tier")])
        s.flush()
        for n in range(1, BACKUPS + 1):
            s.add(Backup(vm_id=web.id, datastore_id=ds.id, chain=f"web/{n}", mode="FULL",
                         status="VALID"))  # fmt: skip
        s.add(Job(kind="backup", target="web", state="DONE", host="h", pid=1))
    return ctx


def test_completion_prints_each_shells_script(tmp_path: Path) -> None:
    bash = vk("completion", "bash")
    assert bash.returncode == 0, bash.stderr
    assert "_VMKEEP_COMPLETE=bash_complete" in bash.stdout
    script = tmp_path / "vmkeep.bash"
    script.write_text(bash.stdout)
    # a real bash sources it and then completes the command vmkeep with it
    registered = subprocess.run(
        ["bash", "-c", 'source "$1" && complete -p vmkeep', "_", str(script)],
        capture_output=True,
        text=True,
    )
    assert registered.returncode == 0, registered.stderr
    assert registered.stdout.strip().endswith("-F _vmkeep_completion vmkeep")
    zsh, fish = vk("completion", "zsh"), vk("completion", "fish")
    assert (
        zsh.stdout.startswith("#compdef vmkeep") and "_VMKEEP_COMPLETE=zsh_complete" in zsh.stdout
    )
    assert "--command vmkeep" in fish.stdout and "_VMKEEP_COMPLETE=fish_complete" in fish.stdout
    wrong = vk("completion", "ksh")
    assert wrong.returncode == 2 and "'ksh' is not one of" in wrong.stderr


def test_vm_names_complete_from_the_catalog(catalog: Context) -> None:
    assert offered("vmkeep vm show ") == ["db", "web"]
    assert offered("vmkeep vm show w") == ["web"]
    assert offered("vmkeep vm show x") == []
    assert offered("vmkeep vm poweroff d") == ["db"]  # a lifecycle action (lifecycle_cmd.VM)
    assert offered("vmkeep backup cancel ") == ["db", "web"]
    assert offered("vmkeep backups list --vm w") == ["web"]
    assert offered("vmkeep group add tier ") == ["db", "web"]
    # "backup VM" runs its default command: the VMs come with the subcommands
    assert offered("vmkeep backup ") == ["cancel", "run", "db", "web"]


def test_backup_ids_complete_newest_first(catalog: Context) -> None:
    every = [str(n) for n in range(BACKUPS, 0, -1)]
    assert offered("vmkeep backups show ") == every
    assert offered("vmkeep backups show 1") == ["12", "11", "10", "1"]
    for line in ("vmkeep restore 1", "vmkeep drill 1", "vmkeep files ls 1", "vmkeep mount 1"):
        assert offered(line) == ["12", "11", "10", "1"], line


def test_datastore_group_and_job_names_complete(catalog: Context) -> None:
    assert offered("vmkeep backup web -d ") == ["local"]
    assert offered("vmkeep backup web --datastore l") == ["local"]
    assert offered("vmkeep backups copy 3 --to ") == ["local"]
    assert offered("vmkeep datastore show x") == []
    assert offered("vmkeep group backup tier -d ") == ["local"]
    assert offered("vmkeep group show ") == ["tier"]
    assert offered("vmkeep jobs show ") == ["1"]


def test_a_broken_config_or_catalog_offers_nothing_and_says_nothing(clean_env: Path) -> None:
    config = Path(os.environ["VMKEEP_CONFIG"])
    config.write_text("version = [\n")  # not TOML
    assert offered("vmkeep vm show ") == []
    assert vk("vm", "list").returncode != 0  # the command itself does report it
    config.write_text("version = 1\n")
    clean_env.mkdir(parents=True, exist_ok=True)
    (clean_env / "catalog.db").write_text("not a database\n")
    assert offered("vmkeep vm show ") == []
    assert offered("vmkeep backups show ") == []
    assert vk("vm", "list").returncode != 0


class _Daemon(BaseHTTPRequestHandler):
    """A stand-in for the daemon's socket: answers the list routes with its own rows."""

    ROWS = {"/v1/vms": [{"name": "from-daemon", "id": 7}], "/v1/datastores": [{"name": "far"}]}

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = json.dumps(self.ROWS.get(self.path, [])).encode()
        self.send_response(200 if self.path in self.ROWS else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def daemon_socket(catalog: Context, clean_env: Path) -> Iterator[None]:
    server = socketserver.ThreadingUnixStreamServer(str(clean_env / "vmkeep.sock"), _Daemon)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield
    server.shutdown()
    server.server_close()


def test_a_daemon_on_the_catalog_answers_the_completion(
    daemon_socket: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert offered("vmkeep vm show ") == ["from-daemon"]  # the catalog holds db and web
    assert offered("vmkeep backup web -d ") == ["far"]
    monkeypatch.setenv("VMKEEP_NO_DAEMON", "1")
    assert offered("vmkeep vm show ") == ["db", "web"]


def test_bash_itself_completes_with_the_script(catalog: Context, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "vmkeep"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m vmkeep.cli.main "$@"\n')
    wrapper.chmod(0o755)
    script = tmp_path / "vmkeep.bash"
    script.write_text(vk("completion", "bash").stdout)
    run = (
        'source "$1"; COMP_WORDS=(vmkeep vm show w); COMP_CWORD=3; '
        '_vmkeep_completion vmkeep; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    proc = subprocess.run(
        ["bash", "-c", run, "_", str(script)], capture_output=True, text=True, env=env, timeout=60
    )
    assert (proc.returncode, proc.stderr, proc.stdout) == (0, "", "web\n")
