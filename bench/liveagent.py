#!/usr/bin/env python3
"""`tcu-agent run` in this process, with the stand-in bus registered and a few hooks that
measure from inside what /proc cannot see (for bench/live.py; not for production):

  * the core loop's pauses: how long each pass of the core thread stays away from its queue
    (from the return of one blocking get() to the next get() call), in 0.1 ms buckets;
  * garbage-collector pauses (gc.callbacks), in 0.1 ms buckets;
  * payload bytes appended to the outbox (telemetry, state, status, responses);
  * thread names by native id (Python does not name its OS threads).

    python bench/liveagent.py STATS.json run -c agent.toml

STATS.json is rewritten (atomically) every second and once more at exit.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

sys.path.insert(0, str(HERE.parent / "tests"))
from support import dgramcan  # noqa: E402

dgramcan.register()

from agent.adapters import outbox as outbox_mod  # noqa: E402
from agent.app import runtime  # noqa: E402

BUCKET_S = 1e-4
stats = {"passes": Counter(), "gc": Counter(), "gc_max_ms": 0.0, "outbox_bytes": 0,
         "threads": {}, "cpu_s": Counter(), "calls": Counter()}


class TimedQueue:
    """The core thread's queue, timing the gaps between its blocking get() calls."""

    def __init__(self, q):
        self._q = q
        self.put = q.put
        self.get_nowait = q.get_nowait
        self._left = None

    def get(self, block=True, timeout=None):
        now = time.perf_counter()
        if self._left is not None:
            stats["passes"][int((now - self._left) / BUCKET_S)] += 1
        try:
            return self._q.get(block, timeout)
        finally:
            self._left = time.perf_counter()

    def __getattr__(self, name):
        return getattr(self._q, name)


_init = runtime.Agent.__init__


def _agent_init(self, *a, **k):
    _init(self, *a, **k)
    if hasattr(self, "_frames"):
        self._frames = TimedQueue(self._frames)


runtime.Agent.__init__ = _agent_init

if os.environ.get("LIVE_PROFILE"):  # LIVE_PROFILE=out.prof: cProfile of the core thread
    import cProfile

    _loop = runtime.Agent._core_loop

    def _profiled(self):
        prof = cProfile.Profile(time.thread_time)  # CPU of this thread, not waits
        try:
            prof.runcall(_loop, self)
        finally:
            prof.dump_stats(os.environ["LIVE_PROFILE"])

    runtime.Agent._core_loop = _profiled



def _cpu_timed(owner, name: str, label: str) -> None:
    """Wrap owner.name to add its CPU time (this thread's) to stats["cpu_s"][label]."""
    fn = getattr(owner, name)

    def timed(*a, **k):
        t = time.thread_time()
        try:
            return fn(*a, **k)
        finally:
            stats["cpu_s"][label] += time.thread_time() - t
            stats["calls"][label] += 1

    setattr(owner, name, timed)


if os.environ.get("LIVE_SPLIT"):  # where the core thread's CPU goes, by step
    from agent.app import publisher as publisher_mod
    from agent.core import telemetry as telemetry_mod
    _cpu_timed(telemetry_mod.TelemetryCore, "feed_many", "feed")
    _cpu_timed(telemetry_mod.TelemetryCore, "tick", "tick")
    _cpu_timed(publisher_mod.Publisher, "batch", "sign_and_store")
    _cpu_timed(runtime.Agent, "_write_status", "status")

_append_telemetry = outbox_mod.Outbox.append_telemetry
_append = outbox_mod.Outbox.append


def _telemetry(self, build, *a, **k):
    def counted(seq, drop):
        payload = build(seq, drop)
        stats["outbox_bytes"] += len(payload)
        return payload
    return _append_telemetry(self, counted, *a, **k)


def _other(self, kind, topic, payload, *a, **k):
    stats["outbox_bytes"] += len(payload)
    return _append(self, kind, topic, payload, *a, **k)


outbox_mod.Outbox.append_telemetry = _telemetry
outbox_mod.Outbox.append = _other

_gc_start = [0.0]


def _on_gc(phase, info):
    if phase == "start":
        _gc_start[0] = time.perf_counter()
    else:
        d = time.perf_counter() - _gc_start[0]
        stats["gc"][int(d / BUCKET_S)] += 1
        stats["gc_max_ms"] = max(stats["gc_max_ms"], d * 1000)


gc.callbacks.append(_on_gc)


def dump(path: Path) -> None:
    stats["threads"] = {t.native_id: t.name for t in threading.enumerate()}
    data = {k: (dict(v) if isinstance(v, Counter) else v) for k, v in stats.items()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def main() -> int:
    path = Path(sys.argv[1])

    def loop():
        while True:
            time.sleep(1.0)
            dump(path)

    threading.Thread(target=loop, name="bench-stats", daemon=True).start()
    from agent.cli.main import main as agent_main
    try:
        return agent_main(sys.argv[2:])
    finally:
        dump(path)


if __name__ == "__main__":
    sys.exit(main())
