"""Hypervisor access. Only this package imports ``libvirt`` (lazily, through ``connect``)."""

from vmkeep.hypervisor.base import Hypervisor


def connect(uri: str) -> Hypervisor:
    """The native libvirt hypervisor for ``uri`` (imported lazily: start-up stays fast)."""
    from vmkeep.hypervisor.native import LibvirtHypervisor

    return LibvirtHypervisor(uri)


__all__ = ["Hypervisor", "connect"]
