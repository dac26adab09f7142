"""`tcu-agent monitor -c CONFIG`: live table of the running agent's values and bus rates.

By default through the agent's control socket (what the agent itself sees); `--direct` opens
the configured buses in this process instead (no agent needed, or a second opinion), and says
so on screen.
"""

from __future__ import annotations

import json
import shutil
import sys
import time

VALUE_W = 20
AGE_W = 8


def add_parser(sub, common) -> None:
    p = sub.add_parser("monitor", help="live table of the running agent's signals and bus rates",
                       description="Show the running agent's latest signal values (with units "
                                   "and age) and per-bus counters, refreshed in place, read "
                                   "through its control socket (control.socket). --direct "
                                   "opens the buses itself instead. Rolling counters and "
                                   "checksums are hidden unless --all. Ctrl-C to quit.")
    p.add_argument("-c", "--config", required=True, help="agent config file (TOML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--interval", type=float, default=0.5, help="refresh period in s (0.5)")
    p.add_argument("--once", action="store_true",
                   help="print one table and exit (for scripts; --direct: after --interval)")
    p.add_argument("--direct", action="store_true",
                   help="open the configured buses in this process, not the agent's view")
    p.add_argument("--all", action="store_true", help="also show counters and checksums")
    common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config
    from ..errors import ConfigError

    if not args.interval > 0:
        raise ConfigError(f"--interval {args.interval}: must be a positive number of seconds")
    config = load_config(args.config, args.set)
    from ..adapters.canbus import check_interface
    for i, bus in enumerate(config.bus):  # a config no agent could run is the first error
        check_interface(bus, f"{config.path}: bus.{i}")
    source = _Direct(config) if args.direct else _Socket(config)
    tty = sys.stdout.isatty()
    try:
        if args.direct:
            time.sleep(args.interval)  # let the buses deliver something first
        while True:
            header, buses, signals = source.read()
            table = render(header, buses, signals, width=shutil.get_terminal_size((120, 24)).columns,
                           show_all=args.all)
            if tty and not args.once:
                sys.stdout.write("\x1b[H\x1b[2J" + table)  # home + clear: refresh in place
            else:
                sys.stdout.write(table + "\n")
            sys.stdout.flush()
            if args.once:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
    finally:
        source.close()


class _Socket:
    def __init__(self, config):
        from ..adapters.control import ControlClient
        from ..errors import ControlError

        self.config = config
        try:
            self.client = ControlClient(config.control.socket)
            first = self.client.request("signals")
        except ControlError as e:
            raise ControlError(f"{e} (`tcu-agent monitor --direct` opens the buses "
                               "itself)") from None
        check_identity(first, config)

    def read(self):
        sig = self.client.request("signals")
        buses = self.client.request("buses").get("buses") or []
        header = (f"tcu-agent monitor  vin {sig['vin']}  {time.strftime('%H:%M:%S')}  "
                  f"the running agent, via {self.config.control.socket}")
        return header, buses, sig["signals"]

    def close(self):
        self.client.close()


class _Direct:
    def __init__(self, config):
        from ..app.controltopics import signal_meta
        from ..app.runtime import Agent

        self.agent = Agent(config, publish=False)
        self.meta = signal_meta(self.agent)
        self.agent.start()
        sim = config.simulator is not None and config.simulator.enabled
        self.label = ("DIRECT: this monitor opened the buses itself, not the running agent's "
                      "view" + ("\n(and started its own simulated EV on them)" if sim else ""))

    def read(self):
        now_ms = int(time.time() * 1000)
        signals = {name: {"value": value, "t_ms": t_ms,
                          "age_s": (now_ms - t_ms) / 1000 if t_ms >= 0 else None,
                          **self.meta.get(name, {})}
                   for name, (t_ms, value) in self.agent.snapshot().items()}
        header = (f"tcu-agent monitor  vin {self.agent.config.vehicle.vin}  "
                  f"{time.strftime('%H:%M:%S')}\n{self.label}")
        return header, self.agent.bus_status(), signals

    def close(self):
        self.agent.stop()


def check_identity(answer: dict, config) -> None:
    """The agent on the socket must be this config's (another agent may hold the path)."""
    from ..errors import ControlError

    theirs = answer.get("storage_dir")
    if theirs is not None and theirs != str(config.storage.dir):
        raise ControlError(f"the agent on {config.control.socket} runs VIN {answer.get('vin')} "
                           f"with storage.dir {theirs}, not this config's {config.storage.dir}")


def protocol_value(value) -> str:
    """A value as the wire shows it (JSON: true, null, names of value tables as strings)."""
    if isinstance(value, float):
        return f"{value:.7g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


def render(header: str, buses: list, signals: dict, width: int = 120,
           show_all: bool = False) -> str:
    width = max(width, 60)
    lines = [header, ""]
    lines.append(f"{'bus':<12}{'state':<10}{'frames':>10}{'fps':>9}{'unknown':>9}"
                 f"{'errors':>8}{'bus err':>9}{'reopens':>9}")
    for b in buses:
        lines.append(f"{b['name']:<12}{b['state']:<10}{b['frames']:>10}{b['fps']:>9.0f}"
                     f"{b['unknown_ids']:>9}{b['decode_errors']:>8}{b['bus_errors']:>9}"
                     f"{b['reopens']:>9}")
    lines.append("")
    shown = {n: s for n, s in signals.items() if show_all or not s.get("hidden")}
    unit_w = max((len(s.get("unit") or "") for s in shown.values()), default=0)
    values = {n: protocol_value(s.get("value")) for n, s in shown.items()}
    value_w = max(5, min(VALUE_W, max((len(v) for v in values.values()), default=0)))
    longest = max((len(n) for n in shown), default=6)
    name_w = max(8, min(longest, width - value_w - unit_w - AGE_W - 4))
    names = elide_all(sorted(shown), name_w)
    lines.append(f"{'signal':<{name_w}}  {'value':>{value_w}} {'':<{unit_w}} {'age':>{AGE_W - 1}}")
    for name in sorted(shown):
        s = shown[name]
        value = elide(values[name], value_w)
        age = f"{s['age_s']:.1f}s" if s.get("age_s") is not None else "-"
        lines.append(f"{names[name]:<{name_w}}  {value:>{value_w}} "
                     f"{s.get('unit') or '':<{unit_w}} {age:>{AGE_W - 1}}".rstrip())
    hidden = len(signals) - len(shown)
    if hidden:
        lines.append(f"({hidden} counter/checksum signal{'s' if hidden > 1 else ''} hidden; "
                     "--all shows them)")
    return "\n".join(lines) + "\n"


def elide(text: str, width: int, head: int | None = None) -> str:
    """`text` cut to `width` characters by dropping its middle ("Vehicle.Po…Current")."""
    if len(text) <= width:
        return text
    if head is None:
        head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def elide_all(names: list[str], width: int) -> dict[str, str]:
    """Each name elided to `width`, no two alike: a clash moves the cut until they differ,
    and a clash no cut resolves gets a number."""
    width = max(width, 8)
    out = {n: elide(n, width) for n in names}
    clashes = _clashes(out)
    for head in range((width - 1) // 2 - 1, 0, -1):
        if not clashes:
            break
        for n in clashes:
            out[n] = elide(n, width, head)
        clashes = _clashes(out)
    for i, n in enumerate(sorted(clashes)):
        tag = f"#{i + 1}"
        out[n] = elide(n, width - len(tag)) + tag
    return out


def _clashes(shown: dict[str, str]) -> set[str]:
    seen: dict[str, list[str]] = {}
    for name, text in shown.items():
        seen.setdefault(text, []).append(name)
    return {n for group in seen.values() if len(group) > 1 for n in group}
