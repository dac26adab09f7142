#!/usr/bin/env python3
"""Diagnostics benchmark: what OBD-II polling costs ingest, and diag.read_dtcs latency.

  * ingest: the telemetry core fed the simulated EV's frames as fast as it takes them, on
    this thread, with the diag service polled in between as the core loop does; once with
    no diagnostics and once with 10 PIDs polled at 1 Hz from the simulated VCU over ISO-TP
    on python-can's virtual bus (its worker thread and can-isotp's threads share the CPU
    with ingest, as on the vehicle; the simulator thread runs in both). Frames/s of each,
    alternated --repeat times, best kept, and the CPU the other threads took.
  * latency: diag.read_dtcs over 4 ECUs that each answer 40 DTCs (163 bytes, 24 CAN frames)
    at once; from handle() to the terminal status, --reads times; p50/p99.

    python bench/diagnostics.py [--json] [--seconds S] [--repeat N] [--reads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from agent.app.assemble import bus_plans, telemetry_core  # noqa: E402
from agent.app.diagservice import DiagService  # noqa: E402
from agent.config import config_from_dict, load_config  # noqa: E402
from agent.core import diag as D  # noqa: E402
from agent.core.commands import Command  # noqa: E402
from agent.sim import from_config  # noqa: E402
from agent.sim.ecus import BmsModel, SimEcu  # noqa: E402
from agent.sim.runner import SimulatorThread  # noqa: E402
from agent.sim.vehicle import SimulatedVehicle  # noqa: E402

DEMO = HERE.parent / "configs" / "demo.toml"
PIDS = (0x01, 0x05, 0x0C, 0x0D, 0x1F, 0x21, 0x31, 0x42, 0x46, 0xA6)  # the VCU supports these
POLL_EVERY = 256  # frames between two service polls (the core loop drains up to 2048)


def demo_frames(n: int) -> list:
    """n frames of the simulated EV driving (changing values), as the runtime queues them."""
    v = SimulatedVehicle()
    v.state.drive = True
    out, t = [], time.time()
    while len(out) < n:
        t += 0.001
        out += [(0, t, can_id, data) for can_id, data in v.step(t)]
    return out[:n]


def ingest(config, frames, seconds: float, with_pids: bool) -> tuple[float, dict]:
    core = telemetry_core(bus_plans(config), config.telemetry)
    service = None
    # The simulated vehicle runs in both cases: only the diagnostics differ.
    sim = SimulatorThread(from_config(config.simulator), "virtual", config.bus[0].channel).start()
    if with_pids:
        service = DiagService(config, core, None, now_ms=int(time.time() * 1000))
        end = time.monotonic() + 5  # until the supported PIDs are known and polls run
        while time.monotonic() < end and core.lookup("OBD.EngineSpeed") is None:
            service.poll(int(time.time() * 1000))
            time.sleep(0.01)
    fed = 0
    cpu0, own0 = time.process_time(), time.thread_time()
    start = time.perf_counter()
    end = start + seconds
    i = 0
    while time.perf_counter() < end:
        chunk = frames[i:i + POLL_EVERY]
        if not chunk:
            i = 0
            continue
        core.feed_many(chunk)
        fed += len(chunk)
        i += POLL_EVERY
        if service is not None:
            service.poll(int(time.time() * 1000))
    took = time.perf_counter() - start
    # CPU the other threads (simulator; diag worker, can-isotp, notifier) took per second:
    # a figure that the other load on the machine does not move much.
    others_ms_per_s = ((time.process_time() - cpu0) - (time.thread_time() - own0)) / took * 1000
    stats = {"other_threads_cpu_ms_per_s": round(others_ms_per_s, 1)}
    if service is not None:
        stats.update(requests=service.counters["requests"],
                     pid_signals=sum(1 for s in core.signals if s.out.startswith("OBD.")))
        service.close()
    sim.stop()
    return fed / took, stats


def latency_config(channel: str, tmp: str):
    ecus = [{"name": f"bms{i}", "protocol": "uds", "request_id": 0x7E4 + i,
             "response_id": 0x7EC + i} for i in range(4)]
    return config_from_dict({
        "vehicle": {"vin": "BENCH"},
        "bus": [{"name": "pt", "interface": "virtual", "channel": channel,
                 "dbc": [str(HERE.parent / "dbc" / "demo_ev.dbc")]}],
        "storage": {"dir": tmp},
        "diagnostics": {"dtc_interval_s": 0, "request_spacing_ms": 0, "clear_preconditions": [],
                        "ecu": ecus}}, base=HERE)


class FastBms(BmsModel):
    PENDING_S = ()  # answers at once: the figure is the agent's, not a slow ECU's
    ANSWER_S = 0.0


def latency(reads: int) -> dict:
    channel = f"bench-{uuid.uuid4().hex}"
    config = latency_config(channel, "/tmp")
    vehicle = SimulatedVehicle()
    vehicle.ecus = [SimEcu(f"bms{i}", 0x7E4 + i, 0x7EC + i, FastBms(vehicle)) for i in range(4)]
    sim = SimulatorThread(vehicle, "virtual", channel).start()
    core = telemetry_core(bus_plans(config), config.telemetry)
    service = DiagService(config, core, None)
    times = []
    try:
        for n in range(reads + 1):
            cmd = Command(f"b{n}", "BENCH", D.READ_DTCS, {}, 0, 0, b"k", "bench", b"d")
            t0 = time.perf_counter()
            out = service.handle(cmd, int(time.time() * 1000))
            while not any(s.terminal for s in out):
                time.sleep(0.0005)
                out += service.poll(int(time.time() * 1000))
            took = time.perf_counter() - t0
            final = [s for s in out if s.terminal][0]
            assert final.status == "SUCCEEDED" and all(
                len(e["dtcs"]) == 40 for e in final.result["ecus"].values()), final
            if n:  # the first opens the connections
                times.append(took * 1000)
    finally:
        service.close()
        sim.stop()
    times.sort()
    return {"reads": reads, "ecus": 4, "dtcs_per_ecu": 40,
            "p50_ms": round(statistics.median(times), 1),
            "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))], 1),
            "max_ms": round(times[-1], 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per ingest run (3)")
    ap.add_argument("--repeat", type=int, default=2, help="ingest runs of each kind (2)")
    ap.add_argument("--reads", type=int, default=50, help="diag.read_dtcs commands (50)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    pids = ", ".join(f"{{ pid = {p}, interval_ms = 1000 }}" for p in PIDS)
    channel = f"bench-{uuid.uuid4().hex}"
    config = load_config(DEMO, [
        f"bus.0.channel={channel!r}", "storage.dir='/tmp/tcu-bench-diag'",
        "diagnostics.dtc_interval_s=0", f"diagnostics.ecu.vcu.pid=[{pids}]",
        "diagnostics.ecu.abs.pid=[]"])
    only_vcu = tuple(e for e in config.diagnostics.ecu if e.name == "vcu")
    config = replace(config, diagnostics=replace(config.diagnostics, ecu=only_vcu))
    frames = demo_frames(50_000)
    without, with_, cpu_without, cpu_with = [], [], [], []
    stats: dict = {}
    for _ in range(args.repeat):
        fps, base = ingest(config, frames, args.seconds, False)
        without.append(fps)
        cpu_without.append(base["other_threads_cpu_ms_per_s"])
        fps, stats = ingest(config, frames, args.seconds, True)
        with_.append(fps)
        cpu_with.append(stats["other_threads_cpu_ms_per_s"])
    result = {
        "ingest": {"pids": len(PIDS), "poll_hz": 1, "seconds": args.seconds,
                   "fps_without": round(max(without)), "fps_with_pids": round(max(with_)),
                   "cost_pct": round((1 - max(with_) / max(without)) * 100, 1),
                   "diag_threads_cpu_ms_per_s": round(min(cpu_with) - min(cpu_without), 1),
                   "requests": stats["requests"], "pid_signals": stats["pid_signals"]},
        "read_dtcs": latency(args.reads),
    }
    if args.json:
        print(json.dumps(result))
    else:
        i, r = result["ingest"], result["read_dtcs"]
        print(f"ingest without diagnostics   {i['fps_without']:>9,} frames/s")
        print(f"ingest with {i['pids']} PIDs at 1 Hz   {i['fps_with_pids']:>9,} frames/s "
              f"({i['cost_pct']:+.1f} % cost; {i['requests']} requests)")
        print(f"diagnostics threads          {i['diag_threads_cpu_ms_per_s']} ms CPU per second")
        print(f"diag.read_dtcs, 4 ECUs x 40  p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
              f"max {r['max_ms']} ms over {r['reads']} reads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
