"""Command line: thin adapters that parse, call the engine, and render (one module per family)."""
