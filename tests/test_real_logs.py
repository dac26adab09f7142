"""The core on real CAN logs from ../shared/data, checked against cantools frame by frame."""

from __future__ import annotations

import cantools

from agent.adapters.canlog import read_frames
from agent.adapters.dbc import load_database
from agent.core.selection import EFF_FLAG, Sampling, Selection, resolve
from agent.core.telemetry import TelemetryCore
from conftest import shared


def replay(log, dbc):
    db = load_database(dbc)
    tc = Selection(messages=("*",), defaults=Sampling(heartbeat_s=0, timeout_ms=0))
    core = TelemetryCore(resolve(tc, [("can0", [db])]))
    frames = list(read_frames(log))
    for t, _, key, data in frames:
        core.feed(0, t, key, data)
    return core, db, frames


def independent_counts(frames, db):
    """What the counters must say, computed without the agent."""
    with_signals = {m.frame_id | (EFF_FLAG if m.is_extended_frame else 0): m
                    for m in db.messages if m.signals}
    known = {m.frame_id | (EFF_FLAG if m.is_extended_frame else 0) for m in db.messages}
    last, changed, bad_length, unknown = {}, 0, 0, 0
    for _, _, key, data in frames:
        if key not in known:
            unknown += 1
            continue
        if key not in with_signals:
            continue
        if len(data) != with_signals[key].length:
            bad_length += 1
        if last.get(key) != data:
            changed += 1
        last[key] = data
    return changed, bad_length, unknown, last


def check_last_values(core, db, last):
    """Every signal's final value equals cantools' decode of the last frame of its id."""
    snap = core.snapshot()
    checked = 0
    for key, data in last.items():
        msg = db.get_message_by_frame_id(key & 0x1FFFFFFF, force_extended_id=bool(key & EFF_FLAG))
        try:
            expected = msg.decode(data, allow_truncated=True)
        except cantools.database.DecodeError:
            continue
        for sig, value in expected.items():
            want = value.name if hasattr(value, "name") else value
            assert snap[f"{msg.name}.{sig}"][1] == want, (msg.name, sig)
            checked += 1
    return checked


def test_kona_ready_log_counts_and_values():
    log, dbc = shared("kona_power_on_ready_off.log"), shared("kona_ev.dbc")
    core, db, frames = replay(log, dbc)
    c = core.counters[0]
    changed, bad_length, unknown, last = independent_counts(frames, db)
    assert c.frames == len(frames) == 24263
    assert c.decoded + c.decode_errors == changed
    assert c.bad_length == bad_length == 282  # 0x490 with 7 bytes, 0x5F5 with 8 of 64
    assert c.unknown_ids == unknown
    assert check_last_values(core, db, last) > 300


def test_kona_parked_log():
    log, dbc = shared("kona_parked_no_key.log"), shared("kona_ev.dbc")
    core, db, frames = replay(log, dbc)
    c = core.counters[0]
    changed, bad_length, unknown, last = independent_counts(frames, db)
    assert c.frames == len(frames) == 8969
    assert c.decoded + c.decode_errors == changed
    assert c.unknown_ids == unknown > 0  # 31 ids in the log, 26 in the DBC
    assert check_last_values(core, db, last) > 50


def test_tesla_dbc_and_log_with_multiplexed_signals():
    log, dbc = shared("tesla_model3_scripted_soc.log"), shared("tesla_model3.dbc")
    db = load_database(dbc)
    assert len(db.messages) == 159
    assert sum(len(m.signals) for m in db.messages) == 2752
    core, db, frames = replay(log, dbc)
    assert len(core.signals) == 2752
    changed, _, unknown, last = independent_counts(frames, db)
    assert core.counters[0].frames == 12138
    assert core.counters[0].decoded + core.counters[0].decode_errors == changed
    assert check_last_values(core, db, last) > 20
    soc = [v for b in (core.flush() or core.take_batches()) for _, v in b.sig.get("ID33AUI_rangeSOC.UI_SOC", [])]
    assert len(set(soc)) > 1  # the scripted capture steps the state of charge
