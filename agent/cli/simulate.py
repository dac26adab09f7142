"""`tcu-agent simulate`: the simulated EV on any python-can interface, standalone."""

from __future__ import annotations


def add_parser(sub, common) -> None:
    p = sub.add_parser("simulate", help="run the simulated EV on a CAN bus",
                       description="Run the simulated electric vehicle (dbc/demo_ev.dbc): "
                                   "ECUs sending at their cycle times and reacting to the "
                                   "telematics unit's requests. Ctrl-C to stop.")
    p.add_argument("--interface", default="socketcan", help="python-can interface (socketcan)")
    p.add_argument("--channel", default="vcan0", help="channel (vcan0)")
    p.add_argument("-c", "--config", help="take the [simulator] settings from this config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import logging
    import time

    import can

    from ..errors import BusError, ConfigError
    from ..sim import from_config
    from ..sim.runner import SimulatorThread

    if args.duration is not None and not args.duration > 0:
        raise ConfigError(f"--duration: must be > 0 seconds, got {args.duration}")
    vehicle = from_config(_simulator_config(args.config, args.set))
    try:
        thread = SimulatorThread(vehicle, args.interface, args.channel)
    except (can.CanError, OSError, ValueError, ImportError) as e:
        raise BusError(f"cannot open {args.interface} {args.channel}: {e}") from None
    thread.start()
    log = logging.getLogger("agent.sim")
    log.info("simulated EV on %s %s", args.interface, args.channel)
    end = time.monotonic() + args.duration if args.duration else None
    try:
        while thread.running and (end is None or time.monotonic() < end):
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        thread.stop()
    s = thread.vehicle.state
    log.info("stopped: %d frames sent; soc %.1f %%, %s", thread.frames_sent, s.soc,
             "charging" if s.charging else "not charging")
    return 1 if thread.error else 0  # the thread has logged what went wrong


def _simulator_config(path, overrides):
    """[simulator] from the config file, or from the defaults; `--set` applies to both."""
    from pathlib import Path

    from ..config import SimulatorConfig, apply_override, build_section, load_config
    from ..errors import ConfigError

    if path:
        return load_config(path, overrides).simulator or SimulatorConfig()
    raw: dict = {}
    for item in overrides:
        if not item.partition("=")[0].strip().startswith("simulator."):
            raise ConfigError(f"--set {item!r}: without -c only simulator.* settings apply")
        apply_override(raw, item)
    return build_section(SimulatorConfig, raw.get("simulator", {}), "simulator", Path.cwd())
