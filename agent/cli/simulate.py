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

    from ..config import SimulatorConfig, load_config
    from ..errors import BusError
    from ..sim import from_config
    from ..sim.runner import SimulatorThread

    sim_cfg = SimulatorConfig()
    if args.config:
        sim_cfg = load_config(args.config, args.set).simulator or sim_cfg
    try:
        thread = SimulatorThread(from_config(sim_cfg), args.interface, args.channel)
    except (can.CanError, OSError, ValueError, ImportError) as e:
        raise BusError(f"cannot open {args.interface} {args.channel}: {e}") from None
    thread.start()
    log = logging.getLogger("agent.sim")
    log.info("simulated EV on %s %s", args.interface, args.channel)
    end = time.monotonic() + args.duration if args.duration else None
    try:
        while end is None or time.monotonic() < end:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        thread.stop()
    s = thread.vehicle.state
    log.info("stopped: %d frames sent; soc %.1f %%, %s", thread.frames_sent, s.soc,
             "charging" if s.charging else "not charging")
    return 0
