#!/usr/bin/env python3
"""Live ingest cost: the real agent process (`tcu-agent run`, signing, SQLite outbox, MQTT to a
local Mosquitto) fed CAN frames at fixed rates, measured from outside.

Frames: the real Kona log (../shared/data/kona_power_on_ready_off.log, looped), every signal of
the Kona DBC selected (445). Transport: real SocketCAN is not in every kernel, so frames go as
one `struct can_frame` per UDP datagram on 127.0.0.1 into a socket that python-can's own
SocketcanBus reads (tests/support/dgramcan.py says what differs from CAN_RAW). The agent runs under
bench/liveagent.py, which registers that interface and measures the core loop's pauses.

Per scenario (rate x buses), over a window of --seconds after a warm-up:
  cpu_pct          process utime+stime (/proc/PID/stat) over the window, one core = 100 %
  us_per_frame     that CPU time / frames offered in the window
  threads          the same split per thread (/proc/PID/task/*/stat)
  rss_mb           VmRSS at the end of the window, peak_rss_mb VmHWM
  lost             frames offered - frames counted by the agent (after the feed stopped and
                   the agent caught up; kernel filters are off, so every id is counted);
                   socket_drops: what the kernel dropped because the agent's socket was full
                   (/proc/net/udp); kernel_drops: the agent's own count of them (SO_RXQ_OVFL),
                   as `tcu-agent status` shows it
  disk_write_Bps   /proc/PID/io write_bytes per second; outbox_Bps payload bytes appended
  pause_p99_ms     99th percentile of the core loop's time away from its queue; gc_max_ms
                   the longest collection in the window (any thread)
  core_split_us    with LIVE_SPLIT=1 in the environment: the core thread's CPU per frame in
                   feed_many, tick and the status, and the store thread's in signing and
                   storing batches (the timing itself costs a little)

    python bench/live.py [--json] [--seconds S] [--runs N] [--only 4000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from agent.adapters.canlog import read_frames  # noqa: E402
from agent.adapters.keys import generate_keypair  # noqa: E402
from support.dgramcan import can_frame, udp_drops, udp_pair  # noqa: E402
from support.mosquitto import Mosquitto  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SCENARIOS = [(2000, 1), (4000, 1), (8000, 1), (4000, 4)]
TICK = os.sysconf("SC_CLK_TCK")
TARGETS = {"us_per_frame_4000": 8.0, "cpu_pct_4x4000": 15.0, "pause_p99_ms": 5.0,
           "disk_over_outbox": 2.0}


def can_frames(log: Path) -> list[bytes]:
    out = []
    for _t, _ch, can_id, data in read_frames(log):
        out.append(can_frame(can_id, data))
    return out


def cpu_ticks(path: str) -> int:
    rest = Path(path).read_text().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


def threads(pid: int) -> dict[int, int]:
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = cpu_ticks(str(task / "stat"))
        except (OSError, IndexError):
            pass
    return out


def proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def write_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def read_json(path: Path) -> dict:
    for _ in range(50):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            time.sleep(0.02)
    return {}


def percentile(hist: dict, q: float) -> float | None:
    """From {bucket of 0.1 ms: count}: the bucket's upper edge holding the q-th quantile, ms."""
    items = sorted((int(k), v) for k, v in hist.items() if v > 0)
    total = sum(v for _, v in items)
    if not total:
        return None
    seen = 0
    for k, v in items:
        seen += v
        if seen >= q * total:
            return round((k + 1) * 0.1, 1)
    return None


def diff(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items()}


def config_text(tmp: Path, broker, fds: list[int], dbc: Path) -> str:
    buses = "".join(f"""
[[bus]]
name = "b{i}"
interface = "dgramcan"
channel = "fd:{fd}"
dbc = ["{dbc}"]
filters = false
""" for i, fd in enumerate(fds))
    return f"""
[vehicle]
vin = "KMHK381GFMU000001"
{buses}
[storage]
dir = "{tmp / 'state'}"
[telemetry]
messages = ["*"]
[signing]
key_file = "{tmp / 'keys' / 'vehicle.key'}"
[mqtt]
host = "{broker.host}"
port = {broker.port}
"""


def scenario(rate: int, nbus: int, frames: list[bytes], broker, dbc: Path, seconds: float,
             warmup: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_keypair(tmp / "keys")
        pairs = [udp_pair() for _ in range(nbus)]  # (agent's receiver, our sender)
        ours = [tx for _, tx in pairs]
        theirs = [rx.fileno() for rx, _ in pairs]
        ports = [rx.getsockname()[1] for rx, _ in pairs]
        for a in ours:
            a.setblocking(False)
        config = tmp / "agent.toml"
        config.write_text(config_text(tmp, broker, theirs, dbc))
        # The bench's own stats file (rewritten every second by the agent process, so its
        # writes are in /proc/PID/io) goes to a tmpfs where there is one: not the agent's cost.
        shm = Path("/dev/shm")
        stats_dir = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() else tmp
        stats_path, log_path = stats_dir / "stats.json", tmp / "agent.log"
        proc = subprocess.Popen([sys.executable, str(HERE / "liveagent.py"), str(stats_path),
                                 "run", "-c", str(config)], cwd=ROOT, pass_fds=theirs,
                                stderr=open(log_path, "wb"))
        for rx, _ in pairs:
            rx.close()
        try:
            deadline = time.monotonic() + 60
            while "running: vin" not in log_path.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"agent did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.02)
            pid = proc.pid
            offered = full = 0
            n = len(frames)
            sends = [a.send for a in ours]
            start = time.monotonic()
            window = None
            end = start + warmup + seconds
            total_rate = rate * nbus
            while True:
                now = time.monotonic()
                if window is None and now >= start + warmup:
                    window = (now, offered, cpu_ticks(f"/proc/{pid}/stat"), threads(pid),
                              write_bytes(pid), read_json(stats_path))
                if now >= end:
                    break
                due = int((now - start) * total_rate) - offered
                for _ in range(due):
                    try:
                        sends[offered % nbus](frames[(offered // nbus) % n])
                    except BlockingIOError:
                        full += 1
                    offered += 1
                time.sleep(0.001)
            t1 = time.monotonic()
            cpu1, thr1, wb1 = cpu_ticks(f"/proc/{pid}/stat"), threads(pid), write_bytes(pid)
            rss, hwm = proc_kb(pid, "VmRSS"), proc_kb(pid, "VmHWM")
            st1 = read_json(stats_path)
            t0, offered0, cpu0, thr0, wb0, st0 = window
            # let the agent catch up, then stop it and read its final counts
            counted, stable_since = -1, time.monotonic()
            while time.monotonic() - stable_since < 2.0 and time.monotonic() - t1 < 20:
                status = read_json(tmp / "state" / "status.json")
                now_counted = sum(b["frames"] for b in status.get("buses", []))
                if now_counted != counted:
                    counted, stable_since = now_counted, time.monotonic()
                time.sleep(0.2)
            dropped = sum(udp_drops(p) or 0 for p in ports)
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            status = read_json(tmp / "state" / "status.json")
            log_tail = log_path.read_text(errors="replace").splitlines()[-3:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for a in ours:
                a.close()
            if stats_dir != tmp:
                shutil.rmtree(stats_dir, ignore_errors=True)
        span = t1 - t0
        frames_window = offered - offered0
        cpu_s = (cpu1 - cpu0) / TICK
        names = st1.get("threads", {})
        split: dict[str, float] = {}
        for tid, ticks in thr1.items():
            name = names.get(str(tid), "main" if tid == pid else "other")
            name = "reader" if name.startswith("can-") else name
            split[name] = split.get(name, 0) + (ticks - thr0.get(tid, 0)) / TICK / span * 100
        counted = sum(b["frames"] for b in status.get("buses", []))
        kernel = sum(b.get("kernel_drops", 0) for b in status.get("buses", []))
        passes = diff(st1.get("passes", {}), st0.get("passes", {}))
        gcs = diff(st1.get("gc", {}), st0.get("gc", {}))
        split_s = diff(st1.get("cpu_s", {}), st0.get("cpu_s", {}))
        outbox_bps = (st1.get("outbox_bytes", 0) - st0.get("outbox_bytes", 0)) / span
        disk_bps = (wb1 - wb0) / span
        return {
            "rate": rate, "buses": nbus, "window_s": round(span, 2),
            "offered_fps": round(frames_window / span),
            "cpu_pct": round(cpu_s / span * 100, 1),
            "us_per_frame": round(cpu_s / frames_window * 1e6, 1) if frames_window else None,
            "threads_pct": {k: round(v, 1) for k, v in sorted(split.items()) if v >= 0.05},
            "rss_mb": round(rss / 1024, 1), "peak_rss_mb": round(hwm / 1024, 1),
            "offered": offered, "counted": counted, "lost": offered - counted,
            "send_refused": full, "socket_drops": dropped, "kernel_drops": kernel,
            "agent_counters": [{k: b.get(k) for k in ("frames", "decoded", "unchanged",
                                "unselected", "unknown_ids", "decode_errors", "bad_length")}
                               for b in status.get("buses", [])],
            "agent_log_tail": log_tail,
            "disk_write_Bps": round(disk_bps), "outbox_Bps": round(outbox_bps),
            "disk_over_outbox": round(disk_bps / outbox_bps, 2) if outbox_bps else None,
            "passes": sum(passes.values()),
            "pause_p99_ms": percentile(passes, 0.99),
            "pause_max_ms": round((max((int(k) for k, v in passes.items() if v), default=-1)
                                   + 1) * 0.1, 1),
            # LIVE_SPLIT=1: the core thread's CPU per offered frame, by step (the rest: the
            # loop itself, queue wake-ups, commands and records)
            "core_split_us": {k: round(v / frames_window * 1e6, 2) for k, v in split_s.items()}
            if frames_window else {},
            # in the window (the start-up's gc.collect() before gc.freeze() is not)
            "gc_pauses": sum(gcs.values()),
            "gc_max_ms": round((max((int(k) for k, v in gcs.items() if v), default=-1) + 1)
                               * 0.1, 1),
        }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="measured window per scenario")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--runs", type=int, default=1, help="repeat every scenario")
    ap.add_argument("--only", help="scenarios, e.g. 4000 or 4000x4,8000")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    log, dbc = DATA / "kona_power_on_ready_off.log", DATA / "kona_ev.dbc"
    if not log.is_file():
        print(f"bench/live.py: needs {log}", file=sys.stderr)
        return 2
    scenarios = SCENARIOS
    if args.only:
        scenarios = []
        for part in args.only.split(","):
            r, _, b = part.partition("x")
            scenarios.append((int(r), int(b or 1)))
    frames = can_frames(log)
    results = []
    with Mosquitto() as broker:
        for _ in range(args.runs):
            for rate, nbus in scenarios:
                r = scenario(rate, nbus, frames, broker, dbc, args.seconds, args.warmup)
                r["loadavg"] = os.getloadavg()[0]
                results.append(r)
                if not args.json:
                    print(f"{rate:>5} x{nbus}: {r['cpu_pct']:5.1f} % CPU, "
                          f"{r['us_per_frame']:5.1f} us/frame  threads {r['threads_pct']}  "
                          f"RSS {r['rss_mb']} MB  lost {r['lost']} (socket drops "
                          f"{r['socket_drops']}, agent's count {r['kernel_drops']})  disk "
                          f"{r['disk_write_Bps']:,} B/s vs outbox {r['outbox_Bps']:,} B/s  "
                          f"pause p99 {r['pause_p99_ms']} ms max {r['pause_max_ms']} ms  "
                          f"gc max {r['gc_max_ms']} ms  load {r['loadavg']:.1f}"
                          + (f"  core split us/frame {r['core_split_us']}"
                             if r["core_split_us"] else ""), flush=True)
    if args.json:
        print(json.dumps({"results": results, "targets": TARGETS}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
