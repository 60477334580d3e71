"""Two real daemons on one real PostgreSQL 15 catalog (Debian's server, started here in a temp
folder): 20 queued jobs are each run exactly once (FOR UPDATE SKIP LOCKED + conditional claim)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkeep.config import load_config
from vmkeep.engine.core import jobs
from vmkeep.engine.core.context import Context
from vmkeep.lab.postgres import server


@pytest.fixture
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL server on a unix socket, one per test (a catalog shared with the
    other test would hand its daemons that test's jobs); yields the catalog URL."""
    with server() as url:
        yield url


def test_two_daemons_run_each_of_20_jobs_exactly_once(
    postgres: str, clean_env: Path, tmp_path: Path
) -> None:
    env = dict(os.environ) | {"VMKEEP_CATALOG_URL": postgres}
    # each job holds its worker 0.5 s (these jobs fail at once otherwise): one daemon alone
    # cannot drain the queue before the other's workers poll it
    daemon_env = env | {"VMKEEP_FAILPOINTS": "job=sleep:0.5"}
    ctx = Context(load_config(environ=env))
    procs = []
    for i in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        err = open(tmp_path / f"d{i}.log", "w")  # noqa: SIM115 (closed below)
        procs.append((subprocess.Popen(
            [sys.executable, "-m", "vmkeep.cli.main", "-v", "daemon",
             "--listen", f"127.0.0.1:{port}", "--workers", "3"],
            env=daemon_env, stderr=err,
        ), err))  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not all("listening" in (tmp_path / f"d{i}.log").read_text() for i in range(2)):
            assert time.monotonic() < deadline, "daemons did not start"
            time.sleep(0.2)
        # both daemons' six workers are polling the queue now: 20 jobs at once, real contention
        ids = [
            jobs.enqueue(ctx, "verify", str(n), {"backup": 10_000 + n}, "api", "t")["id"]
            for n in range(20)
        ]
        deadline = time.monotonic() + 120
        while any(jobs.get(ctx, i)["state"] in ("QUEUED", "RUNNING") for i in ids):
            assert time.monotonic() < deadline, [jobs.get(ctx, i)["state"] for i in ids]
            time.sleep(0.3)
    finally:
        for proc, err in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            err.close()
    runs = Counter(
        int(m)
        for i in range(2)
        for m in re.findall(r"running job (\d+)", (tmp_path / f"d{i}.log").read_text())
    )
    assert sorted(runs) == sorted(ids) and set(runs.values()) == {1}, runs
    ended = [jobs.get(ctx, i) for i in ids]
    assert {j["state"] for j in ended} == {"FAILED"}  # the backups do not exist: fast, real runs
    assert all(j["error"]["code"] == "BackupNotFound" for j in ended)
    assert len({j["pid"] for j in ended}) == 2, "both daemons took jobs"


def test_two_daemons_on_one_clock_fire_each_slot_once(
    postgres: str, clean_env: Path, tmp_path: Path
) -> None:
    """Both daemons look for due slots five times a second on one shared clock (ten minutes a
    second): each slot of an every-10-minutes job becomes one run, none is lost, and both
    daemons won some (the unique slot row decides, not timing)."""
    from datetime import UTC, datetime

    from sqlalchemy import select

    from vmkeep.catalog.tables import BackupJobRun, Vm
    from vmkeep.engine.core import stores
    from vmkeep.engine.service import backupjobs

    ctx = Context(load_config(environ=dict(os.environ) | {"VMKEEP_CATALOG_URL": postgres}))
    with ctx.catalog.session() as s:  # a catalog-only VM: its runs are recorded, not backed up
        s.add(Vm(name="ghost", uuid="00000000-0000-4000-8000-00000000beef", host_uri="qemu:///x",
                 state="POWEROFF", lcm_state="POWEROFF", backup_config={}))  # fmt: skip
    stores.add(ctx, "slots-ds", "dir", {"path": str(tmp_path / "ds")})
    start = datetime(2030, 1, 1, 0, 0, 30, tzinfo=UTC)
    backupjobs.create(ctx, "every10", {"vms": ["ghost"]}, "slots-ds", "*/10 * * * *",
                      now=datetime(2030, 1, 1, tzinfo=UTC))  # fmt: skip
    env = dict(os.environ) | {"VMKEEP_CATALOG_URL": postgres, "VMKEEP_SCHEDULE_TICK": "0.2"}
    since = time.time() + 3  # both clocks read 00:00:30 three seconds from now
    procs = []
    for i in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        err = open(tmp_path / f"s{i}.log", "w")  # noqa: SIM115 (closed below)
        procs.append((subprocess.Popen(
            [sys.executable, "-m", "vmkeep.cli.main", "-v", "daemon", "--listen",
             f"127.0.0.1:{port}", "--clock", f"{start.isoformat()},600,{since}"],
            env=env, stderr=err,
        ), err))  # fmt: skip
    try:
        time.sleep(max(0.0, since - time.time()) + 12)  # 00:00:30 -> 02:00:30 on their clock
    finally:
        for proc, err in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            err.close()
    with ctx.catalog.session() as s:
        slots = sorted(s.execute(select(BackupJobRun.slot_at)).scalars())
    logs = [(tmp_path / f"s{i}.log").read_text() for i in range(2)]
    fired = [len(re.findall(r"backup job every10: run \d+", text)) for text in logs]
    assert len(slots) >= 10, (slots, logs)
    steps = {(b - a).total_seconds() for a, b in zip(slots, slots[1:], strict=False)}
    assert steps == {600.0}, slots  # every ten minutes, none twice, none lost
    assert sum(fired) == len(slots) and min(fired) >= 1, fired  # both fired; each slot once
    assert not any("failed" in text and "firing slot" in text for text in logs), logs
