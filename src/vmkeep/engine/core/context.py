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

    def __post_init__(self) -> None:
        """``[backup]`` holds policy values only the engine can check: a bad one stops every
        command at once, naming the key, not each backup later."""
        from vmkeep.engine.core.backup_config import validate
        from vmkeep.errors import ConfigError, InvalidValue

        for key, value in self.config.backup.layer().items():
            try:
                validate(key, value)
            except InvalidValue as err:
                raise ConfigError(f"[backup] {key}", str(err)) from None

    @cached_property
    def catalog(self) -> Catalog:
        from vmkeep.catalog import Catalog

        return Catalog(self.config.catalog_url)

    @property
    def host(self) -> str | None:
        """The vmkeep host this process acts for (``[cluster] host``, a daemon's ``--host``);
        None: a catalog without hosts, driving ``[libvirt] uri``."""
        return self.config.cluster.host

    def here(self, vm_host: str | None) -> bool:
        """Whether a VM on host ``vm_host`` is this process's to drive (a VM without a host
        is every process's: a catalog without hosts)."""
        return vm_host is None or vm_host == self.host

    @property
    def uri(self) -> str:
        """The libvirt URI this process drives: its host's, else ``[libvirt] uri``."""
        if self.host is None:
            return self.config.libvirt.uri
        from sqlalchemy import select

        from vmkeep.catalog.tables import Host
        from vmkeep.errors import HostNotFound

        with self.catalog.session() as s:
            uri = s.execute(select(Host.uri).where(Host.name == self.host)).scalar()
        if uri is None:
            raise HostNotFound(self.host)
        return str(uri)

    @property
    def hv(self) -> Hypervisor:
        if self._hv is None:
            from vmkeep.hypervisor import connect

            self._hv = connect(self.uri)
        return self._hv

    @property
    def agent_timeout(self) -> float:
        return self.config.agent.timeout
