"""`tcu-agent dbc FILE`: list the messages and signals of a CAN database."""

from __future__ import annotations

import json

from ..adapters.dbc import load_database
from ..errors import DbcError


def add_parser(sub, common) -> None:
    p = sub.add_parser("dbc", help="list the messages and signals of a CAN database",
                       description="List messages (id, cycle time) and signals (units, ranges, "
                                   "value tables) of a DBC/KCD/ARXML/SYM file.")
    p.add_argument("file", help="CAN database file")
    p.add_argument("--message", "-m", help="only this message (name or id)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    db = load_database(args.file)
    messages = sorted(db.messages, key=lambda m: m.frame_id)
    if args.message:
        messages = [m for m in messages if m.name == args.message or _id_matches(args.message, m)]
        if not messages:  # a typo must not look like an empty listing
            owners = [m.name for m in db.messages if any(s.name == args.message for s in m.signals)]
            hint = f" ({args.message} is a signal of {', '.join(owners)})" if owners else ""
            raise DbcError(f"no message {args.message} in {args.file}{hint}")
    if args.json:
        print(json.dumps([_message_dict(m) for m in messages], indent=1))
        return 0
    nsig = sum(len(m.signals) for m in messages)
    print(f"{args.file}: {len(messages)} messages, {nsig} signals")
    for m in messages:
        cycle = f"{m.cycle_time} ms" if m.cycle_time else "-"
        ext = " (extended)" if m.is_extended_frame else ""
        print(f"\n0x{m.frame_id:03X}{ext} {m.name}  {m.length} bytes  cycle {cycle}"
              f"  senders {','.join(m.senders) or '-'}")
        for s in m.signals:
            unit = f" [{s.unit}]" if s.unit else ""
            rng = f" {s.minimum}..{s.maximum}" if s.minimum is not None or s.maximum is not None else ""
            mux = " (multiplexer)" if s.is_multiplexer else (
                f" (mux {','.join(map(str, s.multiplexer_ids))})" if s.multiplexer_ids else "")
            print(f"  {s.name}{unit}{rng}  bit {s.start} len {s.length} "
                  f"{'LE' if s.byte_order == 'little_endian' else 'BE'}"
                  f"{' signed' if s.is_signed else ''} scale {s.scale} offset {s.offset}{mux}")
            if s.choices:
                table = ", ".join(f"{k}={v}" for k, v in list(s.choices.items())[:12])
                more = f", ... ({len(s.choices)} values)" if len(s.choices) > 12 else ""
                print(f"      values: {table}{more}")
    return 0


def _id_matches(text: str, m) -> bool:
    try:
        return int(text, 0) == m.frame_id
    except ValueError:
        return False


def _message_dict(m) -> dict:
    return {
        "id": m.frame_id, "name": m.name, "length": m.length, "extended": m.is_extended_frame,
        "cycle_time_ms": m.cycle_time, "senders": list(m.senders),
        "signals": [{
            "name": s.name, "start": s.start, "length": s.length, "byte_order": s.byte_order,
            "signed": s.is_signed, "scale": s.scale, "offset": s.offset, "minimum": s.minimum,
            "maximum": s.maximum, "unit": s.unit,
            "choices": {str(k): str(v) for k, v in (s.choices or {}).items()},
            "multiplexer_ids": s.multiplexer_ids,
        } for s in m.signals],
    }
