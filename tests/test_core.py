"""The sans-I/O telemetry core, fed frames built in the test with cantools' encoder."""

from __future__ import annotations

import cantools
import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.adapters.dbc import load_database
from agent.core.batch import encode_payload
from agent.core.selection import EFF_FLAG, Sampling, Selection, SignalChoice, resolve
from agent.core.telemetry import TelemetryCore

T0 = 1_700_000_000.0  # UTC seconds


def make_core(test_dbc, messages=("*",), signals=(), **defaults):
    tc = Selection(messages=tuple(messages), signals=tuple(signals),
                   defaults=Sampling(**{"heartbeat_s": 0, **defaults}))
    db = load_database(test_dbc)
    return TelemetryCore(resolve(tc, [("can0", [db])])), db


def frame(db, name, **values):
    msg = db.get_message_by_name(name)
    full = {s.name: 0 for s in msg.signals if not s.multiplexer_ids}
    full.update(values)
    key = msg.frame_id | EFF_FLAG if msg.is_extended_frame else msg.frame_id
    return key, msg.encode(full, strict=False)


def samples(core, name):
    core.flush()
    out = []
    for b in core.take_batches():
        for dt, v in b.sig.get(name, []):
            out.append((b.t0 + dt, v))
    return out


def test_on_change_dedup_and_value_tables(test_dbc):
    core, db = make_core(test_dbc)
    k, d = frame(db, "VCU_Drive", Speed=10.0, Gear=3)
    core.feed(0, T0, k, d)
    core.feed(0, T0 + 0.02, k, d)  # identical bytes: not decoded again
    k, d2 = frame(db, "VCU_Drive", Speed=12.5, Gear=3)
    core.feed(0, T0 + 0.04, k, d2)
    assert core.counters[0].unchanged == 1
    assert core.counters[0].decoded == 2
    assert samples(core, "VCU_Drive.Gear") == [(int(T0 * 1000), "D")]
    assert [v for _, v in samples(core, "VCU_Drive.Speed")] == []  # already taken above


def test_speed_samples_in_order_with_dt(test_dbc):
    core, db = make_core(test_dbc)
    for i, speed in enumerate([10.0, 10.0, 11.0, 12.0]):
        core.feed(0, T0 + i * 0.02, *frame(db, "VCU_Drive", Speed=speed))
    core.flush()
    (batch,) = core.take_batches()
    assert batch.t0 == int(T0 * 1000)
    assert batch.sig["VCU_Drive.Speed"] == [(0, 10.0), (40, 11.0), (60, 12.0)]
    payload = cbor2.loads(encode_payload(batch.payload("VIN1", 7, drop=3)))
    rows = {k: [list(r) for r in v] for k, v in batch.sig.items()}  # CBOR arrays decode as lists
    assert payload == {"v": 1, "vin": "VIN1", "seq": 7, "t0": int(T0 * 1000), "sig": rows,
                       "drop": 3}
    assert "drop" not in batch.payload("VIN1", 8)


def test_signed_big_endian_and_scaling_match_cantools(test_dbc):
    core, db = make_core(test_dbc)
    k, d = frame(db, "BMS_Status", SOC=55.5, PackVoltage=401.2, PackCurrent=-120.5, Temp=-20)
    core.feed(0, T0, k, d)
    snap = core.snapshot()
    expected = db.decode_message(0x100, d)
    for name in ("SOC", "PackVoltage", "PackCurrent", "Temp", "Counter"):
        assert snap[f"BMS_Status.{name}"][1] == expected[name]
    assert snap["BMS_Status.Temp"][1] == -20
    assert snap["BMS_Status.PackCurrent"][1] == pytest.approx(-120.5)


def test_extended_and_standard_ids_with_same_number_are_distinct(test_dbc):
    core, db = make_core(test_dbc)
    core.feed(0, T0, *frame(db, "EXT_Clash", Value=42))
    core.feed(0, T0, *frame(db, "BMS_Status", Counter=9))
    snap = core.snapshot()
    assert snap["EXT_Clash.Value"][1] == 42
    assert snap["BMS_Status.Counter"][1] == 9
    core.feed(0, T0, 0x7AB, b"\x00")
    assert core.counters[0].unknown_ids == 1


def test_multiplexed_signals(test_dbc):
    core, db = make_core(test_dbc)
    msg = db.get_message_by_name("OBC_Mux")
    core.feed(0, T0, 0x300, msg.encode({"Page": 0, "AcVoltage": 230}))
    core.feed(0, T0 + 0.01, 0x300, msg.encode({"Page": 1, "AcCurrent": 16.0}))
    snap = core.snapshot()
    assert snap["OBC_Mux.AcVoltage"][1] == 230
    assert snap["OBC_Mux.AcCurrent"][1] == pytest.approx(16.0)


def test_deadband(test_dbc):
    core, db = make_core(test_dbc, signals=[SignalChoice(select="SOC", deadband=0.5)],
                         messages=())
    for i, soc in enumerate([50.0, 50.2, 50.4, 50.6, 50.7, 49.9]):
        core.feed(0, T0 + i * 0.1, *frame(db, "BMS_Status", SOC=soc))
    assert [v for _, v in samples(core, "BMS_Status.SOC")] == pytest.approx([50.0, 50.6, 49.9])


def test_throttle_keeps_latest_value(test_dbc):
    core, db = make_core(test_dbc, messages=(),
                         signals=[SignalChoice(select="Speed", min_interval_ms=100)])
    for i in range(10):  # every 30 ms for 270 ms
        core.feed(0, T0 + i * 0.03, *frame(db, "VCU_Drive", Speed=float(i)))
    core.tick(T0 + 0.5)
    got = samples(core, "VCU_Drive.Speed")
    values = [v for _, v in got]
    times = [t - int(T0 * 1000) for t, _ in got]
    assert values[0] == 0.0 and values[-1] == 9.0  # the first at once, the latest never lost
    assert values == sorted(values) and 3 <= len(values) <= 4
    assert all(b - a >= 100 for a, b in zip(times, times[1:]))


def test_heartbeat_resends_unchanged_value(test_dbc):
    core, db = make_core(test_dbc, messages=(), signals=[
        SignalChoice(select="Gear", heartbeat_s=1.0, timeout_ms=0)])
    k, d = frame(db, "VCU_Drive", Gear=0)
    for i in range(31):  # 3 s of identical frames every 100 ms
        core.feed(0, T0 + i * 0.1, k, d)
    got = samples(core, "VCU_Drive.Gear")
    assert [v for _, v in got] == ["P", "P", "P", "P"]
    assert [t - int(T0 * 1000) for t, _ in got] == [0, 1000, 2000, 3000]


def test_timeout_sends_null_then_value_again(test_dbc):
    core, db = make_core(test_dbc, messages=("VCU_Drive",))  # cycle 20 ms -> auto timeout 500 ms
    k, d = frame(db, "VCU_Drive", Speed=30.0, Gear=3)
    core.feed(0, T0, k, d)
    core.tick(T0 + 0.4)
    assert core.snapshot()["VCU_Drive.Speed"][1] == 30.0
    core.tick(T0 + 0.7)
    assert core.snapshot()["VCU_Drive.Speed"][1] is None
    core.feed(0, T0 + 1.0, k, d)  # the same bytes as before the silence: must be sent again
    assert [v for _, v in samples(core, "VCU_Drive.Speed")] == [30.0, None, 30.0]


def test_timeout_auto_is_off_without_cycle_time(test_dbc):
    core, db = make_core(test_dbc, messages=("EXT_Clash",))
    core.feed(0, T0, *frame(db, "EXT_Clash", Value=1))
    core.tick(T0 + 60)
    assert core.snapshot()["EXT_Clash.Value"][1] == 1


def test_mapping_scaling_and_output_names(test_dbc):
    core, db = make_core(test_dbc, messages=(), signals=[
        SignalChoice(select="VCU_Drive.Speed", name="Vehicle.Speed", scale=0.5, offset=1),
        SignalChoice(select="Ready", name="Vehicle.IsReady", map={"0": False, "1": True}),
        SignalChoice(select="Gear", name="Vehicle.Gear", map={"D": "DRIVE", "7": "SEVEN"}),
    ])
    core.feed(0, T0, *frame(db, "VCU_Drive", Speed=100.0, Ready=1, Gear=3))
    snap = core.snapshot()
    assert snap["Vehicle.Speed"][1] == pytest.approx(51.0)
    assert snap["Vehicle.IsReady"][1] is True
    assert snap["Vehicle.Gear"][1] == "DRIVE"
    core.feed(0, T0 + 0.1, *frame(db, "VCU_Drive", Speed=100.0, Ready=1, Gear=7))
    assert core.snapshot()["Vehicle.Gear"][1] == "SEVEN"  # raw number behind no name


def test_batch_closes_by_age_and_size(test_dbc):
    core, db = make_core(test_dbc, messages=("BMS_Status",))
    for i in range(30):  # counter changes every 100 ms for 3 s
        core.feed(0, T0 + i * 0.1, *frame(db, "BMS_Status", Counter=i % 16))
    batches = core.take_batches()
    assert len(batches) >= 2
    assert all(b.t_end - b.t0 <= 1000 for b in batches)
    small = TelemetryCore(resolve(Selection(messages=("BMS_Status",)),
                                  [("can0", [db])]), max_batch_bytes=256)
    for i in range(20):
        small.feed(0, T0 + i * 0.001, *frame(db, "BMS_Status", Counter=i % 16, SOC=i))
    sizes = [len(encode_payload(b.payload("V", 1))) for b in small.take_batches()]
    assert sizes and max(sizes) <= 256


def test_bad_length_frames_are_counted_and_decoded_truncated(test_dbc):
    core, db = make_core(test_dbc)
    core.feed(0, T0, 0x200, bytes([0x03, 0xE8, 0x03]))  # 3 bytes where the DBC says 8
    c = core.counters[0]
    assert c.bad_length == 1 and c.decode_errors == 0
    assert core.snapshot()["VCU_Drive.Speed"][1] == pytest.approx(10.0)
    assert "VCU_Drive.Gear" in core.snapshot()
    core.feed(0, T0 + 0.01, 0x200, b"")  # nothing decodable at all: counted, not fatal
    core.feed(0, T0 + 0.02, 0x300, bytes([7]))  # a multiplexer value the DBC does not know
    assert c.frames == 3


def test_time_never_goes_backwards_in_a_batch(test_dbc):
    core, db = make_core(test_dbc)
    core.feed(0, T0 + 0.5, *frame(db, "VCU_Drive", Speed=1.0))
    core.feed(0, T0 + 0.4, *frame(db, "VCU_Drive", Speed=2.0))  # another bus's clock lags
    core.flush()
    (batch,) = core.take_batches()
    dts = [dt for dt, _ in batch.sig["VCU_Drive.Speed"]]
    assert dts == sorted(dts) and min(dts) >= 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=8, max_size=8), min_size=1, max_size=6))
def test_fast_path_agrees_with_cantools(frames):
    """Any sequence of frames: the compiled change-detecting decoder ends in cantools' values."""
    db = cantools.database.load_string(TEST_DBC_TEXT, "dbc", strict=False)
    core = TelemetryCore(resolve(Selection(messages=("*",), defaults=Sampling(heartbeat_s=0)),
                                 [("can0", [db])]))
    for i, data in enumerate(frames):
        for key in (0x100, 0x200):
            core.feed(0, T0 + i * 0.01, key, data)
    snap = core.snapshot()
    for key, name in ((0x100, "BMS_Status"), (0x200, "VCU_Drive")):
        expected = db.decode_message(key, frames[-1])
        for sig, value in expected.items():
            got = snap[f"{name}.{sig}"][1]
            want = value.name if hasattr(value, "name") else value
            assert got == want and type(got) is type(want), (name, sig)


from conftest import TEST_DBC as TEST_DBC_TEXT  # noqa: E402


def test_values_from_other_sources(test_dbc):
    """Modem and GNSS values enter the same sampling and batches under their own names."""
    core, db = make_core(test_dbc)
    core.external_heartbeat_ms = 1000
    core.feed_values(T0, {"Vehicle.Connectivity.SignalStrength": -71, "Vehicle.X": "home"})
    core.feed_values(T0 + 0.5, {"Vehicle.Connectivity.SignalStrength": -71})
    core.feed_values(T0 + 0.6, {"Vehicle.Connectivity.SignalStrength": -75})
    core.tick(T0 + 1.7)
    got = samples(core, "Vehicle.Connectivity.SignalStrength")
    assert [(t - int(T0 * 1000), v) for t, v in got] == [(0, -71), (600, -75), (1700, -75)]
    assert core.lookup("Vehicle.X") == ("home", int(T0 * 1000))
    assert core.snapshot()["Vehicle.Connectivity.SignalStrength"][1] == -75


def test_feed_many_counts_a_frame_that_raises_and_takes_the_rest(test_dbc):
    from agent.app.assemble import plans_for_dbc
    from agent.core.telemetry import TelemetryCore

    core = TelemetryCore(plans_for_dbc([test_dbc]))
    frames = [(0, 1.0 + i / 100, 0x100, bytes([i]) * 8) for i in range(10)]
    frames.insert(3, (7, 1.5, 0x100, b"\0" * 8))  # bus index 7 does not exist: IndexError
    core.feed_many(frames)
    assert core.internal_errors == 1 and "IndexError" in core.last_internal_error
    assert core.counters[0].frames == 10  # the other frames all arrived


# -- freshness cannot be faked from the CAN side (hardening) ----------------------------------

def test_short_frame_refreshes_only_the_signals_it_carries(test_dbc):
    core, db = make_core(test_dbc, timeout_ms=500)
    k, d = frame(db, "VCU_Drive", Speed=10.0, Gear=0)
    core.feed(0, T0, k, d)
    # Speed is bytes 0-1 (Motorola), Gear byte 2: a DLC-2 frame carries Speed only, and DLC 0
    # carries nothing.
    for i in range(1, 20):
        core.feed(0, T0 + i * 0.1, k, d[:2])
        core.feed(0, T0 + i * 0.1 + 0.01, k, b"")
        core.tick(T0 + i * 0.1 + 0.02)
    speed, t_speed = core.lookup("VCU_Drive.Speed")
    gear, t_gear = core.lookup("VCU_Drive.Gear")
    assert speed == 10.0 and t_speed == int((T0 + 1.9) * 1000)
    assert gear is None  # timed out: no frame since T0 carried it completely
    assert t_gear == int(T0 * 1000)
    assert core.counters[0].bad_length == 38


def test_same_short_frame_again_still_refreshes_its_signals(test_dbc):
    core, db = make_core(test_dbc)
    k, d = frame(db, "VCU_Drive", Speed=10.0)
    core.feed(0, T0, k, d[:2])
    core.feed(0, T0 + 1, k, d[:2])
    assert core.counters[0].unchanged == 1
    assert core.lookup("VCU_Drive.Speed") == (10.0, int((T0 + 1) * 1000))
    assert core.lookup("VCU_Drive.Gear") is None  # never carried: never seen


def live_core(test_dbc, **defaults):
    tc = Selection(messages=("*",), defaults=Sampling(**{"heartbeat_s": 0, **defaults}))
    db = load_database(test_dbc)
    return TelemetryCore(resolve(tc, [("can0", [db])]), max_batch_age_ms=1000,
                         frame_skew_s=1.0), db


def test_live_frame_from_the_future_is_taken_at_the_agent_clock(test_dbc):
    core, db = live_core(test_dbc, timeout_ms=500)
    core.tick(T0)
    k, d = frame(db, "VCU_Drive", Speed=10.0)
    core.feed(0, T0 + 1800, k, d)  # stamped 30 minutes ahead
    assert core.future_frames == 1
    assert core.lookup("VCU_Drive.Speed")[1] == int((T0 + 1.0) * 1000)  # clock + skew
    # The signal still times out on the agent's clock, and the batch still closes on time.
    core.tick(T0 + 2.0)
    assert core.take_batches()  # 1 s after the clamped sample: closed, not 30 minutes later
    assert core.lookup("VCU_Drive.Speed")[0] is None


def test_live_frames_do_not_move_the_clock(test_dbc):
    core, db = live_core(test_dbc)
    core.tick(T0)
    k, d = frame(db, "VCU_Drive", Speed=10.0)
    for i in range(5):  # each frame stamped just inside the skew must not creep the clock on
        k, d = frame(db, "VCU_Drive", Speed=10.0 + i)
        core.feed(0, T0 + 0.99 * (i + 1), k, d)
    assert core.clock == T0
    assert core.lookup("VCU_Drive.Speed")[1] == int((T0 + 1.0) * 1000)
