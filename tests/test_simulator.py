"""The simulated EV: cycle times, charging physics, reactions with delays, refusals."""

from __future__ import annotations

import time
import uuid

import pytest

from agent.config import config_from_dict
from agent.runtime import Agent
from agent.sim.vehicle import LOCK_REACTION_S, REACTION_S, SimulatedVehicle, VehicleState

T = 1_700_000_000.0


def request(v: SimulatedVehicle, name: str, good_checksum: bool = True, **values):
    msg = v.db.get_message_by_name(name)
    full = {s.name: 0 for s in msg.signals}
    full.update(values)
    data = bytearray(msg.encode(full))
    data[7] = (sum(data[:7]) + (0 if good_checksum else 1)) & 0xFF
    v.receive(msg.frame_id, bytes(data))


def run(v: SimulatedVehicle, start: float, seconds: float, step: float = 0.01):
    frames = []
    t = start
    while t < start + seconds:
        frames += [(t, cid, d) for cid, d in v.step(t)]
        t += step
    return frames, t


def decoded(v, frames, name):
    msg = v.db.get_message_by_name(name)
    return [(t, msg.decode(d)) for t, cid, d in frames if cid == msg.frame_id]


def test_messages_at_their_cycle_times():
    v = SimulatedVehicle()
    frames, _ = run(v, T, 1.0, step=0.001)
    per_id = {}
    for _, cid, _ in frames:
        per_id[cid] = per_id.get(cid, 0) + 1
    assert per_id[0x1A0] == pytest.approx(50, abs=2)  # VCU every 20 ms
    assert per_id[0x2B0] == pytest.approx(10, abs=1)  # BMS every 100 ms
    assert set(per_id) == {0x1A0, 0x2B0, 0x3C0, 0x3D0}  # requests are the TCU's to send


def test_charging_raises_soc_and_stops_at_the_limit():
    v = SimulatedVehicle(VehicleState(soc=70.0, charge_limit=75), charge_rate_pct_per_s=2.0)
    v.step(T)
    request(v, "TCU_ChargeRequest", ChargeRequest="START")
    frames, t = run(v, T, REACTION_S - 0.05)
    assert not v.state.charging  # an ECU takes its time
    frames, t = run(v, t, 0.2)
    assert v.state.charging
    frames, t = run(v, t, 2.0)
    soc = [vals["SOC"] for _, vals in decoded(v, frames, "BMS_Status")]
    assert soc == sorted(soc) and soc[-1] > soc[0]
    frames, t = run(v, t, 3.0)
    assert v.state.soc == pytest.approx(75.0) and not v.state.charging
    states = [str(vals["ChargeState"]) for _, vals in decoded(v, frames, "OBC_Status")]
    assert states[-1] == "COMPLETE"


def test_realistic_default_charge_rate():
    v = SimulatedVehicle(VehicleState(soc=50.0, charging=True))
    run(v, T, 60.0, step=0.1)
    # 32 A x 230 V = 7.4 kW on 64 kWh: about 0.19 % per minute
    assert v.state.soc - 50.0 == pytest.approx(32 * 230 / 1000 / 64 * 100 / 60, rel=0.05)


def test_no_cable_no_charging_and_stop():
    v = SimulatedVehicle(VehicleState(plugged=False))
    v.step(T)
    request(v, "TCU_ChargeRequest", ChargeRequest="START")
    run(v, T, 1.0)
    assert not v.state.charging
    v.state.plugged = True
    request(v, "TCU_ChargeRequest", ChargeRequest="START")
    _, t = run(v, T + 1, 1.0)
    assert v.state.charging
    request(v, "TCU_ChargeRequest", ChargeRequest="STOP")
    run(v, t, 1.0)
    assert not v.state.charging


def test_charge_limit_request():
    v = SimulatedVehicle()
    v.step(T)
    request(v, "TCU_ChargeRequest", ChargeRequest="NONE", ChargeLimitRequest=90)
    frames, _ = run(v, T, 1.0)
    limits = [vals["ChargeLimit"] for _, vals in decoded(v, frames, "OBC_Status")]
    assert limits[0] == 80 and limits[-1] == 90


def test_locks_and_no_unlock_while_moving():
    v = SimulatedVehicle(VehicleState(locked=True, speed_kph=50.0, gear="D"))
    v.step(T)
    request(v, "TCU_LockRequest", LockRequest="UNLOCK")
    run(v, T, 1.0)
    assert v.state.locked and v.state.last_lock_result == "REFUSED_MOVING"
    v.state.speed_kph, v.state.gear = 0.0, "P"
    request(v, "TCU_LockRequest", LockRequest="UNLOCK")
    _, t = run(v, T + 1, LOCK_REACTION_S + 0.05)
    assert not v.state.locked and v.state.last_lock_result == "OK"


def test_bad_checksum_is_ignored():
    v = SimulatedVehicle(VehicleState(plugged=True))
    v.step(T)
    request(v, "TCU_ChargeRequest", good_checksum=False, ChargeRequest="START")
    run(v, T, 1.0)
    assert not v.state.charging and v.ignored_requests == 1


def test_timeline():
    v = SimulatedVehicle(timeline=[(0.5, {"plugged": False}), (1.0, {"speed_kph": 30.0})])
    run(v, T, 0.6)
    assert not v.state.plugged and v.state.speed_kph == 0
    run(v, T + 0.6, 0.6)
    assert v.state.speed_kph == 30.0 and v.state.gear == "D"


def test_simulator_inside_the_agent_on_the_virtual_bus(tmp_path):
    from conftest import ROOT
    raw = {"vehicle": {"vin": "V1"}, "storage": {"dir": str(tmp_path)},
           "bus": [{"name": "pt", "interface": "virtual", "channel": f"s-{uuid.uuid4().hex}",
                    "dbc": [str(ROOT / "dbc" / "demo_ev.dbc")]}],
           "telemetry": {"messages": ["*"]},
           "simulator": {"enabled": True, "soc": 64.5, "plugged": False}}
    agent = Agent(config_from_dict(raw, base=tmp_path))
    agent.start()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "BMS_Status.SOC" not in agent.snapshot():
            time.sleep(0.05)
        snap = agent.snapshot()
    finally:
        agent.stop()
    assert snap["BMS_Status.SOC"][1] == pytest.approx(64.5)
    assert snap["OBC_Status.CablePlugged"][1] == "UNPLUGGED"
    assert snap["VCU_Status.Gear"][1] == "P"
