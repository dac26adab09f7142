#!/usr/bin/env python3
"""Drain: one hour of telemetry queued while offline, then delivered to a local Mosquitto.

Builds the batches the agent makes from ../shared/data/kona_power_on_ready_off.log (every
signal, default policy, one batch a second), signs 3,600 of them into the outbox as the
agent does while it has no coverage, then starts the uplink against a Mosquitto on loopback
and times until a subscriber has every one and the outbox is empty.

    python bench/drain.py [--json] [--batches N]
Target: drain >= 50x faster than real time (one hour in <= 72 s).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import paho.mqtt.client as mqtt  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from agent.adapters.canlog import read_frames  # noqa: E402
from agent.adapters.mqtt import Uplink  # noqa: E402
from agent.adapters.outbox import Outbox  # noqa: E402
from agent.app.assemble import plans_for_dbc, telemetry_core  # noqa: E402
from agent.config import MqttConfig, TelemetryConfig  # noqa: E402
from agent.core.cose import Signer  # noqa: E402
from support.mosquitto import Mosquitto  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
VIN = "KMHK381GFKU000001"
TOPIC = f"vehicles/{VIN}/telemetry"


def kona_batches():
    telemetry = TelemetryConfig(messages=("*",))
    core = telemetry_core(plans_for_dbc([DATA / "kona_ev.dbc"]), telemetry)
    for t, _, key, data in read_frames(DATA / "kona_power_on_ready_off.log"):
        core.feed(0, t + 1_767_225_600, key, data)
    core.flush()
    return core.take_batches()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=3600, help="one a second: 3600 = one hour")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not (DATA / "kona_power_on_ready_off.log").is_file():
        print("bench/drain.py: needs ../shared/data", file=sys.stderr)
        return 2
    batches = kona_batches()
    signer = Signer(Ed25519PrivateKey.generate())
    with tempfile.TemporaryDirectory() as tmp, Mosquitto() as broker:
        outbox = Outbox(Path(tmp), 512 * 1024 * 1024)
        start = time.perf_counter()
        for i in range(args.batches):
            b = batches[i % len(batches)]
            outbox.append_telemetry(lambda seq, drop, b=b: signer.sign(b.payload(VIN, seq, drop)),
                                    b.samples, 0, TOPIC)
        queue_s = time.perf_counter() - start
        stats = outbox.stats()

        got: set[int] = set()
        done = threading.Event()
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        subscribed = threading.Event()

        def on_message(c, u, msg):
            got.add(len(got))
            if len(got) >= args.batches:
                done.set()
        sub.on_message = on_message
        sub.on_subscribe = lambda *a: subscribed.set()
        sub.on_connect = lambda c, u, f, rc, p: c.subscribe(TOPIC, qos=1)
        sub.connect(broker.host, broker.port)
        sub.loop_start()
        subscribed.wait(5)

        uplink = Uplink(MqttConfig(host=broker.host, port=broker.port), outbox, "drain-bench",
                        will=lambda: (f"vehicles/{VIN}/status", b"offline"))
        start = time.perf_counter()
        uplink.start()
        done.wait(600)
        while outbox.stats()["messages"] and time.perf_counter() - start < 600:
            time.sleep(0.01)
        drain_s = time.perf_counter() - start
        uplink.stop(2)
        sub.loop_stop()
        outbox.close()

    result = {"batches": args.batches, "bytes": stats["bytes"], "received": len(got),
              "queue_seconds": round(queue_s, 2), "drain_seconds": round(drain_s, 2),
              "messages_per_s": round(len(got) / drain_s), "mb_per_s": round(
                  stats["bytes"] / drain_s / 1e6, 2),
              "times_real_time": round(args.batches / drain_s, 1), "target_times_real_time": 50}
    result["meets_target"] = result["times_real_time"] >= 50 and len(got) == args.batches
    if args.json:
        print(json.dumps(result))
    else:
        print(f"queued {args.batches} signed batches ({stats['bytes'] / 1e6:.1f} MB) in "
              f"{queue_s:.1f} s")
        print(f"drained {len(got)} to Mosquitto in {drain_s:.2f} s: {result['messages_per_s']} "
              f"msgs/s, {result['mb_per_s']} MB/s, {result['times_real_time']}x real time "
              f"(target >= 50x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
