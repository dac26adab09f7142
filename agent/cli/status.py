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
                                   "per-bus counters of the agent running with this config: "
                                   "asked through its control socket (control.socket), else "
                                   "read from its status file under storage.dir. Exit 1 when "
                                   "no agent is running.")
    p.add_argument("-c", "--config", required=True, help="agent config file (TOML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true",
                   help="print the raw status as JSON (errors too: {\"error\": ...})")
    common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config

    config = load_config(args.config, args.set)
    status, source = fetch(config)
    if status is None:
        if args.json:
            print(json.dumps({"error": source}))
        else:
            print(f"tcu-agent status: {source}")
        return 1
    if args.json:
        print(json.dumps({**status, "source": source}, indent=1, default=str))
        return 0
    print(render(status))
    print(_row("source", source))
    return 0


def fetch(config) -> tuple[dict | None, str]:
    """(status, where it came from) from the control socket, else the status file;
    (None, why) when no agent is running."""
    from ..adapters.control import ControlClient
    from ..adapters.statusfile import read_status
    from ..errors import ControlError
    from .monitor import check_identity

    sock = config.control.socket
    try:
        with ControlClient(sock) as client:
            status = client.request("status")
            check_identity(status, config)
            status["signals"] = client.request("signals")["signals"]  # values, for --json
        return status, f"the agent, via its control socket {sock}"
    except ControlError as e:
        why = str(e)
    status, file_why = read_status(config.storage.dir)
    if status is None:
        return None, file_why if "no agent is running" in file_why else f"{file_why}; {why}"
    return status, f"the status file in {config.storage.dir} (control socket: {why})"


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
    key = s.get("key")
    if isinstance(key, dict) and key.get("kid"):
        alg = {-8: "EdDSA", -7: "ES256"}.get(key.get("alg"), key.get("alg"))
        lines.append(_row("key", f"kid {key['kid']} ({alg})"
                          + (f", rotated from {key['prev']}" if key.get("prev") else "")))
    lines += _clock(s.get("clock"))
    lines += _trust(s.get("trust"))
    lines += _power(s.get("power"), now)
    lines += _commands(s)
    lines += _update(s.get("update"))
    lines += _campaigns(s.get("campaign"), s.get("outbox_campaigns") or {})
    for key in ("modem", "gnss"):
        section = s.get(key)
        if isinstance(section, dict):
            shown = ", ".join(f"{k} {v}" for k, v in section.items()
                              if k not in ("values", "recovery") and v not in (None, "", {}))
            lines.append(_row(key, shown))
            if key == "modem":
                lines += _link(s.get("link_recovery"))
            lines += _table(section.get("values") or {})
    for b in s.get("buses", []):
        lines.append(_row(f"bus {b['name']}",
                     f"{b['state']} {b['interface']}:{b['channel']}  frames "
                     f"{b['frames']} ({b['fps']:.0f}/s), unknown ids {b['unknown_ids']}, decode "
                     f"errors {b['decode_errors']}, bad length {b['bad_length']}, bus errors "
                     f"{b['bus_errors']}, reopens {b['reopens']}"
                     + (f", kernel drops {b['kernel_drops']}"
                        if b.get("kernel_drops") is not None else "")
                     + (f", listen-only (sends refused {b.get('refused_sends', 0)})"
                        if b.get("listen_only") else "")
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


def _clock(c) -> list[str]:
    if not isinstance(c, dict):
        return []
    floor = c.get("floor_ms") or 0
    when = (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(floor / 1000)) if floor else "none yet")
    text = f"{c.get('clock')}"
    if c.get("clock") == "behind":
        text += (f": the system clock is {_dur((c.get('behind_ms') or 0) / 1000)} behind the "
                 f"time floor; checks use the floor")
    text += f", floor {when}" + (f" (from {c['floor_source']})" if floor else "")
    if c.get("gnss_skew_ms") is not None:
        text += f", system - GNSS {c['gnss_skew_ms']:+d} ms"
        if c.get("gnss_skew_warning"):
            text += " (OFF BY MORE THAN THE ALLOWED SKEW)"
    return [_row("clock", text)]


def _trust(t) -> list[str]:
    if not isinstance(t, dict) or not t:
        return []
    source = t.get("source")
    text = (f"version {t.get('version')} from {source}" if source == "tuf" or t.get("version")
            else f"factory store {source}")
    if t.get("target"):
        text += f" (target {t['target']})"
    if t.get("refreshing"):
        text += ", refreshing"
    if t.get("last_error"):
        text += f", last refresh failed: {t['last_error']}"
    return [_row("trust", text)]
def _power(p, now: float) -> list[str]:
    """The power state (README "Power") and the link recovery, when configured."""
    if not isinstance(p, dict):
        return []
    text = f"{p.get('state')} for {_dur((now - (p.get('since_ms') or now)) / 1000)} " \
           f"({p.get('reason')})"
    if p.get("volts") is not None:
        text += f", 12 V battery {p['volts']:.2f} V"
    text += f", heartbeats {p.get('heartbeats', 0)}, dropped samples {p.get('dropped_samples', 0)}"
    if p.get("on_sleep"):
        text += f", on-sleep command {p['on_sleep'].get('last')}"
    return [_row("power", text)]


def _link(r) -> list[str]:
    if not isinstance(r, dict):
        return []
    if "steps" not in r:
        return [_row("link", str(r.get("state")))]
    steps = ", ".join(f"{k} {v}" for k, v in (r.get("steps") or {}).items())
    text = f"recovery {r.get('state')}: steps {steps}; capped {r.get('capped')}, " \
           f"recoveries {r.get('recoveries')}"
    if r.get("last_step"):
        text += f", last {r['last_step']}"
    if r.get("power_cycle"):
        text += f", power cycle {r['power_cycle'].get('last')}"
    return [_row("link", text)]


def _update(u) -> list[str]:
    if not isinstance(u, dict):
        return []
    text = f"{u.get('state')}, installed {u.get('installed_version')}"
    if u.get("target") or u.get("version"):
        text += f", target {u.get('target')} version {u.get('version')}"
    if u.get("reason"):
        text += f", last {u['reason']}" + (f": {u['detail']}" if u.get("detail") else "")
    return [_row("update", text)]


def _campaigns(c, outbox: dict) -> list[str]:
    """One line per applied campaign: state, firings, bytes in its buffers and the outbox."""
    rows = c.get("campaigns") if isinstance(c, dict) else None
    if not rows:
        return []
    lines = [_row("campaigns", f"{len(rows)} applied")]
    for r in rows:
        text = (f"{r.get('id')} v{r.get('version')} {r.get('state')} {r.get('kind')}, priority "
                f"{r.get('priority')}, firings {r.get('firings')}, batches {r.get('batches')}, "
                f"held {r.get('held_bytes', 0):,} bytes in buffers, "
                f"{outbox.get(r.get('id'), 0):,} in the outbox")
        if r.get("ring_overflow"):
            text += f", ring overflow {r['ring_overflow']}"
        lines.append(f"  {text}")
    return lines


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
