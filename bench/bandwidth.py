#!/usr/bin/env python3
"""Bandwidth: bytes sent to the broker per vehicle-hour, agent against a naive baseline.

Replays ../shared/data/kona_power_on_ready_off.log (10.8 s of real traffic) with every
signal of the DBC selected under the default sampling policy, and counts the MQTT PUBLISH
packets each approach sends (fixed header, remaining length, topic, packet id, MQTT 5
property length, payload; QoS 1 for both):
  * baseline (as OVMS does): one JSON message {"t": ms, "v": value} per signal change,
    on a topic per signal (vehicles/{vin}/signal/{name});
  * agent: signed COSE_Sign1 telemetry batches (zlib where it is smaller), the online
    status record and one state record.
Figures are scaled to one hour (x 3600 / log duration). TCP/IP and TLS overhead, the same
order for both per packet, are not counted (they would widen the gap: the baseline sends
about 2,000 times more packets).

    python bench/bandwidth.py [--json] [--log FILE --dbc FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from agent.adapters.canlog import read_frames  # noqa: E402
from agent.app.assemble import plans_for_dbc, telemetry_core  # noqa: E402
from agent.config import TelemetryConfig  # noqa: E402
from agent.core.cose import Signer  # noqa: E402
from agent.core.protocol import Topics, state_payload, status_record  # noqa: E402

DATA = HERE.parent.parent / "shared" / "data"
VIN = "KMHK381GFKU000001"
START_S = 1_767_225_600.0  # the log's relative clock moved to 2026-01-01 UTC


def publish_size(topic: str, payload_len: int, qos: int = 1, mqtt5: bool = True) -> int:
    """Bytes of one MQTT PUBLISH packet on the wire."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + (1 if mqtt5 else 0) + payload_len
    varint = 1 if remaining < 128 else 2 if remaining < 16384 else 3 if remaining < 2097152 else 4
    return 1 + varint + remaining


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", default=str(DATA / "kona_power_on_ready_off.log"))
    ap.add_argument("--dbc", default=str(DATA / "kona_ev.dbc"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not Path(args.log).is_file():
        print(f"bench/bandwidth.py: no log at {args.log} (needs ../shared/data)", file=sys.stderr)
        return 2

    telemetry = TelemetryConfig(messages=("*",))  # the default sampling policy
    core = telemetry_core(plans_for_dbc([args.dbc], telemetry), telemetry)
    topics = Topics(f"vehicles/{VIN}")
    frames = list(read_frames(args.log))
    offset = START_S - frames[0][0]
    duration = frames[-1][0] - frames[0][0]

    # Baseline: every change of every signal, as its own JSON message.
    baseline_bytes = baseline_msgs = 0
    last: dict[str, object] = {}
    for t, _, key, data in frames:
        core.feed(0, t + offset, key, data)
        entry = core.counters[0].entries.get(key)
        if not entry:
            continue
        try:
            values = entry.message.decode(data, allow_truncated=True)
        except Exception:
            continue
        t_ms = int((t + offset) * 1000)
        for name, value in values.items():
            value = getattr(value, "name", value)
            full = f"{entry.message.name}.{name}"
            if last.get(full, object()) != value:
                last[full] = value
                body = json.dumps({"t": t_ms, "v": value}).encode()
                baseline_bytes += publish_size(f"{topics.telemetry[:-10]}/signal/{full}", len(body))
                baseline_msgs += 1
    core.flush()

    signer = Signer(Ed25519PrivateKey.generate())
    agent_bytes = agent_msgs = 0
    raw_cbor = 0
    for seq, batch in enumerate(core.take_batches(), 1):
        msg = signer.sign(batch.payload(VIN, seq))
        agent_bytes += publish_size(topics.telemetry, len(msg))
        agent_msgs += 1
        raw_cbor += len(signer.sign(batch.payload(VIN, seq), compress=False))
    t_end = int((frames[-1][0] + offset) * 1000)
    for topic, payload in ((topics.status, status_record(VIN, t_end, True)),
                           (topics.state, state_payload(VIN, t_end, core.snapshot()))):
        agent_bytes += publish_size(topic, len(signer.sign(payload)))
        agent_msgs += 1

    per_hour = 3600.0 / duration
    result = {
        "log_seconds": round(duration, 2),
        "samples": core.samples,
        "baseline_messages": baseline_msgs,
        "baseline_bytes": baseline_bytes,
        "agent_messages": agent_msgs,
        "agent_bytes": agent_bytes,
        "agent_bytes_uncompressed_batches": raw_cbor,
        "baseline_bytes_per_hour": round(baseline_bytes * per_hour),
        "agent_bytes_per_hour": round(agent_bytes * per_hour),
        "ratio": round(baseline_bytes / agent_bytes, 1),
        "target_ratio": 10.0,
    }
    result["meets_target"] = result["ratio"] >= 10.0
    if args.json:
        print(json.dumps(result))
    else:
        mb = 1e6
        print(f"log: {duration:.1f} s, {core.samples} samples of {len(core.signals)} signals")
        print(f"baseline (JSON per signal change): {baseline_msgs:>6} messages, "
              f"{baseline_bytes:>9,} bytes -> {result['baseline_bytes_per_hour'] / mb:8.1f} MB/h")
        print(f"agent (signed batches)           : {agent_msgs:>6} messages, "
              f"{agent_bytes:>9,} bytes -> {result['agent_bytes_per_hour'] / mb:8.1f} MB/h")
        print(f"ratio {result['ratio']}x fewer bytes (target >= 10x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
