"""Compiled per-message decoders that return only the signals whose bits changed.

Why: about half of real frames differ from the previous frame of their id, and in those
usually only a counter or a checksum moved. cantools decodes every signal of the frame
(~2-3 us); this compares the frame with the previous one as integers and extracts only
the signals whose bits differ, in generated straight-line Python (the habit cantools
itself follows: compile once, decode many). Values are produced by cantools' own
conversion objects, so scaling and value tables are exactly cantools'.

Only plain messages of integer signals are compiled; multiplexed messages, float signals
and frames whose length differs from the DBC go through cantools' decode (see telemetry.py).
The tests check both paths against cantools on every frame of the real logs.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from cantools.database.conversion import (
    IdentityConversion,
    LinearConversion,
    LinearIntegerConversion,
    NamedSignalConversion,
)

# fn(data, prev_int_or_None) -> (new_int, [(index, value), ...]); index into `signals`.
Compiled = Callable[[bytes, Any], tuple[int, list]]


def compilable(message) -> bool:
    return (not message.is_multiplexed()
            and all(not s.is_float for s in message.signals)
            and 0 < message.length <= 64)


def compile_message(message, signal_names: Sequence[str], codes=None) -> Compiled | None:
    """Build a change-detecting decoder for the named signals of `message`, or None.

    `codes`: compiled decoders kept from an earlier start, by (name, source text) -- looked
    up before compiling (`codes.get(key)`), a new one stored into it (`codes[key] = code`).
    Compiling the Tesla DBC's decoders takes ~35 ms; loading them, well under 1."""
    if not compilable(message):
        return None
    by_name = {s.name: s for s in message.signals}
    nbits = message.length * 8
    lines = ["def decode(data, prev):",
             "    le = _from(data, 'little')",
             "    if prev is None:",
             f"        dl = {(1 << nbits) - 1}",
             "    else:",
             "        dl = le ^ prev",
             "        if not dl:",
             "            return le, ()",
             "    be = None",
             "    out = []"]
    env: dict[str, Any] = {"_from": int.from_bytes}
    for i, name in enumerate(signal_names):
        sig = by_name[name]
        mask = (1 << sig.length) - 1
        if sig.byte_order == "little_endian":
            if sig.start + sig.length > nbits:
                return None  # signal extends past the DBC length: leave it to cantools
            lines.append(f"    if dl & {mask << sig.start}:")
            lines.append(f"        r = (le >> {sig.start}) & {mask}")
        else:
            # DBC Motorola start bit = the MSB; count its position from the top of the frame.
            msb = (sig.start // 8) * 8 + (7 - sig.start % 8)
            shift = nbits - (msb + sig.length)
            if shift < 0:
                return None
            # Change detection on the little-endian diff with the signal's scattered bit mask;
            # the big-endian integer is built only when such a signal changed.
            lines.append(f"    if dl & {_motorola_le_mask(sig.start, sig.length)}:")
            lines.append("        if be is None:")
            lines.append("            be = _from(data, 'big')")
            lines.append(f"        r = (be >> {shift}) & {mask}")
        if sig.is_signed:
            lines.append(f"        if r & {1 << (sig.length - 1)}: r -= {1 << sig.length}")
        conv = sig.conversion
        if type(conv) is NamedSignalConversion:
            # cantools: choices.get(int(raw)) first, else the inner conversion, undecoded
            env[f"_ch{i}"] = conv.choices
            lines.append(f"        c = _ch{i}.get(r)")
            lines.append(f"        out.append(({i}, c if c is not None else "
                         f"{_scaled(conv._conversion, i, env)}))")
        else:
            lines.append(f"        out.append(({i}, {_scaled(conv, i, env)}))")
    lines.append("    return le, out")
    text = "\n".join(line for line in lines if line)
    name = f"<decoder {message.name}>"
    code = codes.get((name, text)) if codes is not None else None
    if code is None:
        code = compile(text, name, "exec")
        if codes is not None:
            codes[(name, text)] = code
    exec(code, env)  # noqa: S102 - our own text
    return env["decode"]


def _scaled(conv, i: int, env: dict[str, Any]) -> str:
    """Python expression for cantools' raw_to_scaled(r) of `conv`, inlined where it is the
    plain `raw * scale + offset` (same objects, same operations: the same value and type)."""
    if type(conv) is IdentityConversion:
        return "r"
    if type(conv) in (LinearConversion, LinearIntegerConversion):
        scale, offset = conv.scale, conv.offset
        if type(scale) is int and type(offset) is int and scale == 1:
            return "r" if offset == 0 else f"r + {offset}"
        env[f"_s{i}"], env[f"_o{i}"] = scale, offset
        return f"r * _s{i} + _o{i}"
    env[f"_c{i}"] = conv.raw_to_scaled  # anything else: cantools' own call
    return f"_c{i}(r, False)"


def _motorola_le_mask(start: int, length: int) -> int:
    """The bits of a big-endian (Motorola) signal, as a mask on the little-endian integer."""
    mask = 0
    pos = start  # DBC bit numbering: byte * 8 + bit, bit 7 = the byte's MSB
    for _ in range(length):
        mask |= 1 << pos
        pos = pos + 15 if pos % 8 == 0 else pos - 1  # next less significant bit
    return mask
