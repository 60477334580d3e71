"""Stopping a running action when its job is cancelled, the way Ctrl-C stops a command.

An action learns of a cancel through its progress callback (a backup, a restore) or, when it
calls none for a while (a drill waiting for its guest, a copy, a lifecycle action), from a
watcher thread that raises the cancel exception in the action's thread, as Ctrl-C raises
KeyboardInterrupt in a command's (``PyThreadState_SetAsyncExc``: it arrives at the thread's next
Python instruction; a blocking call in C finishes first). The engine's cancel path is the same
either way: every action already unwinds from a Ctrl-C at any point. The action is told once:
whichever of the two comes first tells it, and nothing is raised after ``close``.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def _raise_in(thread_id: int, exc: type[BaseException] | None) -> None:
    """Raise ``exc`` in the thread ``thread_id`` at its next instruction (None: take back one
    not raised yet)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc is not None else None
    )


class Cancellation:
    """The cancel of one running action: ``asked()`` says whether its job was cancelled (read
    every ``every`` seconds by the watcher); ``exc`` is raised in the action's thread (the
    thread that made this object)."""

    def __init__(self, asked: Callable[[], bool], exc: type[BaseException], every: float) -> None:
        self.asked, self.exc, self.every = asked, exc, every
        self.thread = threading.get_ident()
        self.lock = threading.Lock()
        self.told = False  # the action was told (by either path)
        self.raised = False  # by the watcher, in the action's thread
        self.stop = threading.Event()
        self.watcher = threading.Thread(target=self._watch, name="job-cancel", daemon=True)

    def start(self) -> Cancellation:
        self.watcher.start()
        return self

    def tell(self) -> bool:
        """From the action's thread (its progress callback): True the first time the action is
        to be told; the caller raises then."""
        with self.lock:
            if self.told or self.stop.is_set():
                return False
            self.told = True
            return True

    def _watch(self) -> None:
        while not self.stop.wait(self.every):
            try:
                asked = self.asked()
            except Exception as err:  # the catalog is busy or gone: look again later
                log.debug("could not read the job's cancel flag: %s", err)
                continue
            if not asked:
                continue
            with self.lock:
                if not self.told and not self.stop.is_set():
                    self.told = self.raised = True
                    _raise_in(self.thread, self.exc)
            return

    def close(self) -> None:
        """The action has ended: nothing is raised in its thread after this (one the watcher
        raised and the thread has not met yet is taken back)."""
        with self.lock:
            self.stop.set()
            if self.raised:
                _raise_in(self.thread, None)
