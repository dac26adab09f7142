"""Orchestration: wires the sans-I/O core to the adapters and owns the threads.

Words used here:
- service: an app-layer object on the core thread that executes a core machine's actions
  (CommandService for the command gate and the families' handlers, UpdateService for the
  update state machine). A service is never a thread of its own; what it must not do on the
  core thread it hands to a worker and hears back through the core thread's queue.
- handler (families.py): the executor of one command family, called by CommandService.
- message (messages.py): what other threads put on the core thread's queue.
Threads (bus readers, the MQTT client, serial devices, the update worker) are adapters or
workers, not services.
"""
