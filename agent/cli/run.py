"""`tcu-agent run -c CONFIG`: the agent itself."""

from __future__ import annotations

import gc


def add_parser(sub, common) -> None:
    p = sub.add_parser("run", help="run the agent", description="Run the agent: open the buses, "
                       "decode, sample and batch telemetry.")
    p.add_argument("-c", "--config", required=True, help="agent config file (TOML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. bus.0.channel=vcan1 (repeatable)")
    common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    # Start-up builds ~100,000 objects that live as long as the agent (modules, databases,
    # decoders, config) and almost no garbage: collecting while they are built only walks
    # them again and again (about a tenth of the start-up's CPU). So: what the argument
    # parsing left is collected while the heap is small, the collector is off while the
    # agent is built, and what was built is frozen (out of every later scan) before it is
    # back on.
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        from ..config import load_config
        from ..app.runtime import Agent

        config = load_config(args.config, args.set)
        agent = Agent(config)
    finally:
        gc.freeze()
        if collecting:
            gc.enable()
    return agent.run_forever()
