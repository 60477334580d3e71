"""The engine: every rule of vmkeep, in rooms by concern (see docs/architecture.md). The
adapters (cli/, api/) call it; it calls the lower layers (catalog/, hypervisor/, datastores/)."""
