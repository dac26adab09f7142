"""`tcu-agent status -c CONFIG`: what the running agent sees, read from its status file."""

from __future__ import annotations

import json
import time


def add_parser(sub, common) -> None:
    p = sub.add_parser("status", help="state of the running agent",
                       description="Connection, broker, outbox depth, last acknowledged seq and "
                                   "per-bus counters of the agent running with this config "
                                   "(from its status file under storage.dir). Exit 1 when no "
                                   "agent is running.")
    p.add_argument("-c", "--config", required=True, help="agent config file (TOML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..adapters.statusfile import read_status
    from ..config import load_config

    config = load_config(args.config, args.set)
    status, why = read_status(config.storage.dir)
    if status is None:
        print(f"tcu-agent status: {why}")
        return 1
    if args.json:
        print(json.dumps(status, indent=1))
        return 0
    print(render(status))
    return 0


def render(s: dict) -> str:
    now = time.time() * 1000
    lines = [f"agent     pid {s.get('pid')}, vin {s.get('vin')}, up "
             f"{_dur((now - s.get('started_ms', now)) / 1000)}"]
    up = s.get("uplink")
    if up:
        lines.append(f"uplink    {up.get('state')} to {up.get('broker')}"
                     f"{' (TLS)' if up.get('tls') else ''}, MQTT {up.get('protocol') or '-'}, "
                     f"connects {up.get('connects')}, in flight {up.get('inflight')}"
                     + (f", last error: {up['last_error']}" if up.get("last_error") else ""))
    ob = s.get("outbox")
    if ob:
        oldest = ob.get("oldest_ms")
        age = f", oldest {_dur((now - oldest) / 1000)} old" if oldest else ""
        lines.append(f"outbox    {ob.get('messages')} messages, {ob.get('bytes'):,} bytes{age}; "
                     f"last acked seq {ob.get('last_acked_seq')}, next seq {ob.get('next_seq')}, "
                     f"dropped samples {ob.get('dropped_samples')}")
    for key in ("modem", "gnss"):
        if s.get(key):
            shown = ", ".join(f"{k} {v}" for k, v in s[key].items() if v not in (None, "", {}))
            lines.append(f"{key:<10}{shown}")
    for name, value in sorted((s.get("counters") or {}).items()):
        lines.append(f"{name:<10}{value}")
    for b in s.get("buses", []):
        lines.append(f"bus {b['name']:<6}{b['state']} {b['interface']}:{b['channel']}  frames "
                     f"{b['frames']} ({b['fps']:.0f}/s), unknown ids {b['unknown_ids']}, decode "
                     f"errors {b['decode_errors']}, bad length {b['bad_length']}, bus errors "
                     f"{b['bus_errors']}, reopens {b['reopens']}"
                     + (f", last error: {b['last_error']}" if b.get("last_error") else ""))
    return "\n".join(lines)


def _dur(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
