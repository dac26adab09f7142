"""Orchestration: wires the sans-I/O core to the adapters and owns the threads."""
