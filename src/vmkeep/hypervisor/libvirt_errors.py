"""How libvirt's failures become vmkeep's errors: a failed guest-agent call (``agent_error``)
and a lost connection to libvirtd (``watch_connection``, which wraps every public method of the
libvirt hypervisor: a call that failed because libvirtd went away raises
HypervisorConnectionLost, and a read is asked again once on a new connection)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import libvirt

from vmkeep.errors import (
    AgentTimeout,
    AgentUnavailable,
    HypervisorConnectionLost,
    HypervisorError,
    HypervisorUnreachable,
    NotFound,
)

T = TypeVar("T")

# libvirt says "Guest agent is not responding: Guest agent not available for now" when the agent
# is there but hung (a command timed out and may still run later) and "...: QEMU guest agent is
# not connected" when no agent has opened its port (channel state='disconnected'): only the
# latter is "no agent"; everything else unresponsive counts as hung.
_AGENT_MISSING_HINTS = ("not connected", "not configured", "not running")
# Calls that only read: asked again once on a new connection after libvirtd restarted.
_READ_ONLY = {
    "list_domains",
    "states",
    "domain",
    "domain_xml",
    "checkpoints",
    "disk_size",
    "checkpoint_size",
}
# Errors that mean the connection to libvirtd itself broke (daemon killed or restarted).
CONNECTION_CODES = {
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
}


def agent_error(name: str, command: str, timeout: float, code: int, msg: str) -> HypervisorError:
    """The vmkeep error for a failed agent call: a hung agent (the command may still run later)
    is AgentTimeout; only an agent that is not there at all is AgentUnavailable."""
    if code == libvirt.VIR_ERR_AGENT_UNRESPONSIVE:
        # "Guest agent is not responding: QEMU guest agent is not connected" = no agent.
        if any(h in msg for h in _AGENT_MISSING_HINTS):
            return AgentUnavailable(name, msg)
        return AgentTimeout(name, command, timeout)
    if code in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED):
        return AgentUnavailable(name, msg)
    if code == libvirt.VIR_ERR_OPERATION_TIMEOUT:
        return AgentTimeout(name, command, timeout)
    return HypervisorError(f"{command} on {name}: {msg}")


def watch_connection(cls: type[T]) -> type[T]:
    """Wrap every public method: a call that failed because libvirtd went away raises
    HypervisorConnectionLost (never a bare "Broken pipe"); the next call reconnects."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def once(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return fn(self, *args, **kwargs)
            except libvirt.libvirtError as err:
                if self._lost(err):
                    self._drop()
                    raise HypervisorConnectionLost(self.uri, err.get_error_message()) from err
                raise HypervisorError(f"{fn.__name__}: {err.get_error_message()}") from err
            except (NotFound, HypervisorUnreachable):
                raise
            except HypervisorError as err:
                cause = err.__cause__
                if self._lost(cause):
                    self._drop()
                    msg = (
                        cause.get_error_message()
                        if isinstance(cause, libvirt.libvirtError)
                        else err
                    )
                    raise HypervisorConnectionLost(self.uri, msg) from err
                raise

        @functools.wraps(fn)
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return once(self, *args, **kwargs)
            except HypervisorConnectionLost:
                if fn.__name__ not in _READ_ONLY:
                    raise  # an action's fate is unknown: the caller cleans up
                self.reconnect(wait=30)
                return once(self, *args, **kwargs)  # a read is safe to ask again

        return call

    for attr, value in list(vars(cls).items()):
        if callable(value) and not attr.startswith("_") and attr not in ("close", "reconnect"):
            setattr(cls, attr, wrap(value))
    return cls
