"""The stored restore points: listing them (``listing``), deleting, copying, downloading,
scanning and importing them (``stored``), and what to keep (``retention``). Imports ``core``
and ``vm``."""
