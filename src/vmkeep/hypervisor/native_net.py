"""libvirt networks for ``LibvirtHypervisor`` (``native.py``): create, destroy and list the
isolated networks a group drill boots its members on (``engine/groups/drill.py``)."""

from __future__ import annotations

import libvirt

from vmkeep.errors import HypervisorError


class LibvirtNetworks:
    """The network half of ``LibvirtHypervisor`` (a mixin: it uses the class's connection)."""

    uri: str

    @property
    def conn(self) -> libvirt.virConnect:  # LibvirtHypervisor's own
        raise NotImplementedError

    def network_create(self, xml: str) -> str:
        try:
            return str(self.conn.networkCreateXML(xml).name())
        except libvirt.libvirtError as err:
            raise HypervisorError(f"create network: {err.get_error_message()}") from err

    def network_destroy(self, name: str) -> None:
        try:
            net = self.conn.networkLookupByName(name)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
                return
            raise HypervisorError(f"network {name}: {err.get_error_message()}") from err
        try:
            if net.isActive():
                net.destroy()
            if net.isPersistent():
                net.undefine()
        except libvirt.libvirtError as err:
            if err.get_error_code() != libvirt.VIR_ERR_NO_NETWORK:  # gone meanwhile: done
                raise HypervisorError(f"remove network {name}: {err.get_error_message()}") from err

    def networks(self) -> dict[str, str]:
        out = {}
        try:
            nets = self.conn.listAllNetworks(0)
        except libvirt.libvirtError as err:
            raise HypervisorError(f"list networks: {err.get_error_message()}") from err
        for net in nets:
            try:
                out[net.name()] = net.XMLDesc(0)
            except libvirt.libvirtError as err:
                if err.get_error_code() != libvirt.VIR_ERR_NO_NETWORK:
                    raise HypervisorError(f"list networks: {err.get_error_message()}") from err
        return out

    def network_bridge(self, name: str) -> str:
        try:
            return str(self.conn.networkLookupByName(name).bridgeName())
        except libvirt.libvirtError as err:
            raise HypervisorError(f"network {name}: {err.get_error_message()}") from err
