"""The daemon's work slots: ``[jobs] workers`` of them, shared by its job workers (one held for
each job, from its claim to its end) and by the API's ``files`` requests (a listing or a
download opens a backup's image as a job does). A request that finds no slot free within a few
seconds is refused (``WorkersBusy``) rather than queued behind the jobs."""

from __future__ import annotations

import threading

from vmkeep.errors import WorkersBusy


class WorkSlots:
    def __init__(self, size: int) -> None:
        self.size = size
        self._free = threading.BoundedSemaphore(size)
        # files requests never hold every slot: with two or more, one is always left for jobs
        self._files = threading.BoundedSemaphore(max(1, size - 1))

    def acquire_files(self) -> bool:
        """A slot for a files request, now or never (the caller polls)."""
        if not self._files.acquire(blocking=False):
            return False
        if self._free.acquire(blocking=False):
            return True
        self._files.release()
        return False

    def release_files(self) -> None:
        self._free.release()
        self._files.release()

    def acquire(self, timeout: float | None = None) -> bool:
        """A slot within ``timeout`` s (None: wait as long as it takes; 0: only a free one)."""
        if timeout is not None and timeout <= 0:
            return self._free.acquire(blocking=False)
        return self._free.acquire(timeout=timeout)

    def release(self) -> None:
        self._free.release()

    def busy(self) -> WorkersBusy:
        return WorkersBusy(self.size)
