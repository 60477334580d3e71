"""The stored restore points: listing and showing them (``listing``), deleting them or forgetting
a datastore (``delete``), copying and downloading them (``copy``), scanning a datastore and
importing its chains (``scan``), and what to keep (``retention``); ``scratch`` is the folder for
files fetched from a store. Imports ``core`` and ``vm``."""
