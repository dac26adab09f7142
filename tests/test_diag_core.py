"""The pure diagnostics core: DTC codes, PID decoding, the record, the scheduler."""

from __future__ import annotations

import pytest

from agent.core import diag as D
from agent.core.conditions import parse_condition
from agent.errors import AgentError


# -- codes and decoding ---------------------------------------------------------------------

@pytest.mark.parametrize("value, code", [(0x0A80, "P0A80"), (0xC100, "U0100"), (0x9234, "B1234"),
                                         (0x4035, "C0035"), (0x3FFF, "P3FFF")])
def test_dtc_codes_round_trip(value, code):
    assert D.dtc_code(value) == code
    assert D.parse_dtc(code) == value


def test_uds_dtc_has_failure_type_byte():
    assert D.uds_dtc_code(0x0A801C) == "P0A80-1C"
    assert D.uds_dtc_code(0xC10000) == "U0100-00"
    assert D.parse_dtc("P0A80-1C") == 0x0A801C


@pytest.mark.parametrize("bad", ["P0A8", "X0A80", "P4A80", "P0A80-1", "P0AZ0", "P0A80-ZZ"])
def test_bad_dtc_text(bad):
    with pytest.raises(ValueError):
        D.parse_dtc(bad)


def test_mode01_standard_pids():
    d = D.decode_mode01
    assert d(bytes.fromhex("410d3c")) == {0x0D: 60}
    assert d(bytes.fromhex("410c1af8")) == {0x0C: 1726.0}
    assert d(bytes.fromhex("41055a")) == {0x05: 50}
    assert d(bytes.fromhex("41463a")) == {0x46: 18}
    assert d(bytes.fromhex("412fff")) == {0x2F: 100.0}
    assert d(bytes.fromhex("41423778")) == {0x42: 14.2}
    assert d(bytes.fromhex("41a60001e240")) == {0xA6: 12345.6}
    assert d(bytes.fromhex("415b80")) == {0x5B: 50.2}
    assert d(bytes.fromhex("411f0e10")) == {0x1F: 3600}
    assert d(bytes.fromhex("410183076500")) == {0x01: 3}  # MIL on, 3 DTCs: a plain number
    # several PIDs in one answer, then padding
    assert d(bytes.fromhex("410d3c0c1af8aaaa")) == {0x0D: 60, 0x0C: 1726.0}


def test_supported_pid_bitmaps():
    assert D.decode_mode01(bytes.fromhex("4100BE1FA813")) == {0x00: frozenset(
        {0x01, 0x03, 0x04, 0x05, 0x06, 0x07, 0x0C, 0x0D, 0x0E, 0x0F, 0x10, 0x11, 0x13, 0x15,
         0x1C, 0x1F, 0x20})}
    assert D.decode_mode01(bytes.fromhex("41A000000001")) == {0xA0: frozenset({0xC0})}


@pytest.mark.parametrize("bad", ["", "41", "420d3c", "410c1a", "7f0112"])
def test_mode01_foreign_or_truncated(bad):
    with pytest.raises(ValueError):
        D.decode_mode01(bytes.fromhex(bad))


def test_pid_lookup_by_name_and_number():
    assert D.pid_number("vehiclespeed") == 0x0D
    assert D.pid_number(0xA6) == 0xA6
    with pytest.raises(ValueError, match="unknown PID name"):
        D.pid_number("Warp")
    with pytest.raises(ValueError, match="not one this agent decodes"):
        D.pid_number(0x99)


def test_obd_dtc_answers():
    assert D.decode_obd_dtcs(bytes.fromhex("4302" "0a80" "c100"), 3) == ["P0A80", "U0100"]
    assert D.decode_obd_dtcs(bytes.fromhex("4700"), 7) == []
    assert D.decode_obd_dtcs(bytes.fromhex("4a010d27"), 0x0A) == ["P0D27"]
    assert D.decode_obd_dtcs(bytes.fromhex("43" "0a80" "0000"), 3) == ["P0A80"]  # no count byte
    assert D.decode_obd_dtcs(bytes.fromhex("43" "01" "0a80" "c100"), 3) == ["P0A80"]  # count wins
    with pytest.raises(ValueError):
        D.decode_obd_dtcs(bytes.fromhex("4700"), 3)
    merged = D.merge_obd(["P0A80"], ["P0A80", "P0300"], ["P0D27"])
    assert merged == [{"code": "P0300", "status": 0x04}, {"code": "P0A80", "status": 0x0C},
                      {"code": "P0D27", "status": 0x08}]


# -- parameters -----------------------------------------------------------------------------

@pytest.mark.parametrize("name, params, needle", [
    ("diag.read_dtcs", {"ecu": "bms"}, "takes no parameter 'ecu'"),
    ("diag.read_dtcs", {"ecus": "bms"}, "list of 1-32"),
    ("diag.read_dtcs", {"ecus": []}, "list of 1-32"),
    ("diag.clear_dtcs", {"ecus": [1]}, "not an ECU name"),
    ("diag.clear_dtcs", {"ecus": ["a", "a"]}, "named twice"),
    ("diag.read_data", {"ecu": "bms"}, "did: needed"),
    ("diag.read_data", {"ecu": "bms", "did": 70000}, "0..65535"),
    ("diag.read_data", {"ecu": "bms", "did": True}, "0..65535"),
    ("diag.read_data", {"did": 1}, "ecu: needed"),
    ("diag.read_data", {"ecu": "bms", "did": 1, "x": 2}, "no parameter 'x'"),
])
def test_bad_params(name, params, needle):
    with pytest.raises(AgentError, match=needle) as info:
        D.check_params(name, params)
    assert info.value.detail


def test_good_params():
    D.check_params("diag.read_dtcs", {})
    D.check_params("diag.read_dtcs", {"ecus": ["bms", "vcu"]})
    D.check_params("diag.read_data", {"ecu": "bms", "did": 0xF190})


# -- the record -----------------------------------------------------------------------------

def test_store_changes_only_with_the_dtcs():
    s = D.DtcStore()
    a = [{"code": "P0A80-1C", "status": 0x2F}]
    assert s.update("bms", a, 1000) and s.changed
    s.changed = False
    assert not s.update("bms", list(a), 2000) and not s.changed
    assert s.payload("V1", 3000) == {"v": 1, "vin": "V1", "t": 3000,
                                     "ecus": {"bms": {"t": 1000, "dtcs": a}}}
    assert s.update("bms", [], 4000)
    assert s.ecus["bms"] == {"t": 4000, "dtcs": []}


# -- the scheduler --------------------------------------------------------------------------

class Vehicle:
    """Signal values for preconditions, as TelemetryCore.lookup gives them."""

    def __init__(self):
        self.values = {}

    def lookup(self, name):
        return self.values.get(name)


PARKED = (parse_condition('VCU_Status.Gear == "P"', "t"),)


def sched(ecus, vehicle=None, now=0, **kw):
    v = vehicle or Vehicle()
    return D.DiagScheduler(ecus, v.lookup, PARKED, 2000, kw.pop("queue_size", 8), now, **kw)


UDS = D.EcuPlan("bms", "uds", 0, 50)
OBD = D.EcuPlan("vcu", "obd", 0, 50, (D.PidPlan(0x0D, 1000, "OBD.VehicleSpeed"),
                                      D.PidPlan(0xA6, 5000, "OBD.Odometer"),
                                      D.PidPlan(0x2F, 1000, "OBD.FuelLevel")))
DTC = [{"code": "P0A80-1C", "status": 8}]


def test_read_dtcs_one_outstanding_per_ecu_and_spacing():
    s = sched([UDS, D.EcuPlan("vcu", "obd", 0, 50)])
    assert s.submit("c1", D.READ_DTCS, {}, 0) == [D.Status("c1", "ACCEPTED")]
    assert [s.status for s in s.submit("c2", D.READ_DTCS, {"ecus": ["bms"]}, 0)] == ["ACCEPTED"]
    reqs = s.poll(0)
    assert sorted((r.ecu, r.op) for r in reqs) == [("bms", "dtcs"), ("vcu", "dtcs")]
    assert s.poll(1) == []  # both outstanding
    by = {r.ecu: r for r in reqs}
    assert s.done(by["bms"].token, D.Result(True, DTC), 100) == []
    assert s.poll(120) == []  # spacing: 50 ms after the answer
    out = s.done(by["vcu"].token, D.Result(False, error="NO_RESPONSE"), 130)
    assert out == [D.Status("c1", "SUCCEEDED", result={"ecus": {
        "bms": {"dtcs": DTC}, "vcu": {"error": "NO_RESPONSE"}}})]
    second = s.poll(150)
    assert [(r.ecu, r.op) for r in second] == [("bms", "dtcs")]
    out = s.done(second[0].token, D.Result(False, error="NRC_0x22"), 200)
    assert out[0].status == "FAILED" and out[0].reason == "NO_RESPONSE"
    assert out[0].result == {"ecus": {"bms": {"error": "NRC_0x22"}}}
    assert not s.jobs


def test_unknown_ecu_and_read_data_on_obd_are_bad_params():
    s = sched([UDS, OBD])
    [st] = s.submit("c", D.READ_DTCS, {"ecus": ["nope"]}, 0)
    assert (st.status, st.reason) == ("REJECTED", "BAD_PARAMS") and "nope" in st.detail
    [st] = s.submit("d", D.READ_DATA, {"ecu": "vcu", "did": 1}, 0)
    assert (st.status, st.reason) == ("REJECTED", "BAD_PARAMS")
    assert s.poll(0) == [] or all(r.op != "did" for r in s.poll(0))


def test_clear_needs_parked_then_reads_again():
    v = Vehicle()
    s = sched([UDS], v)
    [st] = s.submit("c", D.CLEAR_DTCS, {}, 1000)
    assert (st.status, st.reason) == ("REJECTED", "PRECONDITION_FAILED")
    v.values["VCU_Status.Gear"] = ("D", 900)
    [st] = s.submit("c", D.CLEAR_DTCS, {}, 1000)
    assert st.reason == "PRECONDITION_FAILED" and "needs == 'P'" in st.detail
    assert s.poll(1000) == []  # nothing sent
    v.values["VCU_Status.Gear"] = ("P", 900)
    assert s.submit("c", D.CLEAR_DTCS, {}, 1000)[0].status == "ACCEPTED"
    [clear] = s.poll(1000)
    assert clear.op == "clear"
    assert s.done(clear.token, D.Result(True), 1010) == []
    [read] = s.poll(1100)
    assert read.op == "dtcs"
    [st] = s.done(read.token, D.Result(True, []), 1200)
    assert st.status == "SUCCEEDED" and st.result == {"ecus": {"bms": {"dtcs": []}}}


def test_clear_rechecked_when_its_turn_comes():
    v = Vehicle()
    v.values["VCU_Status.Gear"] = ("P", 0)
    s = sched([UDS], v)
    s.submit("r", D.READ_DTCS, {}, 0)
    [read] = s.poll(0)
    s.submit("c", D.CLEAR_DTCS, {}, 0)
    v.values["VCU_Status.Gear"] = ("D", 100)  # shifted while the read ran
    s.done(read.token, D.Result(True, DTC), 100)
    out = s.poll(200)
    assert not any(isinstance(o, D.Request) for o in out)
    [st] = out
    assert (st.status, st.reason) == ("FAILED", "PRECONDITION_FAILED")
    assert st.result["ecus"]["bms"]["error"].startswith("PRECONDITION_FAILED: VCU_Status.Gear")


def test_busy_beyond_queue_size():
    s = sched([UDS], queue_size=1)
    s.submit("a", D.READ_DTCS, {}, 0)
    [st] = s.submit("b", D.READ_DTCS, {}, 0)
    assert (st.status, st.reason) == ("REJECTED", "BUSY")


def test_read_data_result():
    s = sched([UDS])
    s.submit("d", D.READ_DATA, {"ecu": "bms", "did": 0xF190}, 0)
    [r] = s.poll(0)
    assert (r.op, r.arg) == ("did", 0xF190)
    [st] = s.done(r.token, D.Result(True, ("4142", "AB")), 10)
    assert st.result == {"ecu": "bms", "did": 0xF190, "hex": "4142", "value": "AB"}
    s.submit("e", D.READ_DATA, {"ecu": "bms", "did": 1}, 10)
    [r] = s.poll(100)
    [st] = s.done(r.token, D.Result(False, error="NRC_0x31"), 110)
    assert (st.status, st.reason, st.detail) == ("FAILED", "NO_RESPONSE", "bms: NRC_0x31")


def test_supported_pids_first_then_only_supported_polled():
    s = sched([OBD])
    [r] = s.poll(0)
    assert (r.op, r.arg) == ("supported", 0x00)
    s.done(r.token, D.Result(True, frozenset({0x0D, 0x20})), 10)
    [r] = s.poll(100)
    assert (r.op, r.arg) == ("supported", 0x20)
    s.done(r.token, D.Result(True, frozenset({0x40})), 110)
    [r] = s.poll(200)
    s.done(r.token, D.Result(True, frozenset({0x60})), 210)
    for base in (0x60, 0x80):
        [r] = s.poll(300 + base * 2)
        assert r.arg == base
        s.done(r.token, D.Result(True, frozenset({0xA6, 0xA0} if base == 0x80 else {0x80})),
               310 + base * 2)
    [r] = s.poll(700)
    assert r.arg == 0xA0
    s.done(r.token, D.Result(True, frozenset()), 710)
    polled = []
    t = 800
    while t < 6100:
        for r in s.poll(t):
            assert r.op == "pid"
            polled.append((t, r.arg))
            out = s.done(r.token, D.Result(True, {r.arg: 42}), t + 5)
            assert out == [D.Values(t + 5, {"OBD.VehicleSpeed" if r.arg == 0x0D
                                            else "OBD.Odometer": 42})]
        t += 10
    pids = [p for _, p in polled]
    assert 0x2F not in pids  # fuel level: not supported, never asked
    assert pids.count(0x0D) == 6 and pids.count(0xA6) == 2
    assert s.status()["vcu"]["pids_not_polled"] == [0x2F]


def test_old_ecu_7f_01_12_is_not_supported_without_retries():
    s = sched([OBD])
    [r] = s.poll(0)
    s.done(r.token, D.Result(False, error="NRC_0x12"), 5)
    sent = []
    for t in range(100, 120_000, 100):
        sent += s.poll(t)
    assert sent == []  # no PID query, no supported-PIDs retry
    assert s.status()["vcu"]["mode01"] == "not supported (NRC_0x12)"


def test_silent_ecu_is_backed_off():
    plan = D.EcuPlan("tpms", "uds", 1000, 50)
    s = sched([plan], first_read_ms=0)
    times = []
    for t in range(0, 250_000, 10):
        for r in s.poll(t):
            times.append(t)
            s.done(r.token, D.Result(False, error="NO_RESPONSE"), t + 200)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps == sorted(gaps) and gaps[-1] >= 60_000 - 10
    assert len(times) < 12  # a 1 s interval alone would have made ~100


def test_periodic_reads_update_the_record():
    plan = D.EcuPlan("bms", "uds", 10_000, 50)
    s = sched([plan], first_read_ms=1000)
    assert s.poll(500) == []
    [r] = s.poll(1000)
    s.done(r.token, D.Result(True, DTC), 1300)
    assert s.store.changed
    s.store.changed = False
    assert s.poll(5000) == []
    [r] = s.poll(11_300)
    s.done(r.token, D.Result(True, list(DTC)), 11_400)
    assert not s.store.changed  # same DTCs: no new record
    assert s.next_due_ms() == 21_400
