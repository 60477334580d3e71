"""A VM as vmkeep keeps it: its catalog row and states (``record``), the inventory (import,
list, show, configure, quiesce, reset-state: ``inventory``), pools and a VM's effective backup
policy (``policy``), the guest-agent freeze and its guard (``quiesce``, ``watchdog``), and
getting a VM out of a state a crash left (``recovery``). Imports only ``core``."""
