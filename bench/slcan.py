#!/usr/bin/env python3
"""slcan receive cost: python-can's slcanBus (one byte per read) against the agent's
BufferedSlcanBus (adapters/slcan.py: what the port holds, in one read), both through
python-can's recv() on a pseudo-terminal fed classic 8-byte frames as fast as it takes them.

    python bench/slcan.py [--json] [--frames N]
Figures: CPU µs per frame of the receiving thread, and frames/s received.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from can.interfaces.slcan import slcanBus  # noqa: E402

from agent.adapters.slcan import BufferedSlcanBus  # noqa: E402


def line(can_id: int, data: bytes) -> bytes:
    return f"t{can_id:03X}{len(data)}{data.hex().upper()}\r".encode()


def measure(cls, frames: int) -> dict:
    stream = b"".join(line(0x100 + i % 64, bytes([i % 256]) * 8) for i in range(frames))
    master, slave = os.openpty()
    bus = cls(channel=os.ttyname(slave), sleep_after_open=0)
    try:
        os.set_blocking(master, False)
        try:  # what the bus wrote on open ("O\r"): the tty must not fill
            while os.read(master, 4096):
                pass
        except BlockingIOError:
            pass
        os.set_blocking(master, True)

        def feed():
            for i in range(0, len(stream), 4000):
                os.write(master, stream[i:i + 4000])

        writer = threading.Thread(target=feed, daemon=True)
        writer.start()
        got = 0
        cpu, wall = time.thread_time(), time.perf_counter()
        while got < frames and bus.recv(2.0) is not None:
            got += 1
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        writer.join(5)
    finally:
        bus.shutdown()
        os.close(master)
        os.close(slave)
    return {"bus": cls.__name__, "frames": got, "us_per_frame": round(cpu / got * 1e6, 1),
            "frames_per_s": round(got / wall)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    results = [measure(cls, args.frames) for cls in (slcanBus, BufferedSlcanBus)]
    if args.json:
        print(json.dumps({"results": results, "loadavg": os.getloadavg()[0]}))
    else:
        for r in results:
            print(f"{r['bus']:>17}: {r['us_per_frame']:6.1f} us CPU/frame, "
                  f"{r['frames_per_s']:,} frames/s ({r['frames']} frames)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
