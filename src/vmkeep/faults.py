"""Fail points for the fault suite (tests/faults/), after FreeBSD's fail(9) and TiKV's fail-rs.

``VMKEEP_FAILPOINTS="copy=kill,store=sleep:5"`` makes the process SIGKILL itself or sleep when it
reaches the named point. Unset (always, outside tests) a fail point costs one dict lookup.
"""

from __future__ import annotations

import logging
import os
import signal
import time

ENV = "VMKEEP_FAILPOINTS"
log = logging.getLogger(__name__)


def failpoint(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        point, _, action = item.partition("=")
        if point.strip() != name:
            continue
        log.warning("fail point %s: %s", name, action)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action.startswith("sleep:"):
            time.sleep(float(action.split(":", 1)[1]))
