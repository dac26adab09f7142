"""The agent's own control-socket topics (agent/adapters/control.py carries them).

signals   current values with their age, unit, and whether they are counters/checksums
buses     per-bus state and rates          uplink, outbox   the MQTT link and the queue
commands  recent commands and statuses     status           what the status file holds
watch     a stream of changed values (and bus counters) every interval_s
diag      diag.read_dtcs / clear_dtcs / read_data run by the agent's own diagnostics service
          ({"name": "diag.read_dtcs", "params": {...}}; the same scheduler, spacing and
          preconditions as a remote command, answered to the caller only)

`signals` reads the core's snapshot view (as `monitor --direct` always has); the others read
the status the core thread takes every second, or at once for a `status` request
(agent.last_status, agent.fresh_status), and `commands` the replay
store through a read-only SQLite connection of its own: never the core's objects or the
outbox's connection.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import time

from ..core.cose import decode_unverified

log = logging.getLogger("agent.app.control")

RECENT_COMMANDS = 20
# Names a DBC gives rolling counters and checksums (no DBC attribute marks them).
_HIDDEN = re.compile(r"(counter|checksum|crc|chksum)\d*(_lsb|_msb)?$", re.I)


def start_control(agent):
    """The agent's control socket with its topics, or None (logged) where it cannot be had:
    the agent runs on without it."""
    from ..adapters.control import ControlServer
    from ..errors import ControlError

    cfg = agent.config.control
    if not cfg.enabled:
        return None
    server = ControlServer(cfg.socket, cfg.group)
    install(server, agent)
    try:
        return server.start()
    except (ControlError, OSError) as e:
        log.warning("no control socket (tcu-agent status/monitor will not see this agent; "
                    "set control.socket): %s", e)
        return None


def install(server, agent) -> None:
    metas: list[dict] = []  # built on the first request for signals, not before ready

    def meta() -> dict:
        if not metas:
            metas.append(signal_meta(agent))
        return metas[0]

    def identity() -> dict:
        return {"vin": agent.config.vehicle.vin, "storage_dir": str(agent.config.storage.dir)}

    def status(_req=None) -> dict:
        # Taken by the core thread for this request (within a pass, ~0.1 s), not the one
        # it wrote up to a second ago.
        last = agent.fresh_status()
        return {**identity(), **(last or {"running": True, "buses": []})}

    def signals(_req=None) -> dict:
        now_ms = int(time.time() * 1000)
        out = {}
        for name, (t_ms, value) in sorted(agent.snapshot().items()):
            out[name] = {"value": value, "t_ms": t_ms,
                         "age_s": round((now_ms - t_ms) / 1000, 3) if t_ms >= 0 else None,
                         **meta().get(name, {})}
        return {**identity(), "t_ms": now_ms, "signals": out}

    def section(key: str):
        return lambda _req=None: {**identity(), key: status().get(key)}

    def watch(req: dict):
        interval = float(req.get("interval_s", 0.5))
        if not 0.05 <= interval <= 60:
            raise ValueError("interval_s: 0.05 .. 60 seconds")
        return _watch(signals, status, interval)

    server.register("status", status)
    server.register("signals", signals)
    server.register("buses", section("buses"))
    server.register("uplink", section("uplink"))
    server.register("outbox", section("outbox"))
    server.register("commands", lambda _req=None: {**identity(), **commands(agent)})
    server.register("watch", watch)

    diag = next((h for h in (agent.commands.handlers if agent.commands else ())
                 if h.family.name == "diag"), None)

    def diagnostics(req: dict) -> dict:
        if diag is None:
            raise ValueError("this agent runs no diagnostics ([diagnostics] with [mqtt] and "
                             "[commands])")
        name = req.get("name")
        if name not in ("diag.read_dtcs", "diag.clear_dtcs", "diag.read_data"):
            raise ValueError("name: diag.read_dtcs, diag.clear_dtcs or diag.read_data")
        params = req.get("params") or {}
        if not isinstance(params, dict):
            raise ValueError("params: a table")
        return {**identity(), **diag.ask(name, params)}

    server.register("diag", diagnostics)


def _watch(signals, status, interval: float):
    last: dict = {}
    while True:
        snap = signals()
        changed = {k: v for k, v in snap["signals"].items()
                   if k not in last or last[k] != (v["t_ms"], v["value"])}
        last = {k: (v["t_ms"], v["value"]) for k, v in snap["signals"].items()}
        yield {"t_ms": snap["t_ms"], "vin": snap["vin"], "signals": changed,
               "buses": status().get("buses", [])}
        time.sleep(interval)


def signal_meta(agent) -> dict:
    """{output name: {"unit", "message", "signal", "hidden"}} from the plans and the config."""
    named = set()
    for action in (agent.config.commands.action if agent.config.commands else ()):
        for frame in action.frame:
            named.update(n for n in (frame.counter, frame.checksum) if n)
    meta = {}
    for plan in agent.plans:
        for mplan in plan.selected.values():
            for spec in mplan.signals:
                try:
                    sig = mplan.message.get_signal_by_name(spec.signal)
                except KeyError:
                    continue
                unit = "" if spec.map is not None else (sig.unit or "")
                hidden = spec.signal in named or bool(_HIDDEN.search(spec.signal)) or \
                    bool(sig.comment and re.search(r"\b(rolling counter|checksum|crc)\b",
                                                   sig.comment, re.I))
                meta[spec.out] = {"unit": unit, "message": spec.message,
                                  "signal": spec.signal, "hidden": hidden}
    return meta


def commands(agent) -> dict:
    """The latest statuses of recently received commands, newest first (from the replay
    store, through a read-only connection of this thread's own)."""
    st = agent.last_status or {}
    out = {"counters": st.get("counters", {}), "recent": []}
    if agent.commands is None:
        return out
    path = agent.config.storage.dir / "replay.db"
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
        try:
            rows = db.execute("SELECT id, recorded_ms, status FROM seen ORDER BY recorded_ms "
                              "DESC LIMIT ?", (RECENT_COMMANDS,)).fetchall()
        finally:
            db.close()
    except sqlite3.Error as e:
        out["error"] = f"{path}: {e}"
        return out
    for cid, recorded_ms, blob in rows:
        entry = {"id": cid, "received_ms": recorded_ms}
        if blob is not None:
            try:
                body = decode_unverified(bytes(blob))[2]
            except Exception:
                body = {}
            entry.update({k: body[k] for k in ("status", "reason", "detail", "t") if k in body})
        out["recent"].append(entry)
    return out
