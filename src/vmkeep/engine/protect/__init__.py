"""Taking a restore point of one VM: what to take (``plan``), where QEMU writes it (``staging``),
the steps of one VM's backup in flight (``member``, shared with a group backup) and the command
that runs them or cancels them (``backup``). Imports ``core``, ``vm`` and ``points`` (retention
after a backup)."""
