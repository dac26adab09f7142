"""`tcu-agent modem -c CONFIG`: ask the modem on [modem] port who it is and how it is connected.

Works without a running agent (it opens the port itself; stop the agent first if it holds
the port). `--at "AT+..."` sends one raw command and prints the answer, for field debugging.
"""

from __future__ import annotations

import json
import sys

FIELDS = [("model", "Model"), ("imei", "Imei"), ("iccid", "Iccid"),
          ("signal_dbm", "SignalStrength"), ("registration", "Registration"),
          ("access_technology", "AccessTechnology"), ("operator", "Operator"),
          ("area_code", "AreaCode"), ("cell_id", "CellId")]


def add_parser(sub, common) -> None:
    p = sub.add_parser("modem", help="modem identity, signal, registration and operator",
                       description="Open the modem's AT port named by [modem] in the config "
                                   "and print model, IMEI, ICCID, signal (dBm), registration "
                                   "and operator; or send one raw AT command with --at.")
    p.add_argument("-c", "--config", required=True, help="agent config file (TOML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (e.g. modem.port=/dev/ttyUSB3)")
    p.add_argument("--at", metavar="COMMAND", help='send one AT command, e.g. --at "AT+CPIN?"')
    p.add_argument("--json", action="store_true", help="machine-readable output")
    common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..adapters.modem import ModemPoller
    from ..config import load_config
    from ..errors import ConfigError

    config = load_config(args.config, args.set)
    if config.modem is None:
        raise ConfigError(f"{args.config}: no [modem] section (add [modem] port = "
                          "\"/dev/ttyUSB2\", the modem's AT port)")
    modem = ModemPoller(config.modem, on_values=lambda t, v: None)
    if args.at:
        result = modem.raw(args.at)
        if args.json:
            print(json.dumps({"command": result.command, "lines": list(result.lines),
                              "result": result.final, "error": result.error}, indent=1))
        else:
            for line in result.lines:
                print(line)
            print(result.describe())
        return 0 if result.ok else 1
    values = modem.query_once()
    info = {key: values.get("Vehicle.Connectivity." + name) for key, name in FIELDS}
    if args.json:
        print(json.dumps({**info, "port": config.modem.port, "values": values}, indent=1))
        return 0
    signal = info["signal_dbm"]
    print(f"modem         {info['model'] or '-'} on {config.modem.port}")
    print(f"IMEI          {info['imei'] or '-'}")
    print(f"ICCID         {info['iccid'] or '- (no SIM?)'}")
    print(f"signal        {f'{signal} dBm' if signal is not None else 'unknown'}")
    print(f"registration  {info['registration'] or '-'}"
          + (f" ({info['access_technology']})" if info["access_technology"] else ""))
    print(f"operator      {info['operator'] or '-'}")
    if info["cell_id"]:
        print(f"cell          {info['cell_id']} in area {info['area_code'] or '-'}")
    return 0


if __name__ == "__main__":  # until "modem" is in agent.cli.main.COMMANDS
    from . import main as _main

    if "modem" not in _main.COMMANDS:
        _main.COMMANDS.append("modem")
    sys.exit(_main.main(["modem", *sys.argv[1:]]))
