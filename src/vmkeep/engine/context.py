"""What every engine call needs: config, catalog, hypervisor; opened lazily, passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from vmkeep.catalog import Catalog
from vmkeep.config import Config
from vmkeep.hypervisor import Hypervisor, connect


@dataclass
class Context:
    config: Config
    _hv: Hypervisor | None = field(default=None, repr=False)

    @cached_property
    def catalog(self) -> Catalog:
        return Catalog(self.config.catalog_url)

    @property
    def hv(self) -> Hypervisor:
        if self._hv is None:
            self._hv = connect(self.config.libvirt.uri)
        return self._hv

    @property
    def agent_timeout(self) -> float:
        return self.config.agent.timeout
