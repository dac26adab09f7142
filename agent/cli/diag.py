"""`tcu-agent diag -c CONFIG scan|dtcs|clear|read|obd`: the configured ECUs' diagnostics.

Without `--direct`, dtcs, clear and read ask the running agent through its local control
socket (the agent owns the bus; its diagnostics service runs the request with the same
spacing and preconditions as a remote command). With `--direct` the command opens the bus
itself (the agent must not be running on an interface that cannot be shared, such as slcan);
scan and obd are --direct only.
"""

from __future__ import annotations

import json

from ..errors import AgentError, ConfigError


def add_parser(sub, common) -> None:
    p = sub.add_parser("diag", help="read DTCs and data from the vehicle's ECUs (UDS, OBD-II)",
                       description="Diagnostics over ISO-TP on the ECUs of [diagnostics]: "
                                   "scan (who answers, supported OBD-II PIDs), dtcs [ECU], "
                                   "clear [ECU], read ECU DID, obd PID [ECU].")
    p.add_argument("-c", "--config", required=True, help="agent config file (TOML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--direct", action="store_true",
                   help="open the bus here instead of asking the running agent")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--force", action="store_true",
                   help="clear --direct: the vehicle is parked (preconditions are not read)")
    p.add_argument("action", choices=["scan", "dtcs", "clear", "read", "obd"])
    p.add_argument("args", nargs="*", metavar="ARG", help="ECU / DID / PID, per action")
    common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config

    config = load_config(args.config, args.set)
    if config.diagnostics is None:
        raise ConfigError(f"{args.config}: no [diagnostics] section (no ECUs to ask)")
    want = {"scan": (0, 0), "dtcs": (0, 1), "clear": (0, 1), "read": (2, 2), "obd": (1, 2)}
    lo, hi = want[args.action]
    if not lo <= len(args.args) <= hi:
        usage = {"scan": "scan", "dtcs": "dtcs [ECU]", "clear": "clear [ECU]",
                 "read": "read ECU DID", "obd": "obd PID [ECU]"}[args.action]
        raise ConfigError(f"diag {args.action}: usage: tcu-agent diag -c CONFIG {usage}")
    if not args.direct:
        return via_agent(config, args)
    if args.action == "clear" and not args.force:
        raise ConfigError("diag clear --direct does not read diagnostics.clear_preconditions; "
                          "make sure the vehicle is parked and add --force")
    return Direct(config, args).run()


def via_agent(config, args) -> int:
    """dtcs / clear / read through the running agent's control socket."""
    from ..adapters.control import ControlClient
    from ..errors import ControlError
    from .monitor import check_identity

    if args.action in ("scan", "obd"):
        raise ConfigError(f"diag {args.action} opens the bus itself: add --direct (the running "
                          "agent answers dtcs, clear and read)")
    ecus = {e.name for e in config.diagnostics.ecu}
    if args.action == "read":
        name, params = "diag.read_data", {"ecu": args.args[0], "did": _did(args.args[1])}
        wanted = [args.args[0]]
    else:
        name = "diag.read_dtcs" if args.action == "dtcs" else "diag.clear_dtcs"
        wanted = args.args[:1]
        params = {"ecus": wanted} if wanted else {}
    for e in wanted:
        if e not in ecus:
            raise ConfigError(f"no ECU named {e!r} in [diagnostics] (ECUs: {', '.join(ecus)})")
    try:
        with ControlClient(config.control.socket, timeout=60.0) as client:
            answer = client.request("diag", name=name, params=params)
    except ControlError as e:
        raise AgentError(f"{e}; or use --direct (with the agent stopped, or on a bus the agent "
                         "shares: virtual, socketcan)") from None
    check_identity(answer, config)
    if answer.get("status") != "SUCCEEDED" and not answer.get("result"):
        raise AgentError(f"{name}: {answer.get('status')} {answer.get('reason', '')}: "
                         f"{answer.get('detail', '')}".rstrip(": "))
    result = answer.get("result") or {}
    if args.action == "read":
        results = {result.get("ecu", wanted[0]): result}
    else:
        results = {n: ({"cleared": True, **r} if args.action == "clear" else r)
                   for n, r in (result.get("ecus") or {}).items()}
    print(json.dumps(results, indent=1, sort_keys=True) if args.json
          else render(args.action, results))
    return 0 if any("error" not in r for r in results.values()) else 1


def _did(text: str) -> int:
    try:
        did = int(text, 0)
    except ValueError:
        did = -1
    if not 0 <= did <= 0xFFFF:
        raise ConfigError(f"DID {text!r}: a number 0..65535 (0xF190)")
    return did


class Direct:
    def __init__(self, config, args):
        self.config = config
        self.args = args
        self.ecus = {e.name: e for e in config.diagnostics.ecu}

    def pick(self, name: str | None, protocol: str | None = None) -> list:
        if name is not None and name not in self.ecus:
            raise ConfigError(f"no ECU named {name!r} in [diagnostics] (ECUs: "
                              f"{', '.join(self.ecus)})")
        chosen = [self.ecus[name]] if name else list(self.ecus.values())
        if protocol:
            chosen = [e for e in chosen if e.protocol == protocol]
            if not chosen:
                raise ConfigError(f"no {protocol.upper()} ECU "
                                  f"{'named ' + repr(name) if name else 'configured'}")
        return chosen

    def run(self) -> int:
        from ..adapters import diag as A
        from ..core import diag as D

        a = self.args
        if a.action == "read":
            ecu = self.pick(a.args[0])[0]
            if ecu.protocol != "uds":
                raise ConfigError(f"{ecu.name} speaks OBD-II; read needs a UDS ECU")
            targets, op, arg = [ecu], D.DID, _did(a.args[1])
        elif a.action == "obd":
            try:
                pid = D.pid_number(int(a.args[0], 0) if a.args[0][:1].isdigit() else a.args[0])
            except ValueError as e:
                raise ConfigError(f"PID: {e}") from None
            targets, op, arg = self.pick(a.args[1] if len(a.args) > 1 else None, "obd"), D.PID, pid
        elif a.action == "scan":
            targets, op, arg = self.pick(None), A.PING, None
        else:
            targets = self.pick(a.args[0] if a.args else None)
            op, arg = (D.DTCS if a.action == "dtcs" else D.CLEAR), None
        opened = A.open_buses(self.config, targets, for_agent=False)
        try:
            results = self._ask(opened["links"], targets, op, arg)
        finally:
            for b in opened["buses"]:
                b.close()
        if a.action == "scan":
            results.update(self._functional(targets))
        print(json.dumps(results, indent=1, sort_keys=True) if a.json
              else render(a.action, results))
        return 0 if any("error" not in r and "functional" not in r
                        for r in results.values()) else 1

    def _functional(self, targets) -> dict:
        """OBD-II discovery on each bus with an 11-bit OBD ECU: who answers 0x7DF `01 00`."""
        import can

        from ..adapters import diag as A

        out = {}
        names = {e.response_id: e.name for e in targets if e.protocol == "obd"}
        for bus_name, ecus in A.ecus_by_bus(self.config, targets).items():
            if not any(e.protocol == "obd" and not e.extended for e in ecus):
                continue
            cfg = self.config.bus_named(bus_name)
            filters = [{"can_id": 0x7E8, "can_mask": 0x7F8, "extended": False}]
            bus = can.Bus(interface=cfg.interface, channel=cfg.channel, can_filters=filters,
                          **dict(cfg.options))
            try:
                found = A.scan_functional(bus, self.config.diagnostics.p2_ms / 1000)
            finally:
                bus.shutdown()
            out[f"0x7DF@{bus_name}"] = {"functional": {
                f"0x{rid:03X}": {"ecu": names.get(rid, ""),
                                 "pids": v if isinstance(v, str) else sorted(v)}
                for rid, v in sorted(found.items())}}
        return out

    def _ask(self, links, targets, op, arg) -> dict:
        from ..adapters import diag as A
        from ..core import diag as D

        out = {}
        for e in targets:
            link = links[e.name]
            req = lambda o, x=None: link.execute(D.Request(0, e.name, o, x))  # noqa: E731
            r = req(op, arg)
            if not r.ok:
                out[e.name] = {"error": r.error}
                continue
            if op == D.CLEAR:  # what is left after clearing
                r = req(D.DTCS)
                out[e.name] = {"cleared": True, **({"dtcs": r.value} if r.ok else
                                                   {"error": r.error})}
            elif op == D.DTCS:
                out[e.name] = {"dtcs": r.value}
            elif op == D.DID:
                out[e.name] = {"did": arg, "hex": r.value[0],
                               **({"value": r.value[1]} if r.value[1] is not None else {})}
            elif op == D.PID:
                if arg not in r.value:
                    out[e.name] = {"error": "INVALID_RESPONSE"}
                else:
                    out[e.name] = {"pid": arg, "name": D.PIDS[arg].name, "value": r.value[arg],
                                   "unit": D.PIDS[arg].unit}
            else:  # scan
                out[e.name] = {"answers": r.value, "protocol": e.protocol}
                if e.protocol == "obd":
                    out[e.name]["pids"] = _supported(req)
        return out


def _supported(req) -> list[int] | str:
    from ..core import diag as D

    found: set[int] = set()
    base = 0
    while base is not None:
        r = req(D.SUPPORTED, base)
        if not r.ok:
            return sorted(found) if found else f"not supported ({r.error})"
        found |= r.value - {base + 0x20}
        base = base + 0x20 if base + 0x20 in r.value and base < 0xE0 else None
    return sorted(found)


def render(action: str, results: dict) -> str:
    from ..core import diag as D

    lines = []
    for name, r in results.items():
        if "error" in r and action != "clear":
            lines.append(f"{name:<8} {r['error']}")
            continue
        if action == "scan" and "functional" in r:
            found = r["functional"]
            lines.append(f"{name}: " + (", ".join(
                f"{rid} ({v['ecu'] or 'not configured'})" for rid, v in found.items())
                or "no OBD-II ECU answered"))
            continue
        if action == "scan":
            pids = r.get("pids")
            text = "" if pids is None else (
                f", PIDs: {pids}" if isinstance(pids, str) else
                ", PIDs: " + " ".join(f"{p:02X}" for p in pids) if pids else ", PIDs: none")
            answer = "answers" if r["answers"] == "ok" else f"answers ({r['answers']})"
            lines.append(f"{name:<8} {r['protocol'].upper():<4} {answer}{text}")
        elif action in ("dtcs", "clear"):
            head = f"{name:<8} " + ("cleared; " if r.get("cleared") else "")
            if "error" in r:
                lines.append(head + r["error"])
                continue
            lines.append(head + f"{len(r['dtcs'])} DTC(s)")
            for d in r["dtcs"]:
                lines.append(f"  {d['code']:<10} status 0x{d['status']:02X}  "
                             f"{_status_text(d['status'])}")
        elif action == "read":
            value = f"  {r['value']!r}" if "value" in r else ""
            lines.append(f"{name:<8} DID 0x{r['did']:04X}: {r['hex']}{value}")
        else:
            lines.append(f"{name:<8} {r['name']} (0x{r['pid']:02X}): {r['value']} "
                         f"{D.PIDS[r['pid']].unit}")
    return "\n".join(lines)


_BITS = ("testFailed", "thisCycle", "pending", "confirmed", "notCompletedSinceClear",
         "failedSinceClear", "notCompletedThisCycle", "warningIndicator")


def _status_text(status: int) -> str:
    return ", ".join(b for i, b in enumerate(_BITS) if status >> i & 1)
