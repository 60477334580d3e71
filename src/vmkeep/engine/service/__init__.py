"""What the adapters (CLI, API, daemon) reach the engine through: the action table
(``actions``), API tokens (``tokens``), the audit log (``audit``), metrics (``metrics``), the
daemon's work slots (``workers``) and the notifications of finished jobs (``notify``, sent by
``notify_send``). The top room: it may import every other one."""
