"""`tcu-agent run -c CONFIG`: the agent itself."""

from __future__ import annotations


def add_parser(sub, common) -> None:
    p = sub.add_parser("run", help="run the agent", description="Run the agent: open the buses, "
                       "decode, sample and batch telemetry.")
    p.add_argument("-c", "--config", required=True, help="agent config file (TOML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. bus.0.channel=vcan1 (repeatable)")
    common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config
    from ..app.runtime import Agent

    config = load_config(args.config, args.set)
    agent = Agent(config)
    return agent.run_forever()
