"""The cyclic garbage collector, set for what vmkeep's processes do.

CPython starts a collection every 700 new container objects by default, and every tenth of
those looks at older objects too. Reading the catalog builds many containers at once (a
``backups list`` of 10,000 increments: ~300,000 dicts, lists and rows, none of them in a
cycle), so the default setting ran hundreds of collections per list, each walking what is
alive, the daemon's loaded modules (FastAPI, SQLAlchemy, libvirt) included: 35-40 % of the
daemon's answer to ``GET /v1/backups`` (0.45 s -> 0.23 s median, docs/benchmarks.md).

- every process: a collection every 50,000 new containers (cycles still get collected; at
  most a few MB of cyclic garbage waits for it);
- the daemon, once started: what start-up loaded is frozen (``gc.freeze``), so collections
  no longer walk the modules and objects that live as long as the process.
"""

from __future__ import annotations

import gc

GEN0 = 50_000


def for_command() -> None:
    gc.set_threshold(GEN0, 20, 20)


def for_daemon() -> None:
    """Call when start-up is done (everything the daemon serves with is loaded)."""
    for_command()
    gc.collect()
    gc.freeze()
