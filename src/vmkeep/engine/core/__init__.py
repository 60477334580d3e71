"""The ground floor of the engine: what every action stands on.

The engine ``Context`` (config, catalog, hypervisor, datastores), the job queue (``jobs``), the
state sets (``states``), chains of stored increments (``chains``), image files (``images``),
the datastore rows and their drivers (``stores``), the names shell completion offers
(``refs``), the places an operator may act in (``trust``), free-space checks (``space``), a
VM's backup policy (``backup_config``) and small step helpers (``steps``). Nothing here imports
another engine room.
"""
