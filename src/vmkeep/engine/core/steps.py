"""Wall-clock time per step of an operation, for ``--json`` results, logs and bench/.

steps = Steps()
with steps.step("copy"):
    ...
steps.ms()  # {"copy": 1234, ...} in the order the steps first ran
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import TypeVar

T = TypeVar("T")


class Steps:
    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time the block (a step run twice, e.g. once per disk, adds up)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - t0

    @contextmanager
    def entered(self, name: str, cm: AbstractContextManager[T]) -> Iterator[T]:
        """``with cm``, timing only its entry (taking a lock, starting a guard) as step ``name``."""
        with ExitStack() as stack:
            with self.step(name):
                value = stack.enter_context(cm)
            yield value

    def ms(self) -> dict[str, int]:
        return {name: round(s * 1000) for name, s in self._seconds.items()}

    def __str__(self) -> str:
        return ", ".join(f"{name} {ms} ms" for name, ms in self.ms().items())
