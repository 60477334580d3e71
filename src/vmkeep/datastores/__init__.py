"""Backup datastores: one driver contract (base.py), one module per driver, retry as a wrapper."""

from vmkeep.datastores import dir as _dir  # noqa: F401  (registers the driver)
from vmkeep.datastores import restic as _restic  # noqa: F401
from vmkeep.datastores import rsync as _rsync  # noqa: F401
from vmkeep.datastores.base import REGISTRY, DatastoreDriver, make_driver

__all__ = ["REGISTRY", "DatastoreDriver", "make_driver"]
