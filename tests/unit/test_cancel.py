"""A cancelled job stops its action even when the action calls no progress (a drill waiting for
its guest, a copy, a lifecycle action): the watcher raises the cancel in the action's thread, as
Ctrl-C does in a command. Told once; nothing raised after the action has ended."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from vmkeep.config import load_config
from vmkeep.engine.core import jobs
from vmkeep.engine.core.cancel import Cancellation
from vmkeep.engine.core.context import Context


@pytest.fixture
def ctx(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> Context:
    monkeypatch.setattr(jobs, "PROGRESS_EVERY", 0.1)
    return Context(load_config())


def _queued(ctx: Context, kind: str) -> int:
    job = jobs.enqueue(ctx, kind, "t", {}, "api", "ops")
    assert jobs.claim(ctx) == job["id"]
    return int(job["id"])


def test_an_action_without_progress_is_stopped_by_the_watcher(ctx: Context) -> None:
    cleaned = []

    def busy(_ctx: Context, _p: dict[str, Any], _progress: Any) -> Any:
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # waits for a guest, never reports progress
                time.sleep(0.02)
            return {"never": True}, []
        except KeyboardInterrupt:
            cleaned.append("cleaned up")  # the engine's Ctrl-C path
            raise

    job_id = _queued(ctx, "busy")
    threading.Timer(0.3, lambda: jobs.cancel(ctx, job_id)).start()
    started = time.monotonic()
    done = jobs.execute(ctx, job_id, {"busy": busy})
    assert done["state"] == "CANCELLED" and done["exit_code"] == 130, done
    assert time.monotonic() - started < 5
    assert cleaned == ["cleaned up"]


def test_the_progress_callback_tells_first_and_only_once(ctx: Context) -> None:
    calls = []

    def reporting(_ctx: Context, _p: dict[str, Any], progress: Any) -> Any:
        try:
            while True:
                progress(1, 2)
                time.sleep(0.02)
        except KeyboardInterrupt:
            calls.append("told")
            time.sleep(0.5)  # its clean-up takes a while: no second cancel arrives meanwhile
            calls.append("cleaned up")
            raise

    job_id = _queued(ctx, "reporting")
    threading.Timer(0.2, lambda: jobs.cancel(ctx, job_id)).start()
    done = jobs.execute(ctx, job_id, {"reporting": reporting})
    assert done["state"] == "CANCELLED" and calls == ["told", "cleaned up"], (done, calls)


def test_nothing_is_raised_after_close() -> None:
    asked = threading.Event()
    cancel = Cancellation(asked.is_set, KeyboardInterrupt, 0.05).start()
    cancel.close()
    asked.set()
    time.sleep(0.3)  # the watcher has stopped: no exception reaches this thread
    assert not cancel.told and not cancel.tell()


def test_a_finished_action_stays_done_when_the_cancel_comes_late(ctx: Context) -> None:
    def quick(c: Context, _p: dict[str, Any], _progress: Any) -> Any:
        return {"ok": True}, []

    job_id = _queued(ctx, "quick")
    done = jobs.execute(ctx, job_id, {"quick": quick})
    assert done["state"] == "DONE" and done["exit_code"] == 0
