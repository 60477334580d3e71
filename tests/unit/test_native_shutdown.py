"""The native driver's shutdown over a stand-in libvirt domain: a guest the agent's shutdown
takes down at once makes libvirt's ACPI fallback fail with "domain is not running" (seen on a
real group stop); off is what was asked, so that is no error. A refusal of a domain still
running is one."""

from __future__ import annotations

import libvirt
import pytest

from vmkeep.errors import HypervisorError
from vmkeep.hypervisor.native import LibvirtHypervisor


def _error(code: int, message: str) -> libvirt.libvirtError:
    err = libvirt.libvirtError(message)
    err.err = (code, 0, message, 0, "", "", "", 0, 0)  # what libvirt fills from its last error
    return err


class Dom:
    def __init__(self, goes_down: bool) -> None:
        self.active, self.goes_down = True, goes_down

    def isActive(self) -> bool:  # noqa: N802 (libvirt's name)
        return self.active

    def destroy(self) -> None:
        self.shutdownFlags(0)  # the same race: off between the check and the call

    def shutdownFlags(self, _flags: int) -> None:  # noqa: N802
        if self.goes_down:
            self.active = False  # the agent's poweroff was quicker than libvirt's fallback
        raise _error(
            libvirt.VIR_ERR_OPERATION_INVALID,
            "Requested operation is not valid: domain is not running",
        )


def _hv(dom: Dom) -> LibvirtHypervisor:
    hv = LibvirtHypervisor("test:///nowhere")
    hv._dom = lambda _name: dom  # type: ignore[method-assign]
    return hv


def test_a_guest_already_off_after_the_shutdown_call_is_no_error() -> None:
    dom = Dom(goes_down=True)
    _hv(dom).shutdown("web")
    assert not dom.active


def test_a_refused_shutdown_of_a_running_guest_is_an_error() -> None:
    with pytest.raises(HypervisorError, match="shutdown web: Requested operation is not valid"):
        _hv(Dom(goes_down=False)).shutdown("web")


def test_a_guest_that_powered_off_before_its_destroy_is_no_error() -> None:
    dom = Dom(goes_down=True)
    _hv(dom).destroy("web")  # a group stop --force after its timeout: the guest just went down
    assert not dom.active
    with pytest.raises(HypervisorError, match="destroy web"):
        _hv(Dom(goes_down=False)).destroy("web")
