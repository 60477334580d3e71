"""What the adapters (CLI, API, daemon) reach the engine through: the action table
(``actions``), API tokens (``tokens``), the audit log (``audit``), metrics (``metrics``) and the
daemon's work slots (``workers``). The top room: it may import every other one."""
