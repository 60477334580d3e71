"""Backup datastores: one driver contract (base.py), one module per driver."""

from vmkeep.datastores import dir as _dir  # noqa: F401  (registers the driver)
from vmkeep.datastores.base import REGISTRY, DatastoreDriver, make_driver

__all__ = ["REGISTRY", "DatastoreDriver", "make_driver"]
