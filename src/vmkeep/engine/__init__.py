"""The engine: dispatch (state machine), backup, restore, retention, groups. Adapters call in here."""
