"""A hung agent is a timeout (its command may still run later), never "install the agent"."""

from __future__ import annotations

import libvirt
import pytest

from vmkeep.errors import AgentTimeout, AgentUnavailable, HypervisorError
from vmkeep.hypervisor.libvirt_errors import agent_error

UNRESPONSIVE = libvirt.VIR_ERR_AGENT_UNRESPONSIVE


@pytest.mark.parametrize(
    ("code", "msg", "kind"),
    [
        # seen on a real guest with qemu-ga stopped by SIGSTOP:
        (
            UNRESPONSIVE,
            "Guest agent is not responding: Guest agent not available for now",
            AgentTimeout,
        ),
        (UNRESPONSIVE, "Guest agent disappeared while executing command", AgentTimeout),
        # seen on a guest whose agent channel is disconnected (no qemu-ga running):
        (
            UNRESPONSIVE,
            "Guest agent is not responding: QEMU guest agent is not connected",
            AgentUnavailable,
        ),
        (libvirt.VIR_ERR_OPERATION_INVALID, "domain is not running", AgentUnavailable),
        (libvirt.VIR_ERR_OPERATION_TIMEOUT, "timed out", AgentTimeout),
        (libvirt.VIR_ERR_INTERNAL_ERROR, "boom", HypervisorError),
    ],
)
def test_agent_error_kinds(code: int, msg: str, kind: type) -> None:
    err = agent_error("vm1", "guest-fsfreeze-freeze", 3, code, msg)
    assert type(err) is kind


def test_a_hung_agent_is_not_told_to_install_the_agent() -> None:
    msg = "Guest agent is not responding: Guest agent not available for now"
    text = str(agent_error("vm1", "guest-fsfreeze-freeze", 3, UNRESPONSIVE, msg))
    assert "did not answer" in text and "Install" not in text
