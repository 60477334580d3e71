"""Taking a restore point of one VM: plan, staging, the libvirt backup job, finishing or
undoing it (``backup``). Imports ``core``, ``vm`` and ``points`` (retention after a backup)."""
