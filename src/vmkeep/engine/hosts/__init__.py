"""Many hosts on one catalog: the hosts vmkeep drives, their states and their daemons'
heartbeats (``records``). Imports only ``core``."""
