"""The core's fast path (compiled decoders that sample what changed) against cantools: on every
frame of the real logs, and on random frames against the generic sampling path."""

from __future__ import annotations

import cantools
import pytest
from cantools.database.namedsignalvalue import NamedSignalValue
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.adapters.canlog import read_frames
from agent.adapters.dbc import load_database
from agent.core.batch import encode_payload
from agent.core.fastdecode import compile_message
from agent.core.selection import EFF_FLAG, Sampling, Selection, SignalChoice, resolve
from agent.core.telemetry import TelemetryCore
from conftest import TEST_DBC, shared

REAL_LOGS = [("kona_power_on_ready_off.log", "kona_ev.dbc", 100_000),  # values compared, at least
             ("kona_parked_no_key.log", "kona_ev.dbc", 4_000),
             ("tesla_model3_scripted_soc.log", "tesla_model3.dbc", 30_000)]
T0 = 1_700_000_000.0


def comparable(v):
    # Strict: same type too (an int that became a float, or a name that lost its number, fails).
    if isinstance(v, NamedSignalValue):
        return type(v).__name__, v.name, v.value
    return type(v).__name__, v


def sample_value(v):
    return v.name if isinstance(v, NamedSignalValue) else v


@pytest.mark.parametrize("log,dbc,values", REAL_LOGS)
def test_core_decodes_every_changed_frame_as_cantools(log, dbc, values):
    """Frame by frame: after each frame whose bytes changed, every signal of its message as the
    core holds it equals cantools' decode of that frame (value-table names as the core asks for
    them), signals the frame does not carry are untouched, and exactly the signals whose value
    changed were sampled, at the frame's time. Unchanged and unselected frames change nothing."""
    db = load_database(shared(dbc))
    tc = Selection(messages=("*",), defaults=Sampling(heartbeat_s=0, timeout_ms=0))
    core = TelemetryCore(resolve(tc, [("can0", [db])]))
    counters = core.counters[0]
    last: dict[int, bytes] = {}
    frames = compared = 0
    for t, _, key, data in read_frames(shared(log)):
        entry = counters.entries.get(key)
        before = [s.raw for s in entry.signals] if entry is not None else []
        samples, errors = core.samples, counters.decode_errors
        core.feed(0, t, key, data)
        frames += 1
        if entry is None or last.get(key) == data:
            assert core.samples == samples
            assert all(s.raw is b for s, b in zip(entry.signals if entry else (), before))
            continue
        last[key] = data
        try:
            want = db.decode_message(key & 0x1FFFFFFF, data, decode_choices=True,
                                     allow_truncated=True, force_extended_id=bool(key & EFF_FLAG))
        except Exception:  # the core must count it as a decode error, not crash or guess
            assert counters.decode_errors == errors + 1, (hex(key), data)
            assert core.samples == samples
            assert all(s.raw is b for s, b in zip(entry.signals, before))
            continue
        assert counters.decode_errors == errors, (hex(key), data)
        changed = 0
        for s, b in zip(entry.signals, before):
            if s.sig not in want:  # not in this frame (multiplexed, or a short frame)
                assert s.raw is b, (entry.message.name, s.sig, data)
                continue
            assert comparable(s.raw) == comparable(want[s.sig]), (entry.message.name, s.sig, data)
            compared += 1
            if b is s.raw:
                continue
            if comparable(b) != comparable(s.raw):
                changed += 1
                assert s.sent_ms == int(t * 1000) and s.sent == sample_value(want[s.sig])
                assert type(s.sent) is type(sample_value(want[s.sig]))
        assert core.samples - samples == changed, (entry.message.name, data)
    assert frames == counters.frames
    assert compared >= values


def careful_reference(log, db) -> dict[str, list]:
    """cantools alone, used with care (as bench/ingest.py's reference): changed values per
    signal as (t_ms, value), value-table names as strings."""
    last: dict[int, bytes] = {}
    seen: dict[str, object] = {}
    out: dict[str, list] = {}
    for t, _, key, data in read_frames(log):
        if last.get(key) == data:
            continue
        last[key] = data
        try:
            msg = db.get_message_by_frame_id(key & 0x1FFFFFFF,
                                             force_extended_id=bool(key & EFF_FLAG))
            values = msg.decode(data, decode_choices=True, allow_truncated=True)
        except Exception:
            continue
        for name, v in values.items():
            name = f"{msg.name}.{name}"
            v = sample_value(v)
            if name not in seen or comparable(seen[name]) != comparable(v):
                seen[name] = v
                out.setdefault(name, []).append((int(t * 1000), comparable(v)))
    return out


@pytest.mark.parametrize("log,dbc", [("kona_power_on_ready_off.log", "kona_ev.dbc"),
                                     ("tesla_model3_scripted_soc.log", "tesla_model3.dbc")])
def test_batches_hold_what_careful_cantools_emits(log, dbc):
    """The whole output: per signal, the core's batched samples are the changed values the
    careful cantools loop emits, at the same times, of the same types."""
    db = load_database(shared(dbc))
    tc = Selection(messages=("*",), defaults=Sampling(heartbeat_s=0, timeout_ms=0))
    core = TelemetryCore(resolve(tc, [("can0", [db])]), max_batch_bytes=4096)
    core.feed_many((0, t, key, data) for t, _, key, data in read_frames(shared(log)))
    core.flush()
    got: dict[str, list] = {}
    batches = core.take_batches()
    for b in batches:
        for name, rows in b.sig.items():
            got.setdefault(name, []).extend((b.t0 + dt, comparable(v)) for dt, v in rows)
    want = careful_reference(shared(log), db)
    assert len(batches) > 10  # closed by size and age along the way
    assert got == want
    assert sum(b.samples for b in batches) == sum(map(len, want.values()))


def test_samplers_are_built_when_a_message_repeats_or_by_prepare():
    """A message's sampler is generated at its second frame (no code for the messages that
    never appear); prepare() builds them all first, with byte-identical batches."""
    db = load_database(shared("tesla_model3.dbc"))
    tc = Selection(messages=("*",), defaults=Sampling(heartbeat_s=0, timeout_ms=0))
    frames = [(0, t, key, data) for t, _, key, data in
              read_frames(shared("tesla_model3_scripted_soc.log"))][:5000]
    lazy, ready = (TelemetryCore(resolve(tc, [("can0", [db])])) for _ in range(2))
    ready.prepare()

    def generated(core):
        return {k for k, e in core.counters[0].entries.items()
                if e is not None and getattr(e.step, "__name__", "") == "sample"}

    assert len(generated(ready)) > 100 and not generated(lazy)
    for core in (lazy, ready):
        core.feed_many(frames)
        core.flush()
    seen = {key for _b, _t, key, _d in frames}
    assert generated(lazy) and generated(lazy) <= seen and len(generated(lazy)) < len(seen) + 1
    assert len(generated(lazy)) < len(generated(ready)) / 2  # most of the DBC never appears
    assert [encode_payload(b.payload("V", 1)) for b in lazy.take_batches()] == \
        [encode_payload(b.payload("V", 1)) for b in ready.take_batches()]


# -- the generated sampler against the generic path ------------------------------------------

def generic(core: TelemetryCore) -> TelemetryCore:
    """The same core with the generated samplers replaced by the generic path they inline:
    compile_message's change list handed to _update()."""
    for c in core.counters:
        for entry in c.entries.values():
            if entry is None or entry.fast is None:
                continue
            decode = compile_message(entry.message, [s.sig for s in entry.signals])

            def step(data, prev, t, entry=entry, decode=decode):
                le, changed = decode(data, prev)
                if changed:
                    core._update(entry.signals, changed, int(t * 1000), False)
                return le

            entry.step = step
    return core


def mixed_core(max_batch_bytes: int, gear_mapped: bool = True) -> TelemetryCore:
    """Shaped and unshaped signals in the same messages: deadband, throttle, map, scale, state;
    the value-table signal (Gear) mapped or sent by name."""
    db = cantools.database.load_string(TEST_DBC, "dbc", strict=False)
    gear = (SignalChoice(select="Gear", name="Vehicle.Gear", map={"D": "DRIVE", "7": "SEVEN"}),)
    tc = Selection(messages=("*",), defaults=Sampling(heartbeat_s=0, timeout_ms=0), signals=(
        SignalChoice(select="SOC", deadband=0.5),
        SignalChoice(select="PackCurrent", min_interval_ms=30),
        *(gear if gear_mapped else ()),
        SignalChoice(select="Ready", state=True),
        SignalChoice(select="Temp", scale=2.0, offset=1.0)))
    return TelemetryCore(resolve(tc, [("can0", [db])]), max_batch_bytes=max_batch_bytes)


frames_st = st.lists(st.tuples(st.sampled_from([0x100, 0x200, 0x300]),
                               st.binary(min_size=8, max_size=8) | st.binary(max_size=9),
                               st.integers(-30, 40)), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(frames_st, st.sampled_from([120, 180, 400, 65536]), st.booleans())
def test_generated_sampler_equals_the_generic_path(frames, max_batch_bytes, gear_mapped):
    """Any frames, also short, long and repeated ones: the same batches (byte for byte, closed
    at the same frames), values, raw values, counters and state changes as the generic path."""
    fast = mixed_core(max_batch_bytes, gear_mapped)
    slow = generic(mixed_core(max_batch_bytes, gear_mapped))
    t = T0
    for key, data, dt in frames:
        t += dt / 1000
        for core in (fast, slow):
            core.state_changed = False
            core.feed(0, t, key, data)
        assert fast.state_changed == slow.state_changed
        assert fast.batches.open_samples == slow.batches.open_samples
        assert fast.batches.budget == slow.batches.budget  # the same size estimate
        assert len(fast.batches.closed) == len(slow.batches.closed)
    for core in (fast, slow):
        core.tick(t + 0.05)
        core.flush()
    assert fast.snapshot() == slow.snapshot()
    assert [comparable(s.raw) for s in fast.signals] == [comparable(s.raw) for s in slow.signals]
    assert fast.counters[0].as_dict() == slow.counters[0].as_dict()
    def encode(core):
        return [encode_payload(b.payload("V", 1)) for b in core.take_batches()]

    assert encode(fast) == encode(slow)


def test_generic_reference_is_really_replaced():
    """The equivalence above compares two different paths: the generic one calls _update() for
    every changed frame, the generated one only for shaped signals."""
    calls = []
    for core in (mixed_core(65536), generic(mixed_core(65536))):
        n = 0
        update = core._update

        def counting(*a, update=update):
            nonlocal n
            n += 1
            update(*a)

        core._update = counting
        for e in core.counters[0].entries.values():  # rebuild with the counting update
            if e is not None and getattr(e.step, "__name__", "") == "sample":
                from agent.core.telemetry import _sampler
                e.step = _sampler(e, core.batches, counting)
        key = 0x100
        for i in range(1, 6):  # only the Counter (unshaped) changes after the first frame
            core.feed(0, T0 + i, key, bytes([0, 0, 0, 0, 0, 0, i, 0]))
        calls.append(n)
    assert calls == [1, 5]  # the full first frame; then the generated path never needed it
