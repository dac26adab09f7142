"""`tcu-agent replay LOG`: run the telemetry core over a CAN log as fast as it can."""

from __future__ import annotations

import itertools
import json
import sys
import time

from ..adapters.canlog import read_frames
from ..app.assemble import bus_plans, plans_for_dbc, telemetry_core
from ..config import load_config
from ..core.batch import encode_payload
from ..errors import AgentError, ConfigError

CHUNK = 4096  # frames per feed_many call
EPOCH_2001_S = 978_307_200  # timestamps below this are relative (device uptime), not UTC


def add_parser(sub, common) -> None:
    p = sub.add_parser(
        "replay", help="decode, sample and batch a CAN log (candump/asc/blf/trc)",
        description="Run the agent's telemetry core over a CAN log as fast as possible and "
                    "report what it produced. Give a config (-c) or CAN databases (--dbc, "
                    "which selects every signal).")
    p.add_argument("log", help="CAN log file: candump -L .log, .asc, .blf, .trc, .csv")
    # Not required=True: argparse would print the whole usage; run() says it in one line.
    src = p.add_mutually_exclusive_group()
    src.add_argument("-c", "--config", help="agent config file (TOML)")
    src.add_argument("--dbc", action="append", help="CAN database; repeatable; all signals")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--vin", help="VIN for the batches (default: the config's, or REPLAY)")
    p.add_argument("--start-ms", type=int,
                   help="UTC ms for the first frame when the log's clock is relative "
                        "(default: now); logs with UTC timestamps keep them")
    p.add_argument("--out", help="write the encoded batches here (a CBOR sequence, RFC 8742)")
    p.add_argument("--key", help="sign each batch with this vehicle key (COSE_Sign1, as the "
                                 "agent sends them; check with `tcu-agent verify`)")
    p.add_argument("--strict", action="store_true",
                   help="fail on the first line that is not a complete frame (default: skip "
                        "and count such lines)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if not args.config and not args.dbc:
        raise ConfigError("replay needs a config (-c CONFIG) or a CAN database (--dbc FILE)")
    log_stats: dict = {}
    frames_in = read_frames(args.log, log_stats, strict=args.strict)  # checked now, read lazily
    if args.config:
        config = load_config(args.config, args.set)
        plans = bus_plans(config)
        telemetry = config.telemetry
        vin = args.vin or config.vehicle.vin
        channels = {b.channel: i for i, b in enumerate(config.bus)}
    else:
        if args.set:
            raise ConfigError("--set needs a config file (-c)")
        from ..config import TelemetryConfig
        telemetry = TelemetryConfig(messages=("*",))
        plans = plans_for_dbc(args.dbc, telemetry)
        vin = args.vin or "REPLAY"
        channels = {}
    core = telemetry_core(plans, telemetry)
    encode = encode_payload
    if args.key:
        from ..adapters.keys import load_private_key
        from ..core.cose import Signer
        encode = Signer(load_private_key(args.key)).sign
    out = _open_out(args.out) if args.out else None
    seq = 0
    nbytes = 0
    offset = None
    started = time.perf_counter()
    try:
        while chunk := list(itertools.islice(frames_in, CHUNK)):
            if offset is None:  # logs with relative times start now (or at --start-ms)
                t = chunk[0][0]
                offset = 0.0 if t >= EPOCH_2001_S else (
                    (args.start_ms / 1000 if args.start_ms is not None else time.time()) - t)
            core.feed_many([(channels.get(channel, 0), t + offset, can_id, data)
                            for t, channel, can_id, data in chunk])
            if core.batches.closed:  # written as they close: memory stays flat on long logs
                seq, nbytes = _write(core, vin, seq, nbytes, out, encode)
        core.flush()
        seq, nbytes = _write(core, vin, seq, nbytes, out, encode)
    finally:
        if out:
            out.close()
    seconds = time.perf_counter() - started
    totals = {k: sum(getattr(c, k) for c in core.counters)
              for k in ("frames", "decoded", "unchanged", "unselected", "unknown_ids",
                        "decode_errors", "bad_length")}
    frames = totals["frames"]
    skipped = log_stats.get("skipped_lines", 0)
    skipped_at = log_stats.get("skipped_at", [])
    if frames and totals["unknown_ids"] * 2 > frames:
        print(f"tcu-agent replay: warning: {totals['unknown_ids']:,} of {frames:,} frames have "
              f"ids the CAN database does not know: the wrong DBC for this log?", file=sys.stderr)
    result = {**totals, "skipped_lines": skipped, "skipped_at": skipped_at, "samples": core.samples, "batches": seq,
              "bytes": nbytes,
              "signals": len(core.signals), "seconds": round(seconds, 4),
              "us_per_frame": round(seconds / frames * 1e6, 3) if frames else 0.0,
              "buses": {c.name: c.as_dict() for c in core.counters}}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.log}: {frames} frames in {seconds:.3f} s "
              f"({result['us_per_frame']} us/frame, {frames / seconds if seconds else 0:,.0f} frames/s)")
        print(f"  decoded {totals['decoded']}, unchanged {totals['unchanged']}, "
              f"unselected {totals['unselected']}, unknown ids {totals['unknown_ids']}, "
              f"decode errors {totals['decode_errors']}, length mismatches {totals['bad_length']}"
              + (f", unparsable lines skipped {skipped} ({_lines(skipped, skipped_at)})"
                 if skipped else ""))
        print(f"  {core.samples} samples of {len(core.signals)} signals in {seq} batches, "
              f"{nbytes:,} bytes " + ("signed COSE" if args.key else "CBOR") + (f" -> {args.out}" if args.out else ""))
    return 0


def _lines(skipped: int, at: list[int]) -> str:
    shown = ", ".join(map(str, at))
    return f"line{'s' if len(at) > 1 else ''} {shown}{', ...' if skipped > len(at) else ''}"


def _open_out(path: str):
    try:
        return open(path, "wb")
    except OSError as e:  # no such directory, a directory, no permission
        raise AgentError(f"--out {path}: cannot write: {e.strerror or e}") from None


def _write(core, vin, seq, nbytes, out, encode):
    for batch in core.take_batches():
        seq += 1
        blob = encode(batch.payload(vin, seq))
        nbytes += len(blob)
        if out:
            out.write(blob)
    return seq, nbytes
