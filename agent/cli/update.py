"""`tcu-agent update status -c CONFIG`: installed and staged versions, update state, slots.

Reads the files the agent keeps (storage.dir/update/update-state.json and the slot
directory), so it works whether or not the agent is running.
"""

from __future__ import annotations

import json


def add_parser(sub, common) -> None:
    p = sub.add_parser("update", help="software update state",
                       description="Software updates staged with update.stage / update.activate.")
    usub = p.add_subparsers(dest="update_command", metavar="SUBCOMMAND")
    usub.required = True
    s = usub.add_parser("status", help="installed/staged versions, state, last result",
                        description="Installed and staged versions, the update state machine's "
                                    "state, the last result and the A/B slots, read from disk "
                                    "(the agent need not be running).")
    s.add_argument("-c", "--config", required=True, help="agent config file (TOML)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--json", action="store_true", help="print the status as JSON")
    common(s)
    common(p)
    s.set_defaults(func=run)


def collect(config) -> dict:
    from ..adapters.slots import DirectorySlots
    from ..adapters.updatestate import UpdateStateStore
    from ..core import updates as U

    if config.updates is None:
        from ..errors import ConfigError

        raise ConfigError(f"{config.path}: no [updates] section: updates are not enabled")
    state = UpdateStateStore(config.storage.dir / "update").load() or U.UpdateState()
    report = DirectorySlots(config.slots_dir).report()
    staged = state.version if state.state in (U.STAGED, U.ACTIVATING, U.CONFIRMING) else None
    return {"state": state.state, "command_id": state.command_id, "target": state.target,
            "installed_version": U.installed_version(state, config.updates.installed_version),
            "staged_version": staged, "reason": state.reason, "detail": state.detail,
            "active_slot": report["active"], "pending": report["pending"],
            "slots": report["slots"], "hardware_id": config.updates.hardware_id}


def run(args) -> int:
    from ..config import load_config

    status = collect(load_config(args.config, args.set))
    if args.json:
        print(json.dumps(status, indent=1))
        return 0
    last = status["state"]
    if status["reason"]:
        last += f" {status['reason']}"
    if status["detail"]:
        last += f": {status['detail']}"
    pending = status["pending"]
    lines = [
        f"installed  {status['installed_version']} (hardware {status['hardware_id']})",
        f"staged     {status['staged_version'] or '-'}"
        + (f" ({status['target']})" if status["staged_version"] else ""),
        f"state      {last}" + (f"  [command {status['command_id']}]"
                                 if status["command_id"] else ""),
        f"slots      active {status['active_slot']}"
        + (f", pending {pending['slot']} (starts {pending['boots']}, previous "
           f"{pending['previous']})" if pending else ", nothing pending"),
    ]
    for name, meta in status["slots"].items():
        if meta:
            lines.append(f"  slot {name}  {meta.get('target')} {meta.get('version')} "
                         f"sha256 {str(meta.get('sha256'))[:16]}...")
    print("\n".join(lines))
    return 0
