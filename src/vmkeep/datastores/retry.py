"""Retry as a wrapper around any driver (restic's ``retry.Backend``): a call that fails with
DatastoreUnreachable (connection refused, reset, timed out, a locked repository) is tried again
after an exponential back-off; any other error is final at once. Every driver operation is safe to
repeat: a store writes under a temporary name, rm of an absent file is no error."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from vmkeep.datastores.base import DatastoreDriver
from vmkeep.errors import DatastoreUnreachable

log = logging.getLogger(__name__)
T = TypeVar("T")


class Retrying(DatastoreDriver):
    def __init__(
        self,
        inner: DatastoreDriver,
        attempts: int = 4,
        first_delay: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        # no super().__init__: the inner driver validated the options already
        self.inner = inner
        self.name = inner.name
        self.options = inner.options
        self.driver = inner.driver  # type: ignore[misc]
        self.capabilities = inner.capabilities  # type: ignore[misc]
        self.options_model = inner.options_model  # type: ignore[misc]
        self.attempts = max(1, attempts)
        self.first_delay = first_delay
        self._sleep = sleep

    def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        delay = self.first_delay
        for attempt in range(1, self.attempts + 1):
            try:
                return fn(*args)
            except DatastoreUnreachable as err:
                if attempt == self.attempts:
                    raise DatastoreUnreachable(self.name, err.args[1], attempt - 1) from err
                log.warning(
                    "datastore %s: %s failed (%s); retry %d of %d in %.1f s",
                    self.name,
                    what,
                    err.args[1],
                    attempt,
                    self.attempts - 1,
                    delay,
                )
                self._sleep(delay)
                delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    def check(self) -> None:
        self._call("check", self.inner.check)

    def monitor(self) -> tuple[int, int]:
        return self._call("monitor", self.inner.monitor)

    def backup(self, chain: str, staged: list[Path]) -> None:
        self._call("store", self.inner.backup, chain, staged)

    def restore(self, chain: str, names: list[str], workdir: Path) -> dict[str, Path]:
        return self._call("restore", self.inner.restore, chain, names, workdir)

    def rm(self, chain: str, names: list[str] | None = None) -> None:
        self._call("rm", self.inner.rm, chain, names)

    def chains(self) -> list[str]:
        return self._call("list chains", self.inner.chains)

    def head(self, chain: str, name: str, size: int, workdir: Path) -> bytes:
        return self._call("stat", self.inner.head, chain, name, size, workdir)

    def stat(self, chain: str, name: str, workdir: Path) -> int:
        return self._call("stat", self.inner.stat, chain, name, workdir)

    def url(self, chain: str, name: str) -> str:
        return self.inner.url(chain, name)

    def shown_options(self) -> dict[str, Any]:
        return self.inner.shown_options()

    def used(self) -> int | None:
        return self._call("usage", self.inner.used)

    def ssh_target(self) -> Any:
        return self.inner.ssh_target()

    def verify_store(self, chain: str) -> str | None:
        return self._call("verify", self.inner.verify_store, chain)

    def __getattr__(self, attr: str) -> Any:  # driver extras (learn_host_key, ...)
        return getattr(self.inner, attr)
