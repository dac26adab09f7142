"""diag.* commands end to end: a cloud key signs, Mosquitto carries, the agent reads the
simulated ECUs over ISO-TP on the virtual bus, signs its statuses and the retained
diagnostics record. The bus is watched: a read sends ISO-TP requests only; a refused clear
sends nothing."""

from __future__ import annotations

import time
import uuid

import cantools
import pytest

from agent.adapters.keys import generate_keypair
from agent.app.runtime import Agent
from agent.config import load_config
from agent.core.cose import verify
from conftest import ROOT
from support.mosquitto import Consumer, Mosquitto
from test_commands_e2e import BusWatch, Cloud, VIN, wait_ready

pytestmark = pytest.mark.mqtt

SIM_IDS = {0x7E8, 0x7E9, 0x7EC}  # the simulated ECUs' answers
TESTER_IDS = {0x7E0, 0x7E1, 0x7E2, 0x7E4}  # the agent's requests (physical addressing)


@pytest.fixture
def rig(tmp_path):
    # No periodic work: every diagnostic frame on the bus is then a command's.
    r = make_rig(tmp_path, ["diagnostics.dtc_interval_s=0", "diagnostics.ecu.vcu.pid=[]",
                            "diagnostics.ecu.abs.pid=[]"])
    yield r
    r.close()


def make_rig(tmp_path, extra):
    broker = Mosquitto().start()
    keys = tmp_path / "keys"
    for stem in ("vehicle", "cloud", "reader"):
        generate_keypair(keys, stem=stem)
    trust = tmp_path / "trust.toml"
    trust.write_text(f"""
[[key]]
name = "fleet-backend"
public_key = "{keys / 'cloud.pub'}"
allow = ["diag.*", "state.*"]

[[key]]
name = "workshop-viewer"
public_key = "{keys / 'reader.pub'}"
allow = ["diag.read_dtcs", "diag.read_data"]
""")
    channel = f"diag-e2e-{uuid.uuid4().hex}"
    overrides = [f"bus.0.channel={channel!r}", f"storage.dir={str(tmp_path / 'state')!r}",
                 f"signing.key_file={str(keys / 'vehicle.key')!r}", f"mqtt.port={broker.port}",
                 f"commands.trust_store={str(trust)!r}", "mqtt.reconnect_min_s=0.1", *extra]

    class Rig:
        pass

    r = Rig()
    r.config = load_config(ROOT / "configs" / "demo.toml", overrides)
    r.broker, r.keys = broker, keys
    r.watch = BusWatch(channel)
    r.agent = Agent(r.config)
    r.agent.start()
    r.cloud = Cloud(broker, keys / "cloud.key", keys / "vehicle.pub")
    wait_ready(r.agent)
    r.vehicle = r.agent.simulator.vehicle.state

    def close():
        r.cloud.close()
        r.agent.stop()
        r.watch.close()
        broker.close()

    r.close = close
    return r


def frames_from_tester(watch, since: float) -> list:
    """Frames since `since` that the simulated vehicle did not send."""
    sim = {m.frame_id for m in cantools.database.load_file(
        str(ROOT / "dbc" / "demo_ev.dbc")).messages} | SIM_IDS
    return [f for f in watch.frames if f[0] >= since and f[1] not in sim]


def wait_gear(agent, gear, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = agent.core.lookup("VCU_Status.Gear")
        if seen and seen[0] == gear:
            return
        time.sleep(0.02)
    raise AssertionError(f"gear never {gear}: {agent.core.lookup('VCU_Status.Gear')}")


def retained_record(broker, keys, pred, timeout=8.0) -> dict:
    """The retained diagnostics record as a new subscriber gets it, once `pred` holds for it
    (records are rate-limited to one a second: the newest may be on its way)."""
    deadline = time.monotonic() + timeout
    while True:
        c = Consumer(broker.host, broker.port, f"vehicles/{VIN}/diagnostics").start()
        try:
            t = time.monotonic() + 2
            while time.monotonic() < t and not c.messages:
                time.sleep(0.02)
            first = c.messages[0] if c.messages else None
        finally:
            c.stop()
        if first is not None and first.retain:  # (a live one: none was retained yet)
            body = verify(first.payload, keys).payload
            if pred(body) or time.monotonic() > deadline:
                return body
        elif time.monotonic() > deadline:
            raise AssertionError("no retained diagnostics record")
        time.sleep(0.2)


def test_read_dtcs_sends_iso_tp_requests_only_and_publishes_the_record(rig):
    rig.vehicle.fault = True
    t = time.monotonic()
    cid, _ = rig.cloud.command("diag.read_dtcs")
    final = rig.cloud.wait_terminal(cid, timeout=20)
    assert final["status"] == "SUCCEEDED", final
    ecus = final["result"]["ecus"]
    assert len(ecus["bms"]["dtcs"]) == 40
    assert ecus["vcu"]["dtcs"] == [{"code": "P0D27", "status": 0x0C}]
    assert ecus["abs"]["dtcs"] == []
    assert ecus["tpms"] == {"error": "NO_RESPONSE"}
    assert [s["status"] for s in rig.cloud.statuses(cid)] == ["ACCEPTED", "SUCCEEDED"]
    sent = frames_from_tester(rig.watch, t)
    assert sent and {f[1] for f in sent} == TESTER_IDS
    for _, can_id, data in sent:
        assert len(data) == 8 and data[0] >> 4 in (0, 3), (hex(can_id), data.hex())
    rec = retained_record(rig.broker, rig.cloud.vehicle_keys, lambda r: len(r["ecus"]) == 3)
    assert rec["vin"] == VIN and set(rec["ecus"]) == {"bms", "vcu", "abs"}
    assert rec["ecus"]["vcu"]["dtcs"] == [{"code": "P0D27", "status": 0x0C}]


def test_clear_while_driving_is_refused_and_sends_nothing(rig):
    rig.vehicle.drive = True
    wait_gear(rig.agent, "D")
    t = time.monotonic()
    cid, _ = rig.cloud.command("diag.clear_dtcs", {"ecus": ["vcu"]})
    final = rig.cloud.wait_terminal(cid)
    time.sleep(0.3)
    assert (final["status"], final["reason"]) == ("REJECTED", "PRECONDITION_FAILED"), final
    assert "VCU_Status.Gear" in final["detail"]
    assert [s["status"] for s in rig.cloud.statuses(cid)] == ["REJECTED"]
    assert frames_from_tester(rig.watch, t) == []


def test_clear_when_parked_reads_again_and_updates_the_record(rig):
    wait_gear(rig.agent, "P")
    rig.vehicle.fault = True
    cid, _ = rig.cloud.command("diag.read_dtcs", {"ecus": ["vcu"]})
    assert rig.cloud.wait_terminal(cid)["result"]["ecus"]["vcu"]["dtcs"]
    rig.vehicle.fault = False  # repaired
    cid, _ = rig.cloud.command("diag.clear_dtcs", {"ecus": ["vcu"]})
    final = rig.cloud.wait_terminal(cid)
    assert final["status"] == "SUCCEEDED" and final["result"] == {"ecus": {"vcu": {"dtcs": []}}}
    rec = retained_record(rig.broker, rig.cloud.vehicle_keys,
                          lambda r: r["ecus"]["vcu"]["dtcs"] == [])
    assert rec["ecus"]["vcu"]["dtcs"] == []


def test_read_data_and_its_errors(rig):
    cid, _ = rig.cloud.command("diag.read_data", {"ecu": "bms", "did": 0xF190})
    final = rig.cloud.wait_terminal(cid)
    assert final["status"] == "SUCCEEDED"
    assert final["result"] == {"ecu": "bms", "did": 0xF190, "hex": VIN.encode().hex(),
                               "value": VIN}
    cid, _ = rig.cloud.command("diag.read_data", {"ecu": "bms", "did": 0x4242})
    final = rig.cloud.wait_terminal(cid)
    assert (final["status"], final["reason"], final["detail"]) == \
        ("FAILED", "NO_RESPONSE", "bms: NRC_0x31")
    cid, _ = rig.cloud.command("diag.read_data", {"ecu": "vcu", "did": 1})
    assert rig.cloud.wait_terminal(cid)["reason"] == "BAD_PARAMS"
    cid, _ = rig.cloud.command("diag.read_data", {"ecu": "bms", "did": "F190"})
    assert rig.cloud.wait_terminal(cid)["reason"] == "BAD_PARAMS"
    cid, _ = rig.cloud.command("diag.read_dtcs", {"ecus": ["tpms"]})
    final = rig.cloud.wait_terminal(cid)
    assert (final["status"], final["reason"]) == ("FAILED", "NO_RESPONSE")


def test_clear_needs_a_key_that_allows_it(rig):
    from agent.adapters.keys import load_private_key
    from agent.core.cose import Signer

    reader = Signer(load_private_key(rig.keys / "reader.key"))
    t = time.monotonic()
    cid, _ = rig.cloud.command("diag.clear_dtcs", signer=reader)
    final = rig.cloud.wait_terminal(cid)
    assert (final["status"], final["reason"]) == ("REJECTED", "UNAUTHORIZED")
    cid, _ = rig.cloud.command("diag.read_dtcs", {"ecus": ["abs"]}, signer=reader)
    assert rig.cloud.wait_terminal(cid)["status"] == "SUCCEEDED"
    assert all(f[1] != 0x7E0 for f in frames_from_tester(rig.watch, t))  # nothing to the VCU


def test_polled_pids_are_telemetry_signals(tmp_path):
    """The demo's PIDs (VehicleSpeed 1 s, Odometer as Vehicle.TraveledDistance 5 s, ...) in
    signed telemetry batches; the periodic DTC reads in the retained record."""
    r = make_rig(tmp_path, ["diagnostics.dtc_interval_s=2"])
    telemetry = Consumer(r.broker.host, r.broker.port, f"vehicles/{VIN}/telemetry").start()
    try:
        r.vehicle.speed_kph = 30
        seen: dict = {}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not {"OBD.VehicleSpeed",
                                                    "Vehicle.TraveledDistance"} <= set(seen):
            for m in telemetry.messages:
                for name, samples in verify(m.payload, r.cloud.vehicle_keys).payload["sig"].items():
                    seen[name] = samples[-1][1]
            time.sleep(0.1)
        assert seen.get("OBD.VehicleSpeed") == 30
        assert seen["Vehicle.TraveledDistance"] == pytest.approx(r.vehicle.odometer_km, abs=0.5)
        assert "OBD.FuelLevel" not in seen  # not supported by the EV: never polled
        rec = retained_record(r.broker, r.cloud.vehicle_keys, lambda x: len(x["ecus"]) == 3)
        assert len(rec["ecus"]["bms"]["dtcs"]) == 40
        status = r.agent.status()["diag"]["ecus"]
        assert status["tpms"]["last_error"] == "NO_RESPONSE" and status["bms"]["answered"] >= 1
    finally:
        telemetry.stop()
        r.close()


def test_the_cli_asks_the_running_agent_through_its_control_socket(tmp_path):
    """`tcu-agent diag dtcs` without --direct: the running agent (which owns the bus) reads
    the ECUs and answers through its control socket; scan still needs --direct."""
    import json
    import subprocess
    import sys

    sock = tmp_path / "control.sock"
    r = make_rig(tmp_path, ["diagnostics.dtc_interval_s=0", "diagnostics.ecu.vcu.pid=[]",
                            "diagnostics.ecu.abs.pid=[]", f"control.socket={str(sock)!r}"])
    try:
        r.vehicle.fault = True  # the VCU stores P0D27
        args = [sys.executable, "-m", "agent", "diag", "-c", str(ROOT / "configs" / "demo.toml"),
                "--set", f"storage.dir={str(tmp_path / 'state')!r}",
                "--set", f"control.socket={str(sock)!r}"]
        since = time.monotonic()
        run = subprocess.run([*args, "dtcs", "vcu", "--json"], capture_output=True, text=True,
                             timeout=90, cwd=ROOT)
        assert run.returncode == 0, run.stderr
        codes = [d["code"] for d in json.loads(run.stdout)["vcu"]["dtcs"]]
        assert any(c.startswith("P0D27") for c in codes), codes
        sent = frames_from_tester(r.watch, since)
        assert sent and {f[1] for f in sent} <= TESTER_IDS  # the agent's ISO-TP requests only
        scan = subprocess.run([*args, "scan"], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert scan.returncode == 2
        assert scan.stderr == ("tcu-agent: error: diag scan opens the bus itself: add --direct "
                               "(the running agent answers dtcs, clear and read)\n")
    finally:
        r.close()
