"""Diagnostics against the simulated ECUs on python-can's virtual bus: every service, the
quirks (40-DTC multi-frame answer after repeated 0x78, 7F 01 12, an unsupported service, an
ECU that never answers), the frames on the bus, the service's record and PID signals, the CLI."""

from __future__ import annotations

import json
import threading
import time
import uuid

import can
import pytest

from agent.adapters.diag import open_buses, scan_functional
from agent.app.assemble import bus_plans, telemetry_core
from agent.app.diagservice import DiagService
from agent.cli.main import main
from agent.config import load_config
from agent.core import diag as D
from agent.core.commands import Command
from agent.errors import ConfigError
from agent.sim import from_config
from agent.sim.runner import SimulatorThread
from conftest import ROOT

DIAG_IDS = {0x7DF, 0x7E0, 0x7E1, 0x7E2, 0x7E4}  # what the tester may send


class Watch:
    """Every frame on the channel, from a connection of its own."""

    def __init__(self, channel):
        self.bus = can.Bus(interface="virtual", channel=channel)
        self.frames: list[can.Message] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            m = self.bus.recv(0.05)
            if m is not None:
                self.frames.append(m)

    def close(self):
        self._stop.set()
        self._t.join(1)
        self.bus.shutdown()


@pytest.fixture
def rig(tmp_path):
    channel = f"diag-{uuid.uuid4().hex}"
    config = load_config(ROOT / "configs" / "demo.toml", [
        f"bus.0.channel={channel!r}", f"storage.dir={str(tmp_path)!r}",
        "diagnostics.dtc_interval_s=0"])
    vehicle = from_config(config.simulator)
    sim = SimulatorThread(vehicle, "virtual", channel).start()
    watch = Watch(channel)
    opened = open_buses(config)

    class R:
        pass

    r = R()
    r.config, r.channel, r.sim, r.watch = config, channel, sim, watch
    r.links, r.state = opened["links"], vehicle.state

    def ask(ecu, op, arg=None):
        return r.links[ecu].execute(D.Request(0, ecu, op, arg))

    r.ask = ask
    yield r
    for b in opened["buses"]:
        b.close()
    watch.close()
    sim.stop()


def test_uds_40_dtcs_multi_frame_after_repeated_response_pending(rig):
    t0 = time.monotonic()
    r = rig.ask("bms", D.DTCS)
    took = time.monotonic() - t0
    assert r.ok, r.error
    assert len(r.value) == 40
    assert r.value[0] == {"code": "P0A80-1C", "status": 0x08}
    assert {"code": "P0A83-16", "status": 0x2F} in r.value
    assert all(len(d["code"]) == 8 and d["code"][5] == "-" for d in r.value)
    # two 7F 19 78 then the answer at 0.3 s: later than P2 (0.2 s), so the pending was honoured
    assert took >= 0.3
    sent = [m for m in rig.watch.frames if m.arbitration_id == 0x7EC]
    assert sum(1 for m in sent if bytes(m.data[:4]) == b"\x03\x7f\x19\x78") == 2
    assert any(m.data[0] >> 4 == 1 for m in sent)  # a first frame: multi-frame


def test_uds_clear_then_read_again(rig):
    assert rig.ask("bms", D.CLEAR).ok
    r = rig.ask("bms", D.DTCS)
    assert r.ok and r.value == []


def test_uds_read_data_codecs_and_negative_responses(rig):
    r = rig.ask("bms", D.DID, 0xF190)
    assert r.ok and r.value == (b"DEMO0EV0000000001".hex(), "DEMO0EV0000000001")
    r = rig.ask("bms", D.DID, 0x0101)
    assert r.ok and r.value == (int(rig.state.soc * 10).to_bytes(2, "big").hex(),
                                round(int(rig.state.soc * 10) * 0.1, 6))
    r = rig.ask("bms", D.DID, 0xF18C)  # no codec declared: hex only
    assert r.ok and r.value == (b"BMS-000123".hex(), None)
    r = rig.ask("bms", D.DID, 0x1234)
    assert (r.ok, r.error) == (False, "NRC_0x31")
    r = rig.ask("tpms", D.DID, 0xF190)
    assert (r.ok, r.error) == (False, "NO_RESPONSE")


def test_unsupported_service_is_a_clean_nrc(rig):
    # the VCU answers UDS 0x19 and 0x14 but not 0x22: 7F 22 11
    r = rig.ask("vcu", D.DID, 0xF190)
    assert (r.ok, r.error) == (False, "NRC_0x11")
    assert rig.ask("vcu", D.DTCS).ok  # and keeps answering


def test_obd_supported_pids_and_values(rig):
    r = rig.ask("vcu", D.SUPPORTED, 0x00)
    assert r.ok and {0x0D, 0x1F, 0x20} <= r.value
    chain = set()
    base = 0
    while base is not None:
        got = rig.ask("vcu", D.SUPPORTED, base).value
        chain |= got
        base = base + 0x20 if base + 0x20 in got else None
    assert {0x05, 0x0C, 0x0D, 0x1F, 0x42, 0x46, 0xA6} <= chain
    assert 0x2F not in chain and 0x5B not in chain  # an EV's VCU: no fuel, no hybrid battery
    rig.state.speed_kph = 42
    time.sleep(0.05)
    assert rig.ask("vcu", D.PID, 0x0D).value == {0x0D: 42}
    assert rig.ask("vcu", D.PID, 0xA6).value[0xA6] == pytest.approx(rig.state.odometer_km, abs=0.1)
    assert rig.ask("vcu", D.PID, 0x42).value == {0x42: 14.2}
    assert rig.ask("vcu", D.PID, 0x2F).error == "NRC_0x12"


def test_obd_dtcs_follow_the_fault_and_clear(rig):
    assert rig.ask("vcu", D.DTCS).value == []
    rig.state.fault = True
    time.sleep(0.05)
    assert rig.ask("vcu", D.DTCS).value == [{"code": "P0D27", "status": 0x0C}]
    rig.state.fault = False
    assert rig.ask("vcu", D.DTCS).value == [{"code": "P0D27", "status": 0x0C}]  # latched
    assert rig.ask("vcu", D.CLEAR).ok
    assert rig.ask("vcu", D.DTCS).value == []


def test_old_ecu_7f_01_12_and_silent_ecu(rig):
    r = rig.ask("abs", D.SUPPORTED, 0x00)
    assert (r.ok, r.error) == (False, "NRC_0x12")
    assert rig.ask("abs", D.DTCS).value == []  # mode 03 answers; 07/0A refused: not there
    t0 = time.monotonic()
    r = rig.ask("tpms", D.DTCS)
    took = time.monotonic() - t0
    assert (r.ok, r.error) == (False, "NO_RESPONSE")
    assert 0.19 <= took < 1.0  # P2, not the whole request timeout


def test_only_iso_tp_requests_from_the_tester(rig):
    start = len(rig.watch.frames)
    for ecu, op, arg in [("bms", D.DTCS, None), ("vcu", D.DTCS, None), ("vcu", D.PID, 0x0D),
                         ("abs", D.SUPPORTED, 0), ("tpms", D.DTCS, None)]:
        rig.ask(ecu, op, arg)
    sent = [m for m in rig.watch.frames[start:] if m.arbitration_id not in
            {0x7E8, 0x7E9, 0x7EC} and m.arbitration_id in range(0x700, 0x800)]
    assert {m.arbitration_id for m in sent} == {0x7E0, 0x7E1, 0x7E2, 0x7E4}
    for m in sent:
        assert len(m.data) == 8 and not m.is_extended_id
        kind = m.data[0] >> 4
        assert kind in (0, 3)  # single frames and flow control only
        if kind == 0:
            assert m.data[1 + (m.data[0] & 0x0F):] == bytes([0xCC]) * (7 - (m.data[0] & 0x0F))
    assert any(m.data[0] >> 4 == 3 for m in sent)  # the flow control of the 40-DTC answer


def test_functional_scan_finds_the_obd_ecus(rig):
    bus = can.Bus(interface="virtual", channel=rig.channel)
    try:
        found = scan_functional(bus, 0.3)
    finally:
        bus.shutdown()
    assert set(found) == {0x7E8}  # the VCU answers 0x7DF
    assert 0x0D in found[0x7E8]


def test_29_bit_ids(tmp_path):
    """A 29-bit ECU (0x18DA10F1 / 0x18DAF110) served by the simulator's ISO-TP server."""
    from agent.sim.ecus import IsoTpServer, BmsModel
    from agent.sim.vehicle import SimulatedVehicle

    channel = f"diag29-{uuid.uuid4().hex}"
    config = load_config(ROOT / "configs" / "demo.toml", [
        f"bus.0.channel={channel!r}", f"storage.dir={str(tmp_path)!r}"])
    from dataclasses import replace

    ecu = replace(config.diagnostics.ecu[0], name="bms29", extended=True,
                  request_id=0x18DA10F1, response_id=0x18DAF110)
    config = replace(config, diagnostics=replace(config.diagnostics, ecu=(ecu,)))
    server = IsoTpServer(0x18DA10F1, 0x18DAF110)
    model = BmsModel(SimulatedVehicle())
    bus = can.Bus(interface="virtual", channel=channel)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            m = bus.recv(0.002)
            now = time.monotonic()
            if m is not None and m.is_extended_id:
                req = server.receive(m.arbitration_id, bytes(m.data), now)
                if req:
                    for delay, answer in model.serve(req, now):
                        server.answer(answer, now + delay)
            for can_id, data in server.step(now):
                bus.send(can.Message(arbitration_id=can_id, data=data, is_extended_id=True))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    opened = open_buses(config)
    try:
        r = opened["links"]["bms29"].execute(D.Request(0, "bms29", D.DTCS))
        assert r.ok and len(r.value) == 40
    finally:
        for b in opened["buses"]:
            b.close()
        stop.set()
        t.join(1)
        bus.shutdown()


# -- the service: periodic reads, the record, PIDs as signals --------------------------------

def test_service_polls_pids_publishes_record_and_runs_commands(tmp_path):
    channel = f"svc-{uuid.uuid4().hex}"
    config = load_config(ROOT / "configs" / "demo.toml", [
        f"bus.0.channel={channel!r}", f"storage.dir={str(tmp_path)!r}",
        "diagnostics.dtc_interval_s=1", "diagnostics.ecu.vcu.pid.0.interval_ms=200"])
    vehicle = from_config(config.simulator)
    sim = SimulatorThread(vehicle, "virtual", channel).start()
    plans = bus_plans(config)
    core = telemetry_core(plans, config.telemetry)
    records: list[dict] = []
    t0 = int(time.time() * 1000)
    service = DiagService(config, core, records.append, now_ms=t0 - 2000)
    tester = can.Bus(interface="virtual", channel=channel)  # ECU answers reach a reader too

    def run_until(pred, timeout=8.0):
        deadline = time.monotonic() + timeout
        out = []
        while time.monotonic() < deadline:
            now = int(time.time() * 1000)
            out += service.poll(now)
            m = tester.recv(0)
            while m is not None:  # what BusReader would feed: the diagnostic frames too
                core.feed(0, time.time(), m.arbitration_id, bytes(m.data))
                m = tester.recv(0)
            if pred(out):
                return out
            time.sleep(0.005)
        raise AssertionError(f"timed out; statuses {out}; status {service.status()}")

    try:
        vehicle.state.speed_kph = 0
        run_until(lambda out: core.lookup("OBD.VehicleSpeed") is not None
                  and core.lookup("Vehicle.TraveledDistance") is not None
                  and len(records) >= 1 and "bms" in records[-1]["ecus"]
                  and "vcu" in records[-1]["ecus"])
        rec = records[-1]
        assert rec["v"] == 1 and rec["vin"] == config.vehicle.vin
        assert len(rec["ecus"]["bms"]["dtcs"]) == 40 and rec["ecus"]["vcu"]["dtcs"] == []
        assert "tpms" not in rec["ecus"]  # never answered: nothing read
        assert core.lookup("Vehicle.TraveledDistance")[0] == pytest.approx(
            vehicle.state.odometer_km, abs=0.2)
        # diagnostic ids are not unknown telemetry
        assert core.counters[0].unknown_id_set.isdisjoint({0x7E0, 0x7E8, 0x7EC, 0x7E4, 0x7E9})
        st = service.status()["ecus"]
        assert st["vcu"]["pids_not_polled"] == [0x2F]  # FuelLevel: the EV lacks it
        assert st["abs"]["mode01"] == "not supported (NRC_0x12)"
        n = len(records)
        vehicle.state.fault = True
        run_until(lambda out: len(records) > n and records[-1]["ecus"]["vcu"]["dtcs"])
        assert records[-1]["ecus"]["vcu"]["dtcs"] == [{"code": "P0D27", "status": 0x0C}]
        # a command through the handler
        cmd = Command("c1", config.vehicle.vin, D.READ_DTCS, {"ecus": ["vcu", "tpms"]}, 0, 0,
                      b"k", "test", b"d")
        first = service.handle(cmd, int(time.time() * 1000))
        assert first[0].status == "ACCEPTED" and service.running("c1")
        out = run_until(lambda out: any(s.status == "SUCCEEDED" for s in out))
        done = [s for s in out if s.id == "c1"][-1]
        assert done.result == {"ecus": {"vcu": {"dtcs": [{"code": "P0D27", "status": 0x0C}]},
                                        "tpms": {"error": "NO_RESPONSE"}}}
    finally:
        service.close()
        tester.shutdown()
        sim.stop()


def test_local_requests_share_the_scheduler_and_are_not_published(tmp_path):
    """ask() from another thread (the control socket's): same preconditions, answer to the
    caller only."""
    channel = f"local-{uuid.uuid4().hex}"
    config = load_config(ROOT / "configs" / "demo.toml", [
        f"bus.0.channel={channel!r}", f"storage.dir={str(tmp_path)!r}",
        "diagnostics.dtc_interval_s=0", "diagnostics.ecu.vcu.pid=[]",
        "diagnostics.ecu.abs.pid=[]"])
    vehicle = from_config(config.simulator)
    sim = SimulatorThread(vehicle, "virtual", channel).start()
    core = telemetry_core(bus_plans(config), config.telemetry)
    records: list = []
    service = DiagService(config, core, records.append)
    tester = can.Bus(interface="virtual", channel=channel)
    stop = threading.Event()
    emitted: list = []

    def core_thread():  # what the runtime's core loop does, frames included
        while not stop.is_set():
            m = tester.recv(0.002)
            while m is not None:
                core.feed(0, time.time(), m.arbitration_id, bytes(m.data))
                m = tester.recv(0)
            emitted.extend(service.poll(int(time.time() * 1000)))

    t = threading.Thread(target=core_thread, daemon=True)
    t.start()
    try:
        got = service.ask(D.READ_DATA, {"ecu": "bms", "did": 0xF190}, 10)
        assert got == {"status": "SUCCEEDED", "result": {
            "ecu": "bms", "did": 0xF190, "hex": b"DEMO0EV0000000001".hex(),
            "value": "DEMO0EV0000000001"}}
        assert service.ask(D.READ_DTCS, {"ecus": [1]})["reason"] == "BAD_PARAMS"
        deadline = time.monotonic() + 5
        while not core.lookup("VCU_Status.Gear") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert service.ask(D.CLEAR_DTCS, {"ecus": ["vcu"]}, 10)["status"] == "SUCCEEDED"
        vehicle.state.drive = True
        while core.lookup("VCU_Status.Gear")[0] != "D" and time.monotonic() < deadline + 5:
            time.sleep(0.02)
        got = service.ask(D.CLEAR_DTCS, {"ecus": ["vcu"]}, 10)
        assert (got["status"], got["reason"]) == ("REJECTED", "PRECONDITION_FAILED")
        assert emitted == []  # nothing for the command service to sign and publish
    finally:
        stop.set()
        t.join(2)
        service.close()
        tester.shutdown()
        sim.stop()


def test_a_bus_without_ecus_never_sees_a_diagnostic_frame(tmp_path):
    """Two buses; the ECUs are all on `pt`: `body` gets no frame at all from diagnostics."""
    import tomllib

    from agent.config import config_from_dict

    pt, body = f"pt-{uuid.uuid4().hex}", f"body-{uuid.uuid4().hex}"
    raw = tomllib.loads((ROOT / "configs" / "demo.toml").read_text())
    raw["bus"][0]["channel"] = pt
    raw["bus"].append({**raw["bus"][0], "name": "body", "channel": body})
    raw["storage"]["dir"] = str(tmp_path)
    raw["diagnostics"]["dtc_interval_s"] = 1
    config = config_from_dict(raw, base=ROOT / "configs")
    vehicle = from_config(config.simulator)
    sim = SimulatorThread(vehicle, "virtual", pt).start()
    watch_body, watch_pt = Watch(body), Watch(pt)
    core = telemetry_core(bus_plans(config), config.telemetry)
    service = DiagService(config, core, None, now_ms=int(time.time() * 1000) - 2000)
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            service.poll(int(time.time() * 1000))
            time.sleep(0.005)
        assert service.status()["ecus"]["bms"]["answered"] >= 1
        assert {m.arbitration_id for m in watch_pt.frames} & DIAG_IDS  # asked on pt
        assert watch_body.frames == []
    finally:
        service.close()
        watch_body.close()
        watch_pt.close()
        sim.stop()


def test_a_bus_that_cannot_be_shared_turns_diagnostics_off(tmp_path):
    """slcan on one serial port cannot be opened beside telemetry: the agent keeps running,
    diagnostics say why, and a command ends at once instead of waiting."""
    config = load_config(ROOT / "configs" / "demo.toml", [
        "bus.0.interface='slcan'", "bus.0.channel='/dev/null'", f"storage.dir={str(tmp_path)!r}"])
    core = telemetry_core(bus_plans(config), config.telemetry)
    service = DiagService(config, core, None)
    try:
        cmd = Command("c1", config.vehicle.vin, D.READ_DTCS, {"ecus": ["vcu"]}, 0, 0, b"k",
                      "test", b"d")
        out = service.handle(cmd, int(time.time() * 1000))
        assert [s.status for s in out] == ["ACCEPTED", "FAILED"]
        assert out[1].result == {"ecus": {"vcu": {"error": "BUS_DOWN"}}}
        assert "cannot be opened a second time" in service.status()["error"]
    finally:
        service.close()


# -- configuration ----------------------------------------------------------------------

ECU = {"name": "bms", "request_id": 0x7E4, "response_id": 0x7EC}


@pytest.mark.parametrize("change, needle", [
    ({"protocol": "kwp"}, "diagnostics.ecu.0.protocol: must be \"uds\" or \"obd\""),
    ({"colour": 1}, "diagnostics.ecu.0.colour: unknown key"),
    ({"request_id": 0x800}, "diagnostics.ecu.0.request_id: must be 0..0x7ff (or set extended"),
    ({"response_id": 0x7E4}, "request_id and response_id must differ"),
    ({"padding": 300}, "diagnostics.ecu.0.padding: a byte 0..255, or false"),
    ({"transport": "usb"}, "diagnostics.ecu.0.transport"),
    ({"bus": "body"}, "diagnostics.ecu.0.bus: no bus named 'body'"),
    ({"pid": [{"pid": "VehicleSpeed"}]}, "diagnostics.ecu.0.pid: PIDs are OBD-II"),
    ({"protocol": "obd", "pid": [{"pid": "Warp"}]},
     "diagnostics.ecu.0.pid.0.pid: unknown PID name"),
    ({"protocol": "obd", "pid": [{"pid": 13, "interval_ms": 10}]}, "pid.0.interval_ms: must be 50"),
    ({"did": [{"did": 1, "codec": "utf9"}]}, "diagnostics.ecu.0.did.0.codec: 'utf9' is not"),
    ({"did": [{"did": 1, "codec": "ascii"}]}, "did.0.length: an ascii codec needs length"),
    ({"did": [{"did": 70000}]}, "diagnostics.ecu.0.did.0.did: must be 0..65535"),
])
def test_config_errors_name_the_key(change, needle, tmp_path):
    from agent.config import config_from_dict

    raw = {"vehicle": {"vin": "V1"}, "storage": {"dir": str(tmp_path)},
           "bus": [{"name": "pt", "interface": "virtual", "channel": "x",
                    "dbc": [str(ROOT / "dbc" / "demo_ev.dbc")]}],
           "diagnostics": {"ecu": [{**ECU, **change}]}}
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, base=tmp_path)
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("section, needle", [
    ({"ecu": []}, "diagnostics.ecu: at least one"),
    ({"ecu": [ECU, ECU]}, "duplicate ECU name 'bms'"),
    ({"ecu": [ECU], "p2_ms": 6000}, "need 10 <= p2_ms <= p2_star_ms"),
    ({"ecu": [ECU], "clear_preconditions": ["Gear is P"]},
     "diagnostics.clear_preconditions.0: 'Gear is P' is not"),
])
def test_section_errors(section, needle, tmp_path):
    from agent.config import config_from_dict

    raw = {"vehicle": {"vin": "V1"}, "storage": {"dir": str(tmp_path)},
           "bus": [{"name": "pt", "interface": "virtual", "channel": "x",
                    "dbc": [str(ROOT / "dbc" / "demo_ev.dbc")]}], "diagnostics": section}
    with pytest.raises(ConfigError, match=needle):
        config_from_dict(raw, base=tmp_path)


# -- the CLI --------------------------------------------------------------------------------

def test_cli_direct(rig, capsys):
    rig.state.fault = True
    time.sleep(0.05)
    base = ["diag", "-c", str(ROOT / "configs" / "demo.toml"), "--direct",
            "--set", f"bus.0.channel={rig.channel!r}"]
    assert main(base + ["scan"]) == 0
    out = capsys.readouterr().out
    assert "bms      UDS  answers" in out and "tpms     NO_RESPONSE" in out
    assert "abs      OBD  answers (NRC_0x12), PIDs: not supported (NRC_0x12)" in out
    assert "0D" in out.splitlines()[1]
    assert "0x7DF@pt: 0x7E8 (vcu)" in out  # functional discovery: only the VCU listens
    assert main(base + ["--json", "dtcs"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert len(got["bms"]["dtcs"]) == 40 and got["tpms"] == {"error": "NO_RESPONSE"}
    assert got["vcu"]["dtcs"] == [{"code": "P0D27", "status": 12}]
    assert main(base + ["read", "bms", "0xF190"]) == 0
    assert "'DEMO0EV0000000001'" in capsys.readouterr().out
    assert main(base + ["obd", "VehicleSpeed", "vcu"]) == 0
    assert "VehicleSpeed (0x0D): 0 km/h" in capsys.readouterr().out
    assert main(base + ["dtcs", "tpms"]) == 1  # nobody answered
    capsys.readouterr()
    assert main(base + ["clear", "vcu"]) == 2
    assert "add --force" in capsys.readouterr().err
    rig.state.fault = False
    assert main(base + ["clear", "vcu", "--force"]) == 0
    assert "vcu      cleared; 0 DTC(s)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["--set", "control.socket='/nonexistent/tcu.sock'", "dtcs"],
     "no agent is running: no control socket at /nonexistent/tcu.sock; or use --direct"),
    (["scan"], "diag scan opens the bus itself: add --direct"),
    (["--direct", "read", "bms"], "usage: tcu-agent diag -c CONFIG read ECU DID"),
    (["--direct", "read", "vcu", "1"], "vcu speaks OBD-II"),
    (["--direct", "read", "bms", "0x10000"], "a number 0..65535"),
    (["--direct", "dtcs", "nope"], "no ECU named 'nope'"),
    (["--direct", "obd", "Warp"], "unknown PID name 'Warp'"),
])
def test_cli_errors_are_one_line(argv, needle, capsys):
    code = main(["diag", "-c", str(ROOT / "configs" / "demo.toml"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1
