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
    `codes`: see build()."""
    env: dict[str, Any] = {"_from": int.from_bytes}
    sigs = plan(message, signal_names, env)
    if sigs is None:
        return None
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

    def emit(sig: Signal, pad: str) -> list[str]:
        if sig.choices is None:
            return [f"{pad}out.append(({sig.index}, {sig.value}))"]
        # cantools: choices.get(int(raw)) first, else the inner conversion, undecoded
        return [f"{pad}c = {sig.choices}.get(r)",
                f"{pad}out.append(({sig.index}, c if c is not None else {sig.value}))"]

    lines += tests(sigs, emit)
    lines.append("    return le, out")
    return build(lines, "decode", f"<decoder {message.name}>", env, codes)


class Signal:
    """One signal of a compiled decoder: where its bits are and how its value is made."""

    __slots__ = ("index", "mask", "raw", "value", "choices")

    def __init__(self, index: int, mask: int, raw: list[str], value: str, choices: str | None):
        self.index = index  # into the decoder's signal names
        self.mask = mask  # its bits in the little-endian integer of the frame
        self.raw = raw  # lines that set r to the raw value (le, data and be in scope)
        self.value = value  # expression of the value from r (the inner one for value tables)
        self.choices = choices  # env name of the value table, or None


def plan(message, signal_names: Sequence[str], env: dict[str, Any]) -> list[Signal] | None:
    """The signals' extraction, or None when this message is left to cantools."""
    if not compilable(message):
        return None
    by_name = {s.name: s for s in message.signals}
    nbits = message.length * 8
    out = []
    for i, name in enumerate(signal_names):
        sig = by_name[name]
        mask = (1 << sig.length) - 1
        if sig.byte_order == "little_endian":
            if sig.start + sig.length > nbits:
                return None  # signal extends past the DBC length: leave it to cantools
            bits = mask << sig.start
            raw = [f"r = (le >> {sig.start}) & {mask}" if sig.start else f"r = le & {mask}"]
        else:
            # DBC Motorola start bit = the MSB; count its position from the top of the frame.
            msb = (sig.start // 8) * 8 + (7 - sig.start % 8)
            shift = nbits - (msb + sig.length)
            if shift < 0:
                return None
            # Change detection on the little-endian diff with the signal's scattered bit mask;
            # the big-endian integer is built only when such a signal changed.
            bits = _motorola_le_mask(sig.start, sig.length)
            raw = ["if be is None:", "    be = _from(data, 'big')",
                   f"r = (be >> {shift}) & {mask}" if shift else f"r = be & {mask}"]
        if sig.is_signed:
            raw.append(f"if r & {1 << (sig.length - 1)}: r -= {1 << sig.length}")
        conv = sig.conversion
        choices = None
        if type(conv) is NamedSignalConversion:
            choices = f"_ch{i}"
            env[choices] = conv.choices
            conv = conv._conversion
        out.append(Signal(i, bits, raw, _scaled(conv, i, env), choices))
    return out


def tests(plan: list[Signal], emit: Callable[[Signal, str], list[str]]) -> list[str]:
    """The body that finds the changed signals: `if dl & mask:` per signal, under one test per
    group of about sqrt(n) neighbours (a frame's changes are usually one counter and its
    checksum: ~2 sqrt(n) tests rather than n). `emit(signal, indent)` uses r."""
    size = max(1, round(len(plan) ** 0.5)) if len(plan) >= 6 else len(plan) or 1
    lines = []
    for g in range(0, len(plan), size):
        group = plan[g:g + size]
        pad = "    "
        if len(group) > 1 and len(plan) > size:
            union = 0
            for sig in group:
                union |= sig.mask
            lines.append(f"    if dl & {union}:")
            pad = "        "
        for sig in group:
            lines.append(f"{pad}if dl & {sig.mask}:")
            lines += [f"{pad}    {line}" for line in sig.raw]
            lines += emit(sig, pad + "    ")
    return lines


def build(lines: list[str], name: str, filename: str, env: dict[str, Any], codes=None):
    """Compile and run the generated function's text; return the function `name`.

    `codes`: code objects kept from an earlier start, by (filename, source text) -- looked
    up before compiling (`codes.get(key)`), a new one stored into it (`codes[key] = code`).
    Compiling the Tesla DBC's decoders takes ~35 ms; loading them, well under 1."""
    text = "\n".join(line for line in lines if line)
    code = codes.get((filename, text)) if codes is not None else None
    if code is None:
        code = compile(text, filename, "exec")
        if codes is not None:
            codes[(filename, text)] = code
    exec(code, env)  # noqa: S102 - our own text
    return env[name]


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
