"""`tcu-agent status -c CONFIG`: what the running agent sees, read from its status file."""

from __future__ import annotations

import json
import time

LABEL = 9  # width of the first column: the longest fixed label, "commands", and a space
# Counted only once they happen; shown at zero too, since "nothing received" is news.
ESSENTIAL_COUNTERS = ("commands.received", "commands.accepted", "commands.rejected")


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
    lines = [_row("agent", f"pid {s.get('pid')}, vin {s.get('vin')}, up "
                           f"{_dur((now - s.get('started_ms', now)) / 1000)}")]
    if s.get("core_failures"):
        steps = ", ".join(f"{k} {v}" for k, v in (s.get("failures_by_step") or {}).items())
        lines.append(_row("FAILURES", f"{s['core_failures']} in the core loop"
                          + (f" ({steps})" if steps else "") + "; see the agent's log"))
    up = s.get("uplink")
    if up:
        lines.append(_row("uplink", f"{up.get('state')} to {up.get('broker')}"
                          f"{' (TLS)' if up.get('tls') else ''}, MQTT {up.get('protocol') or '-'}, "
                          f"connects {up.get('connects')}, in flight {up.get('inflight')}"
                          + (f", last error: {up['last_error']}" if up.get("last_error") else "")))
    ob = s.get("outbox")
    if ob:
        oldest = ob.get("oldest_ms")
        age = f", oldest {_dur((now - oldest) / 1000)} old" if oldest else ""
        lines.append(_row("outbox", f"{ob.get('messages')} messages, {ob.get('bytes') or 0:,} "
                          f"bytes{age}; last acked seq {ob.get('last_acked_seq')}, next seq "
                          f"{ob.get('next_seq')}, dropped samples {ob.get('dropped_samples')}"
                          + (" (seq restarted from the clock: the outbox and its seq marks "
                             "were lost)" if ob.get("seq_from_clock") else "")))
    lines += _commands(s)
    lines += _update(s.get("update"))
    for key in ("modem", "gnss"):
        section = s.get(key)
        if isinstance(section, dict):
            shown = ", ".join(f"{k} {v}" for k, v in section.items()
                              if k != "values" and v not in (None, "", {}))
            lines.append(_row(key, shown))
            lines += _table(section.get("values") or {})
    for b in s.get("buses", []):
        lines.append(_row(f"bus {b['name']}",
                     f"{b['state']} {b['interface']}:{b['channel']}  frames "
                     f"{b['frames']} ({b['fps']:.0f}/s), unknown ids {b['unknown_ids']}, decode "
                     f"errors {b['decode_errors']}, bad length {b['bad_length']}, bus errors "
                     f"{b['bus_errors']}, reopens {b['reopens']}"
                     + (f", kernel drops {b['kernel_drops']}"
                        if b.get("kernel_drops") is not None else "")
                     + (f", last error: {b['last_error']}" if b.get("last_error") else "")))
    return "\n".join(lines)


def _commands(s: dict) -> list[str]:
    counters = dict(s.get("counters") or {})
    if "trusted_keys" not in s and not counters:
        return []
    lines = []
    if "trusted_keys" in s:
        lines.append(_row("commands", f"trusted keys {s.get('trusted_keys')}, "
                                      f"replay ids {s.get('replay_ids')}"))
        for name in ESSENTIAL_COUNTERS:
            counters.setdefault(name, 0)
    return lines + _table(dict(sorted(counters.items())))


def _update(u) -> list[str]:
    if not isinstance(u, dict):
        return []
    text = f"{u.get('state')}, installed {u.get('installed_version')}"
    if u.get("target") or u.get("version"):
        text += f", target {u.get('target')} version {u.get('version')}"
    if u.get("reason"):
        text += f", last {u['reason']}" + (f": {u['detail']}" if u.get("detail") else "")
    return [_row("update", text)]


def _row(label: str, text: str) -> str:
    return f"{label:<{LABEL}} {text}"


def _table(values: dict) -> list[str]:
    """One `name  value` line per entry, the values aligned after the longest name."""
    width = max((len(str(k)) for k in values), default=0)
    return [f"  {str(k):<{width}}  {v}" for k, v in values.items()]


def _dur(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
