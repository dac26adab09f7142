#!/usr/bin/env python3
"""The parked car: how fast data flows after a start and after a wake, and what a parked
hour costs on the link.

  start: `tcu-agent run` as a new process with the Tesla Model 3 DBC (every signal selected),
         frames arriving over an slcan pseudo-terminal, a local Mosquitto: from Popen to the
         first telemetry message received by a subscriber.        Target < 2 s.
  wake:  an in-process agent on a virtual bus, the same DBC; the feeder stops until the agent
         is asleep, then sends again: from that first frame to the first telemetry message
         received, p50/p99 over --cycles cycles.                   Target < 2 s.
  hour:  the simulated EV (dbc/demo_ev.dbc, configs/demo.toml) on a time-driven core and
         power service, no real hour: MQTT messages and bytes of an awake hour and of a
         parked one (signed records, PUBLISH + PUBACK framing, keepalive pings). Target:
         parked <= 2 % of awake.

    python bench/power.py [--json] [--cycles N] [--only start,wake,hour]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import can  # noqa: E402
import cantools  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402

from agent.adapters.keys import generate_keypair, load_private_key  # noqa: E402
from support.mosquitto import Mosquitto  # noqa: E402

TESLA = Path(os.environ.get("TCU_SHARED_DATA", ROOT.parent / "shared" / "data")) / \
    "tesla_model3.dbc"
VIN = "BENCH000000000001"


def tesla_frames(db) -> list[tuple[int, bool, bytes]]:
    """One frame of every classic-CAN message: (id, extended, data)."""
    out = []
    for i, m in enumerate(db.messages):
        if m.length <= 8:
            data = bytes((i * 7 + k) & 0xFF for k in range(m.length))
            out.append((m.frame_id, m.is_extended_frame, data))
    return out


class Arrivals:
    """A subscriber to the vehicle's telemetry: monotonic arrival times."""

    def __init__(self, port: int):
        self.times: list[float] = []
        self.ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"b-{uuid.uuid4().hex[:8]}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"vehicles/{VIN}/telemetry", 1)
        self.client.on_subscribe = lambda c, u, m, rc, p: self.ready.set()
        self.client.on_message = lambda c, u, msg: self.times.append(time.monotonic())
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self.ready.wait(5):
            raise SystemExit("bench: the subscriber did not connect")

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def agent_toml(tmp: Path, port: int, bus: str) -> str:
    return f"""
[vehicle]
vin = "{VIN}"
{bus}
[storage]
dir = "{tmp / 'state'}"
[signing]
key_file = "{tmp / 'keys' / 'vehicle.key'}"
[mqtt]
port = {port}
reconnect_min_s = 0.05
[telemetry]
messages = ["*"]
max_batch_age_ms = 1000
[power]
sleep_after_s = 1.0
first_batch_ms = 250
"""


# -- start ------------------------------------------------------------------------------------

def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far: the start's cost on an idle
    machine, whatever the load around the benchmark."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 3)


def bench_start(broker, tmp: Path, frames) -> dict:
    """Twice: the first start parses the DBC (and caches it), the second reads the cache."""
    cold = start_once(broker, tmp, frames)
    warm = start_once(broker, tmp, frames)
    return {"start_to_first_batch_s": warm[0], "start_cpu_s": warm[1],
            "start_to_first_batch_cold_cache_s": cold[0], "start_cpu_cold_cache_s": cold[1],
            "load_average_1min": round(os.getloadavg()[0], 2)}


def start_once(broker, tmp: Path, frames) -> tuple[float, float]:
    master, slave = os.openpty()
    link = tmp / "ttyCAN0"
    if link.is_symlink():
        link.unlink()
    link.symlink_to(os.ttyname(slave))
    stop = threading.Event()

    def feed():
        i = 0
        while not stop.wait(0.001):
            can_id, ext, data = frames[i % len(frames)]
            head = f"T{can_id:08X}" if ext else f"t{can_id:03X}"
            try:
                os.write(master, f"{head}{len(data)}{data.hex().upper()}\r".encode())
            except OSError:
                return
            i += 1

    threading.Thread(target=feed, daemon=True).start()
    cfg = tmp / "start.toml"
    cfg.write_text(agent_toml(tmp, broker.port, f"""
[[bus]]
name = "pt"
interface = "slcan"
channel = "{link}"
dbc = ["{TESLA}"]
options = {{ sleep_after_open = 0 }}
"""))
    arrivals = Arrivals(broker.port)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = t0 + 30
        while not arrivals.times and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.002)
        if not arrivals.times:
            raise SystemExit(f"bench: no batch from the agent: "
                             f"{proc.stderr.read().decode()[-400:] if proc.poll() else 'timeout'}")
        return round(arrivals.times[0] - t0, 3), cpu_s(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
        stop.set()
        arrivals.close()
        os.close(master)
        os.close(slave)


# -- wake -------------------------------------------------------------------------------------

def bench_wake(broker, tmp: Path, frames, cycles: int) -> dict:
    from agent.app.runtime import Agent
    from agent.config import config_from_dict

    channel = f"bench-{uuid.uuid4().hex}"
    raw = tomllib.loads(agent_toml(tmp, broker.port, f"""
[[bus]]
name = "pt"
interface = "virtual"
channel = "{channel}"
dbc = ["{TESLA}"]
"""))
    raw["storage"]["dir"] = str(tmp / "wake-state")
    agent = Agent(config_from_dict(raw, base=tmp))
    arrivals = Arrivals(broker.port)
    feeder = can.Bus(interface="virtual", channel=channel)
    msgs = [can.Message(arbitration_id=i, is_extended_id=e, data=d) for i, e, d in frames]
    sending = threading.Event()
    stop = threading.Event()
    first_sent: list[float] = []

    def feed():
        i = 0
        while not stop.is_set():
            if not sending.wait(0.05):
                continue
            if not first_sent or first_sent[-1] < 0:
                first_sent.append(time.monotonic())
            feeder.send(msgs[i % len(msgs)])
            i += 1
            time.sleep(0.001)

    agent.start()
    threading.Thread(target=feed, daemon=True).start()
    latencies = []
    try:
        for _ in range(cycles):
            sending.clear()
            deadline = time.monotonic() + 10
            while agent.power.state != "asleep" and time.monotonic() < deadline:
                time.sleep(0.01)
            seen = len(arrivals.times)
            time.sleep(0.2)  # the asleep records are out; nothing else is coming
            seen = len(arrivals.times)
            first_sent.append(-1.0)
            sending.set()
            deadline = time.monotonic() + 10
            while len(arrivals.times) == seen and time.monotonic() < deadline:
                time.sleep(0.002)
            if len(arrivals.times) == seen:
                st = agent.status()
                raise SystemExit(f"bench: no batch after a wake: power {st.get('power')}, "
                                 f"uplink {st.get('uplink', {}).get('state')}, batches "
                                 f"{st['batches']}, frames {st['buses'][0]['frames']}")
            latencies.append(arrivals.times[seen] - first_sent[-1])
            time.sleep(0.3)
    finally:
        stop.set()
        agent.stop()
        arrivals.close()
        feeder.shutdown()
    latencies.sort()
    return {"wake_to_first_batch_p50_s": round(statistics.median(latencies), 3),
            "wake_to_first_batch_p99_s": round(latencies[min(len(latencies) - 1,
                                                             int(len(latencies) * 0.99))], 3),
            "wake_cycles": len(latencies)}


# -- the parked hour --------------------------------------------------------------------------

PUBACK = 4
PING = 4  # PINGREQ + PINGRESP


class Ledger:
    """Stands in for the publisher: signs like it, counts what would go over MQTT."""

    def __init__(self, key, prefix: str):
        from agent.core.cose import Signer

        self.signer = Signer(key)
        self.prefix = prefix
        self.messages = 0
        self.bytes = 0
        self.uplink = self  # wake() below
        self.power = None

    def _count(self, topic: str, payload: dict) -> None:
        body = self.signer.sign(payload)
        # PUBLISH QoS 1: fixed header (2-4), topic (2 + len), packet id (2); then PUBACK
        self.messages += 1
        self.bytes += 4 + 2 + len(topic) + 2 + len(body) + PUBACK

    def batch(self, batch, seq: int) -> None:
        self._count(f"{self.prefix}/telemetry", batch.payload(VIN, seq))

    def state(self, values, t_ms) -> None:
        from agent.core.protocol import state_payload
        self._count(f"{self.prefix}/state", state_payload(VIN, t_ms, values))

    def power_status(self, power, t_ms) -> None:
        from agent.core.protocol import status_record
        self._count(f"{self.prefix}/status", status_record(VIN, t_ms, True, power))

    def wake(self) -> None:
        pass

    def set_keepalive(self, seconds) -> None:
        self.keepalive = seconds

    def skipped(self, samples) -> None:
        pass


def simulate_hour(asleep: bool, tmp: Path) -> dict:
    from agent.app.assemble import bus_plans, telemetry_core
    from agent.app.power import PowerService
    from agent.config import config_from_dict
    from agent.sim import from_config

    raw = tomllib.loads((ROOT / "configs" / "demo.toml").read_text())
    raw["storage"]["dir"] = str(tmp / "hour")
    raw["signing"]["key_file"] = str(tmp / "keys" / "vehicle.key")
    raw["commands"]["trust_store"] = str(tmp / "trust.toml")
    cfg = config_from_dict(raw, base=ROOT / "configs")
    plans = bus_plans(cfg)
    core = telemetry_core(plans, cfg.telemetry, live=True)
    ledger = Ledger(load_private_key(cfg.signing.key_file), cfg.vehicle.prefix)
    vehicle = from_config(cfg.simulator)
    keys = {m.frame_id for m in vehicle.db.messages}
    t0 = 1_800_000_000.0
    svc = PowerService(cfg.power, core, 1, publisher=ledger, now=t0)
    seq = 0
    ledger.keepalive = None
    pings = 0
    last_ping = t0
    dt = 0.01
    t = t0
    end = t0 + 3600 + (cfg.power.sleep_after_s + 5 if asleep else 0)
    count_from = t0 + (cfg.power.sleep_after_s + 5 if asleep else 0)
    counted = None
    rssi = 0
    while t < end:
        if asleep and t >= t0 + 10:
            vehicle.state.asleep = True
        for can_id, data in vehicle.step(t):
            if can_id in keys:
                core.feed(0, t, can_id, data)
        if int(t * 100) % 10 == 0:  # the runtime's 100 ms tick
            svc.poll(t)
            core.tick(t)
        poll = cfg.power.slow_poll_s if svc.slow else cfg.modem.poll_interval_s if cfg.modem \
            else 30.0
        if int(t * 100) % int(poll * 100) == 0:  # a modem reading: the signal wanders 2 dB
            rssi = (rssi + 1) % 3
            core.feed_values(t, {"Vehicle.Connectivity.SignalStrength": -71 - 2 * rssi})
        for batch in core.take_batches():
            seq += 1
            if not svc.dropping:
                ledger.batch(batch, seq)
        if core.state_changed:
            core.state_changed = False
            if int(t * 100) % 100 == 0:  # state records on change: at most once a second
                ledger.state(core.snapshot(state_only=True), int(t * 1000))
        keepalive = ledger.keepalive or (cfg.mqtt.keepalive if cfg.mqtt else 30)
        if t - last_ping >= keepalive:
            last_ping = t
            pings += 1
        if counted is None and t >= count_from:
            counted = (ledger.messages, ledger.bytes, pings)
        t = round(t + dt, 2)
    return {"messages": ledger.messages - counted[0], "bytes": ledger.bytes - counted[1],
            "pings": pings - counted[2], "state": svc.state}


def bench_hour(tmp: Path) -> dict:
    (tmp / "trust.toml").write_text("")
    awake = simulate_hour(False, tmp)
    parked = simulate_hour(True, tmp)
    assert parked["state"] == "asleep", parked
    a_bytes = awake["bytes"] + awake["pings"] * PING
    p_bytes = parked["bytes"] + parked["pings"] * PING
    return {"awake_hour_messages": awake["messages"] + awake["pings"],
            "awake_hour_bytes": a_bytes,
            "parked_hour_messages": parked["messages"] + parked["pings"],
            "parked_hour_bytes": p_bytes,
            "parked_vs_awake_messages_pct": round(100 * (parked["messages"] + parked["pings"]) /
                                                  (awake["messages"] + awake["pings"]), 2),
            "parked_vs_awake_bytes_pct": round(100 * p_bytes / a_bytes, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--only", default="start,wake,hour")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    out: dict = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        generate_keypair(tmp / "keys", stem="vehicle")
        if parts & {"start", "wake"}:
            if not TESLA.is_file():
                raise SystemExit(f"bench: needs {TESLA}")
            frames = tesla_frames(cantools.database.load_file(str(TESLA), strict=False))
            with Mosquitto() as broker:
                if "start" in parts:
                    out.update(bench_start(broker, tmp, frames))
                if "wake" in parts:
                    out.update(bench_wake(broker, tmp, frames, args.cycles))
        if "hour" in parts:
            out.update(bench_hour(tmp))
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:32} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
