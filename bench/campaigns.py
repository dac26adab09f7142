#!/usr/bin/env python3
"""Campaigns: ingest throughput with 0 / 16 / 256 condition campaigns, and trigger latency.

1. Ingest: ../shared/data/kona_power_on_ready_off.log (24,263 real frames) through the
   telemetry core with every signal of kona_ev.dbc selected, plus N condition campaigns over
   the log's signals that carry data (not rolling counters or checksums): each
   `Msg.Sig > p90` with p90 the signal's 90th percentile in the log, every 4th
   `avg(Msg.Sig, 500) > p90`; min_interval_ms 1000; pre_ms 1000 and post_ms 1000 of two
   signals of its message. The engine ticks every 100 ms of frame time. Frames/s is per CPU
   second of the ingesting thread (time.thread_time: the machine is shared), the best of
   --repeat runs; `cost` is the throughput lost against 0 campaigns (goal: <= 25 % at 256).
   Two mixes: conditions watching for a value above the log's maximum (over every frame: they
   stay false, the standing cost of 256 conditions, which the goal is about) and conditions at the 90th
   percentile that fire (`*_firing`: the cost then includes decoding and batching the
   captured samples, which can outnumber the base telemetry's); `256_no_windows`: the
   watching mix with plain comparisons only.
2. Trigger -> first batch on the broker: an agent (configs/demo.toml, simulator off) on a
   virtual CAN bus, a local Mosquitto, a campaign applied by a signed command; a sender flips
   BMS_Status.PackCurrent 0 -> 20 A every 250 ms (the rising edge fires) and a subscriber
   takes the time from that frame's send to the arrival of the campaign's first batch.

    python bench/campaigns.py [--json] [--repeat N] [--firings N]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from agent.adapters.canlog import read_frames  # noqa: E402
from agent.app.assemble import plans_for_dbc, telemetry_core  # noqa: E402
from agent.config import TelemetryConfig  # noqa: E402
from agent.core import campaigns as K  # noqa: E402
from agent.core.campaignengine import CampaignEngine  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
TARGET_COST = 0.25
VIN = "DEMO0EV0000000001"


def campaigns_for(plans, frames, n: int, firing: bool = False,
                  windows: bool = True) -> list[K.Campaign]:
    """n condition campaigns over the numeric signals that vary in the log: watching for a
    value above the log's maximum (they stay false: the standing cost of conditions), or
    with `firing` above its 90th percentile (they fire, and their captures are sent)."""

    messages = plans[0].messages
    seen: dict[int, list[bytes]] = {}
    for _b, _t, can_id, data in frames:
        seen.setdefault(can_id, []).append(data)
    candidates = []
    for key, datas in sorted(seen.items(), key=lambda kv: -len(kv[1])):
        msg = messages.get(key)
        if msg is None or len(msg.signals) < 2:
            continue
        values: dict[str, list] = {}
        # every frame when watching: a value above the log's true maximum never fires
        for data in datas if not firing else datas[:: max(1, len(datas) // 200)]:
            try:
                decoded = msg.decode(data, False, True, False, True)
            except Exception:
                continue
            for name, v in decoded.items():
                values.setdefault(name, []).append(v)
        for sig in msg.signals:
            if any(w in sig.name.lower() for w in ("counter", "checksum", "alive", "heartbeat",
                                                   "crc", "chksum")):
                continue  # a condition on a rolling counter fires all the time
            vs = sorted(v for v in values.get(sig.name, []) if isinstance(v, (int, float)))
            if len(set(vs)) > 1:
                other = next(s.name for s in msg.signals if s.name != sig.name)
                candidates.append((msg.name, sig.name, other,
                                   vs[int(len(vs) * 0.9)] if firing else vs[-1]))
    catalog = K.Catalog(plans)
    out = []
    for i in range(n):
        m, s, other, p90 = candidates[i % len(candidates)]
        cond = f"{m}.{s} > {p90}" if i % 4 or not windows else f"avg({m}.{s}, 500) > {p90}"
        doc = {"id": f"bench-{i}", "version": 1,
               "signals": [{"name": f"{m}.{s}"}, {"name": f"{m}.{other}"}],
               "trigger": {"condition": cond, "pre_ms": 1000, "post_ms": 1000,
                           "min_interval_ms": 1000}}
        out.append(K.parse_campaign(doc, catalog, K.Limits(max_buffer_bytes=1 << 30)))
    return out


def ingest(plans, frames, campaigns) -> tuple[float, dict]:
    core = telemetry_core(plans, TelemetryConfig(messages=("*",)))
    core.prepare()  # the samplers built before timing, as in bench/ingest.py
    engine = CampaignEngine(K.Catalog(plans), K.Limits(max_buffer_bytes=1 << 30))
    t_start = int(frames[0][1] * 1000)
    for c in campaigns:
        engine.apply(c, t_start)
    core.set_taps(engine.taps(), engine.trim)
    chunks, chunk, edge = [], [], frames[0][1] + 0.1
    for f in frames:
        if f[1] >= edge:
            chunks.append((chunk, int(edge * 1000)))
            chunk, edge = [], edge + 0.1
        chunk.append(f)
    chunks.append((chunk, int(edge * 1000)))
    # CPU time of this thread, not wall time: on a shared machine, time spent descheduled
    # would swamp a 25 % difference.
    t0 = time.thread_time()
    for chunk, now_ms in chunks:
        core.feed_many(chunk)
        engine.tick(now_ms)
    core.flush()
    engine.flush()
    elapsed = time.thread_time() - t0
    batches = engine.take_batches()
    return elapsed, {"firings": sum(r.firings for r in engine.running.values()),
                     "evaluations": engine.evaluations, "campaign_batches": len(batches),
                     "errors": engine.errors + core.internal_errors}


def bench_ingest(repeat: int) -> dict:
    """Best of `repeat` for each case, the cases interleaved (the machine's load drifts)."""
    import gc

    plans = plans_for_dbc([DATA / "kona_ev.dbc"])
    frames = [(0, t, i, d) for t, _ch, i, d in read_frames(DATA / "kona_power_on_ready_off.log")]
    cases = {"0": [], "16": campaigns_for(plans, frames, 16),
             "256": campaigns_for(plans, frames, 256),
             "256_no_windows": campaigns_for(plans, frames, 256, windows=False),
             "16_firing": campaigns_for(plans, frames, 16, firing=True),
             "256_firing": campaigns_for(plans, frames, 256, firing=True)}
    best: dict[str, float] = {}
    info: dict[str, dict] = {}
    gc.disable()  # collections during one run and not another would blur a 25 % cost
    try:
        for _ in range(repeat):
            for name, campaigns in cases.items():
                gc.collect()  # ... and so would the garbage of the runs before
                elapsed, info[name] = ingest(plans, frames, campaigns)
                best[name] = min(best.get(name, elapsed), elapsed)
    finally:
        gc.enable()
    out: dict = {"frames": len(frames)}
    for name in cases:
        out[name] = {"fps": round(len(frames) / best[name]), **info[name]}
        if name != "0":
            out[name]["cost"] = round(1 - best["0"] / best[name], 3)
    out["target_cost_256"] = TARGET_COST
    out["meets_target"] = out["256"]["cost"] <= TARGET_COST
    return out


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def bench_trigger(firings: int) -> dict:
    import can
    import cantools
    import paho.mqtt.client as mqtt

    from agent.adapters.keys import generate_keypair, load_private_key, load_public_key
    from agent.app.runtime import Agent
    from agent.config import load_config
    from agent.core.cose import Signer, kid_of, verify
    from support.mosquitto import Mosquitto

    db = cantools.database.load_file(str(ROOT / "dbc" / "demo_ev.dbc"))
    bms = db.get_message_by_name("BMS_Status")
    with tempfile.TemporaryDirectory() as tmp, \
            Mosquitto(extra_config=["set_tcp_nodelay true"]) as broker:
        tmp = Path(tmp)
        for stem in ("vehicle", "cloud"):
            generate_keypair(tmp / "keys", stem=stem)
        (tmp / "trust.toml").write_text(
            f'[[key]]\nname = "bench"\npublic_key = "{tmp / "keys" / "cloud.pub"}"\n'
            'allow = ["campaign.*"]\n')
        channel = f"bench-{uuid.uuid4().hex[:8]}"
        config = load_config(ROOT / "configs" / "demo.toml", [
            f"bus.0.channel={channel!r}", f"storage.dir={str(tmp / 'state')!r}",
            f"signing.key_file={str(tmp / 'keys' / 'vehicle.key')!r}",
            f"commands.trust_store={str(tmp / 'trust.toml')!r}", f"mqtt.port={broker.port}",
            "simulator.enabled=false", "campaigns.max_buffer_bytes=4194304"])
        agent = Agent(config)
        agent.start()
        signer = Signer(load_private_key(tmp / "keys" / "cloud.key"))
        vkey = load_public_key(str(tmp / "keys" / "vehicle.pub"))
        keys = {kid_of(vkey): vkey}
        got: list[tuple[float, dict]] = []
        statuses: list[dict] = []
        lock = threading.Condition()

        def on_message(c, u, msg):
            body = verify(msg.payload, keys).payload
            with lock:
                if msg.topic.endswith("/telemetry") and body.get("campaign") == "latency":
                    got.append((time.perf_counter(), body))
                elif msg.topic.endswith("/responses"):
                    statuses.append(body)
                lock.notify_all()

        cloud = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        subscribed = threading.Event()
        cloud.on_message = on_message
        cloud.on_subscribe = lambda *a: subscribed.set()
        cloud.on_connect = lambda c, u, f, rc, p: c.subscribe(
            [(f"vehicles/{VIN}/telemetry", 1), (f"vehicles/{VIN}/responses", 1)])
        cloud.on_socket_open = lambda c, u, sock: sock.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cloud.connect(broker.host, broker.port)
        cloud.loop_start()
        subscribed.wait(5)
        deadline = time.monotonic() + 10
        while agent.publisher.uplink.status()["state"] != "connected":
            if time.monotonic() > deadline:
                raise SystemExit("agent not ready")
            time.sleep(0.05)
        time.sleep(0.3)
        now = int(time.time() * 1000)
        campaign = {"id": "latency", "version": 1, "priority": 0,
                    "signals": [{"name": "BMS_Status.PackCurrent"},
                                {"name": "BMS_Status.PackVoltage"}],
                    "trigger": {"condition": "BMS_Status.PackCurrent > 10", "pre_ms": 200,
                                "post_ms": 0}}
        cloud.publish(f"vehicles/{VIN}/commands", signer.sign(
            {"v": 1, "id": "apply-1", "vin": VIN, "name": "campaign.apply",
             "params": {"campaign": campaign}, "iat": now, "exp": now + 30_000}), qos=1)
        with lock:
            lock.wait_for(lambda: any(s.get("status") == "SUCCEEDED" for s in statuses), 10)
        bus = can.Bus(interface="virtual", channel=channel)

        def send(current: float) -> None:
            bus.send(can.Message(arbitration_id=bms.frame_id, is_extended_id=False,
                                 data=bms.encode({"SOC": 60, "PackVoltage": 400,
                                                  "PackCurrent": current, "CellTempMax": 25,
                                                  "BMS_Counter": 0})))

        latencies = []
        for _ in range(firings):
            for _ in range(10):  # 100 ms of 0 A at 100 Hz: the condition false, the ring fed
                send(0)
                time.sleep(0.01)
            with lock:
                before = len(got)
            t0 = time.perf_counter()
            send(20)
            with lock:
                lock.wait_for(lambda: len(got) > before, 5)
                if len(got) > before:
                    latencies.append((got[before][0] - t0) * 1000)
            time.sleep(0.05)
        cloud.loop_stop()
        bus.shutdown()
        agent.stop()
    return {"firings": firings, "received": len(latencies),
            "trigger_to_broker_ms": {"p50": round(pct(latencies, 50), 2),
                                     "p99": round(pct(latencies, 99), 2),
                                     "max": round(max(latencies), 2)} if latencies else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--firings", type=int, default=100)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--skip-trigger", action="store_true", help="ingest only")
    args = ap.parse_args(argv)
    result = {"ingest": bench_ingest(args.repeat)}
    if not args.skip_trigger:
        result["trigger"] = bench_trigger(args.firings)
    if args.json:
        print(json.dumps(result))
        return 0
    ing = result["ingest"]
    for n in ("0", "16", "256", "256_no_windows", "16_firing", "256_firing"):
        r = ing[n]
        print(f"{n:>10} condition campaigns: {r['fps']:>8,} frames/s"
              + (f"  cost {r['cost'] * 100:.1f} %" if "cost" in r else "")
              + f"  ({r['firings']} firings, {r['evaluations']} evaluations)"
              + (f"  {r['errors']} ERRORS" if r["errors"] else ""))
    print(f"goal: 256 cost <= {TARGET_COST * 100:.0f} %: {'met' if ing['meets_target'] else 'MISSED'}")
    t = result.get("trigger")
    if t and t["trigger_to_broker_ms"]:
        lat = t["trigger_to_broker_ms"]
        print(f"trigger -> first batch on the broker: p50 {lat['p50']} ms  p99 {lat['p99']} ms  "
              f"max {lat['max']} ms ({t['received']}/{t['firings']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
