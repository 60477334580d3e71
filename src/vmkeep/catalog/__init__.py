"""The catalog: VMs, datastores, backups and increments, jobs and locks (SQLAlchemy + Alembic)."""

from vmkeep.catalog.db import Catalog
from vmkeep.catalog.locks import lock

__all__ = ["Catalog", "lock"]
