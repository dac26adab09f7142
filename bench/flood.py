#!/usr/bin/env python3
"""Floods on the commands topic against a real `tcu-agent run` process and a real Mosquitto.

The agent runs configs/demo.toml (the simulated EV in its process, telemetry every second).
A flooder publishes at a fixed rate (QoS 0) for a while, one of:
  padded   one captured, accepted command replayed, each copy padded to 63 KB in its
           unprotected (unsigned) header
  plain    the same captured command replayed as it was
  garbage  non-COSE blobs, truncated envelopes and commands signed by an unknown key
  forged   commands under the trusted kid with broken signatures, each one new
Meanwhile a cloud sends genuine commands (state.snapshot, a new id each), re-sending each every
`--resend` s until it is answered; the latency is from the first send to the answer.

    python bench/flood.py [--json] [--scenario padded] [--rate 1000] [--seconds 30]
Reports agent RSS before / peak / after (5 s after the flood), responses produced, the deepest
core-lane depth seen in the status file, telemetry batches per second during the flood and the
genuine commands' latencies.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import cbor2  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402

from agent.adapters.keys import generate_keypair, load_private_key  # noqa: E402
from agent.core.cose import Signer, decode_unverified  # noqa: E402
from support.mosquitto import Consumer, Mosquitto  # noqa: E402

VIN = "DEMO0EV0000000001"
TOPIC = f"vehicles/{VIN}/commands"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sign(signer: Signer, name: str = "state.snapshot", cid: str | None = None,
         ttl_ms: int = 600_000) -> tuple[str, bytes]:
    now = int(time.time() * 1000)
    cid = cid or f"b-{uuid.uuid4().hex[:12]}"
    return cid, signer.sign({"v": 1, "id": cid, "vin": VIN, "name": name, "params": {},
                             "iat": now, "exp": now + ttl_ms})


def with_parts(message: bytes, unprotected=None, signature=None) -> bytes:
    protected, u, payload, sig = cbor2.loads(message).value
    return cbor2.dumps(cbor2.CBORTag(18, [protected, u if unprotected is None else unprotected,
                                          payload, sig if signature is None else signature]))


class Flooder:
    """Publishes make(i) at `rate` per second for `seconds` (QoS 0), paced every 10 ms, from a
    process of its own (in this one it would starve the cloud's subscribers of the GIL)."""

    def __init__(self, port: int, rate: int, seconds: float, make):
        ctx = multiprocessing.get_context("fork")
        self._sent = ctx.Value("q", 0)
        self._proc = ctx.Process(target=self._run, args=(port, rate, seconds, make), daemon=True)

    @property
    def sent(self) -> int:
        return self._sent.value

    def start(self) -> None:
        self._proc.start()

    def is_alive(self) -> bool:
        return self._proc.is_alive()

    def _run(self, port: int, rate: int, seconds: float, make) -> None:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"flood-{os.getpid()}")
        client.max_queued_messages_set(0)
        client.connect("127.0.0.1", port)
        client.loop_start()
        start, sent = time.monotonic(), 0
        while (elapsed := time.monotonic() - start) < seconds:
            due = int(elapsed * rate)
            while sent < due:
                client.publish(TOPIC, make(sent), qos=0)
                sent += 1
            self._sent.value = sent
            time.sleep(0.01)
        client.disconnect()
        client.loop_stop()


def run(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="flood-"))
    keys = tmp / "keys"
    for stem in ("vehicle", "cloud", "rogue"):
        generate_keypair(keys, stem=stem)
    trust = tmp / "trust.toml"
    trust.write_text(f'[[key]]\nname = "fleet"\npublic_key = "{keys / "cloud.pub"}"\n'
                     'allow = ["*"]\n')
    broker = Mosquitto().start()
    storage = tmp / "state"
    sets = [f"storage.dir={str(storage)!r}", f"signing.key_file={str(keys / 'vehicle.key')!r}",
            f"mqtt.port={broker.port}", f"commands.trust_store={str(trust)!r}",
            f"bus.0.channel='flood-{uuid.uuid4().hex}'"]
    cmd = [sys.executable, "-m", "agent", "--log-level", "warning", "run", "-c",
           str(ROOT / "configs" / "demo.toml")]
    for s in sets:
        cmd += ["--set", s]
    log = open(tmp / "agent.log", "wb")
    agent = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    # Not on vehicles/VIN/#: that would take the flood too, and queue the answers behind it.
    consumer = Consumer(broker.host, broker.port, f"vehicles/{VIN}/responses").start()
    telemetry_sub = Consumer(broker.host, broker.port, f"vehicles/{VIN}/telemetry").start()
    cloud = Signer(load_private_key(keys / "cloud.key"))
    rogue = Signer(load_private_key(keys / "rogue.key"))

    seen_ids: set = set()
    checked = [0]

    def answered(cid: str) -> bool:
        msgs = consumer.messages
        for m in msgs[checked[0]:]:
            if m.topic.endswith("/responses"):
                seen_ids.add(decode_unverified(m.payload)[2].get("id"))
        checked[0] = len(msgs)
        return cid in seen_ids

    def send(message: bytes) -> None:
        sender.publish(TOPIC, message, qos=1)

    sender = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="cloud")
    sender.connect("127.0.0.1", broker.port)
    sender.loop_start()
    out: dict = {"scenario": args.scenario, "rate_per_s": args.rate, "seconds": args.seconds}
    try:
        deadline = time.monotonic() + 30
        captured_id, captured = sign(cloud)
        while time.monotonic() < deadline and not answered(captured_id):
            send(captured)  # the command the attacker captured: accepted once
            time.sleep(1.0)
        if not answered(captured_id):
            raise SystemExit(f"the agent did not answer; see {tmp / 'agent.log'}")
        time.sleep(2.0)
        out["rss_before_mb"] = round(rss_mb(agent.pid), 1)
        _, template = sign(cloud)
        _, stranger = sign(rogue)
        pad = {99: b"\0" * 63_000}
        makers = {
            "padded": lambda i: with_parts(captured, unprotected=pad),
            "plain": lambda i: captured,
            "garbage": lambda i: (b"junk %d" % i, b"\xd2\x84\x40\xa0", stranger,
                                  os.urandom(40))[i % 4],
            "forged": lambda i: with_parts(template, signature=os.urandom(64)),
        }
        flooder = Flooder(broker.port, args.rate, args.seconds, makers[args.scenario])
        responses_before = sum(m.topic.endswith("/responses") for m in consumer.messages)
        telemetry_before = len(telemetry_sub.messages)
        peak, depth, latencies = out["rss_before_mb"], 0, []
        status0 = json.loads((storage / "status.json").read_text())
        t0 = time.monotonic()
        cpu0 = cpu_s(agent.pid)
        flooder.start()
        cid, genuine, first, last = None, b"", 0.0, 0.0
        while flooder.is_alive():
            now = time.monotonic()
            if cid is not None and answered(cid):
                latencies.append(round(now - first, 2))
                cid = None
            if cid is None and now - t0 < args.seconds - args.resend:
                cid, genuine = sign(cloud)
                first = last = now
                send(genuine)
            elif cid is not None and now - last >= args.resend:
                last = now
                send(genuine)
            peak = max(peak, rss_mb(agent.pid))
            try:
                status = json.loads((storage / "status.json").read_text())
                lanes = status.get("lanes", {})
                depth = max([depth] + [lane.get("depth", 0) for lane in lanes.values()])
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        elapsed = time.monotonic() - t0
        cpu = cpu_s(agent.pid) - cpu0
        telemetry = len(telemetry_sub.messages) - telemetry_before
        if cid is not None:
            latencies.append(f">{round(time.monotonic() - first, 1)} (unanswered at the end)")
        status1 = json.loads((storage / "status.json").read_text())
        time.sleep(5.0)
        status = json.loads((storage / "status.json").read_text())
        out.update({
            "sent": flooder.sent,
            "flood_s": round(elapsed, 1),
            "rss_peak_mb": round(peak, 1),
            "rss_after_mb": round(rss_mb(agent.pid), 1),
            "responses": sum(m.topic.endswith("/responses") for m in consumer.messages)
                         - responses_before,
            "max_lane_depth": depth,
            "agent_cpu_percent": round(100 * cpu / elapsed),
            "load_average": os.getloadavg()[0],
            "telemetry_batches_per_s": round(telemetry / elapsed, 2),  # received by the cloud
            "agent_batches_per_s": round((status1["batches"] - status0["batches"]) / elapsed, 2),
            "agent_published_per_s": round((status1["uplink"]["published"]
                                            - status0["uplink"]["published"]) / elapsed, 2),
            "genuine_latency_s": latencies,
            "counters": {k: v for k, v in status.get("counters", {}).items()
                         if k.startswith("commands.") and not k.startswith("commands.terminal")},
            "lanes": status.get("lanes"),
        })
    finally:
        sender.disconnect()
        sender.loop_stop()
        consumer.stop()
        telemetry_sub.stop()
        agent.terminate()
        try:
            agent.wait(15)
        except subprocess.TimeoutExpired:
            agent.kill()
        broker.close()
    shutil.rmtree(tmp, ignore_errors=True)  # kept (for agent.log) only when the run failed
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenario", choices=("padded", "plain", "garbage", "forged"),
                   default="padded")
    p.add_argument("--rate", type=int, default=1000, help="flood messages per second")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--resend", type=float, default=2.0, help="genuine re-send interval (s)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    out = run(args)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
