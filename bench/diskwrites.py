#!/usr/bin/env python3
"""Outbox disk writes: /proc/self/io write_bytes per payload byte stored, for the outbox path
alone, used the way the live agent uses it (one ~11 KB telemetry batch appended, handed out and
acknowledged at a time; at 4,000 frames/s the agent closes about one a second).

write_bytes counts a page when it goes from clean to dirty, so a page written again after an
fsync (or after the kernel's writeback) counts again. The kernel writes dirty pages back after
30 s (vm.dirty_expire_centisecs); this loop runs much faster than one batch a second, so every
--writeback batches it forces that writeback itself (fdatasync of every file in the outbox's
directory), which is what 30 s of real time would do at one batch a second.

    python bench/diskwrites.py [--batches N] [--size BYTES] [--writeback K] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from agent.adapters.outbox import Outbox  # noqa: E402

TARGET = 2.0  # issue 18: disk writes <= 2x the bytes the outbox stores


def io_counters() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


def writeback(directory: Path) -> None:
    """What the kernel's periodic writeback does: every dirty page of these files is written."""
    for path in directory.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)


def measure(batches: int, size: int, every: int) -> dict:
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        directory = Path(tmp)
        ob = Outbox(directory)
        payload = os.urandom(size)  # signed and compressed: incompressible
        for _ in range(5):  # warm-up: files created, first pages allocated
            ob.append_telemetry(lambda s, d: payload, 100, 0, "t")
            ob.ack_many([r.id for r in ob.peek(10)])
        writeback(directory)
        before = io_counters()
        stored = 0
        for i in range(1, batches + 1):
            ob.append_telemetry(lambda s, d: payload, 100, 0, "t")
            stored += size
            ob.ack_many([r.id for r in ob.peek(10)])
            if i % every == 0:
                writeback(directory)
        writeback(directory)
        after = io_counters()
        ob.close()
    written = after["write_bytes"] - before["write_bytes"]
    cancelled = after["cancelled_write_bytes"] - before["cancelled_write_bytes"]
    return {"batches": batches, "payload_bytes": size, "writeback_every": every,
            "stored_bytes": stored, "write_bytes": written, "cancelled_write_bytes": cancelled,
            "write_bytes_per_batch": round(written / batches),
            "disk_over_payload": round(written / stored, 2), "target": TARGET}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--size", type=int, default=11_000, help="payload bytes per batch")
    ap.add_argument("--writeback", type=int, default=30,
                    help="batches between forced writebacks (30: 30 s at one batch a second)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    r = measure(args.batches, args.size, args.writeback)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['batches']} batches of {r['payload_bytes']} B: {r['write_bytes']} B written, "
              f"{r['write_bytes_per_batch']} B per batch, {r['disk_over_payload']}x the payload "
              f"(target <= {TARGET}x); cancelled_write_bytes {r['cancelled_write_bytes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
