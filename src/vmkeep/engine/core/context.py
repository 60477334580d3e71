"""What every engine call needs: config, catalog, hypervisor; opened lazily, passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from vmkeep.config import Config

if TYPE_CHECKING:  # loaded when first used: a command that needs neither never imports them
    from vmkeep.catalog import Catalog
    from vmkeep.hypervisor import Hypervisor


@dataclass
class Context:
    config: Config
    _hv: Hypervisor | None = field(default=None, repr=False)

    @cached_property
    def catalog(self) -> Catalog:
        from vmkeep.catalog import Catalog

        return Catalog(self.config.catalog_url)

    @property
    def hv(self) -> Hypervisor:
        if self._hv is None:
            from vmkeep.hypervisor import connect

            self._hv = connect(self.config.libvirt.uri)
        return self._hv

    @property
    def agent_timeout(self) -> float:
        return self.config.agent.timeout
