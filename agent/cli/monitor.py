"""`tcu-agent monitor -c CONFIG`: live table of decoded values and per-bus rates."""

from __future__ import annotations


def add_parser(sub, common) -> None:
    p = sub.add_parser("monitor", help="live table of decoded signals and bus rates",
                       description="Open the configured buses and show the selected signals' "
                                   "latest values and per-bus counters, refreshed in place. "
                                   "Ctrl-C to quit.")
    p.add_argument("-c", "--config", required=True, help="agent config file (TOML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--interval", type=float, default=0.5, help="refresh period in s (0.5)")
    p.add_argument("--once", action="store_true",
                   help="print one table after --interval seconds and exit (for scripts)")
    common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import sys
    import time

    from ..config import load_config
    from ..errors import ConfigError
    from ..app.runtime import Agent

    if not args.interval > 0:
        raise ConfigError(f"--interval {args.interval}: must be a positive number of seconds")
    config = load_config(args.config, args.set)
    agent = Agent(config, publish=False)
    agent.start()
    tty = sys.stdout.isatty()
    try:
        while True:
            time.sleep(args.interval)
            table = render(agent)
            if tty and not args.once:
                sys.stdout.write("\x1b[H\x1b[2J" + table)  # home + clear: refresh in place
            else:
                sys.stdout.write(table + "\n")
            sys.stdout.flush()
            if args.once:
                return 0
    except KeyboardInterrupt:
        return 0
    finally:
        agent.stop()


def render(agent) -> str:
    lines = [f"tcu-agent monitor  vin {agent.config.vehicle.vin}  "
             f"{time.strftime('%H:%M:%S')}", ""]
    lines.append(f"{'bus':<12}{'state':<10}{'frames':>10}{'fps':>9}{'unknown':>9}"
                 f"{'errors':>8}{'bus err':>9}{'reopens':>9}")
    for b in agent.bus_status():
        lines.append(f"{b['name']:<12}{b['state']:<10}{b['frames']:>10}{b['fps']:>9.0f}"
                     f"{b['unknown_ids']:>9}{b['decode_errors']:>8}{b['bus_errors']:>9}"
                     f"{b['reopens']:>9}")
    lines.append("")
    lines.append(f"{'signal':<50}{'value':>20}  age")
    now_ms = int(time.time() * 1000)
    for name, (t_ms, value) in sorted(agent.snapshot().items()):
        age = f"{(now_ms - t_ms) / 1000:.1f}s" if t_ms >= 0 else "-"
        shown = "null" if value is None else (f"{value:.7g}" if isinstance(value, float) else str(value))
        lines.append(f"{name[:49]:<50}{shown[:20]:>20}  {age}")
    return "\n".join(lines) + "\n"


import time  # noqa: E402  (render() is also used by tests without run())
