"""The simulated EV: cycle times, charging physics, reactions with delays, refusals."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
import uuid

import pytest

from agent.config import SimulatorConfig, config_from_dict
from agent.app.runtime import Agent
from agent.sim import from_config
from agent.sim.runner import SimulatorThread
from agent.sim.vehicle import (CYCLE_S, LOCK_REACTION_S, REACTION_S, SimulatedVehicle,
                               VehicleState)

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
    assert set(per_id) == {0x1A0, 0x2B0, 0x3C0, 0x3D0, 0x3D1}  # requests are the TCU's to send


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


def test_lock_takes_its_reaction_time():
    v = SimulatedVehicle(VehicleState(locked=True))
    v.step(T)
    request(v, "TCU_LockRequest", LockRequest="UNLOCK")
    frames, t = run(v, T, LOCK_REACTION_S - 0.05)
    assert v.state.locked and v.state.last_lock_result == "NONE"
    assert {str(vals["DoorsLocked"]) for _, vals in decoded(v, frames, "BCM_Status")} == {"LOCKED"}
    frames, t = run(v, t, 0.2)
    assert not v.state.locked and v.state.last_lock_result == "OK"
    assert str(decoded(v, frames, "BCM_Status")[-1][1]["DoorsLocked"]) == "UNLOCKED"


def test_charge_stop_and_limit_take_their_reaction_time():
    v = SimulatedVehicle(VehicleState(soc=50.0, charging=True))
    v.step(T)
    request(v, "TCU_ChargeRequest", ChargeRequest="STOP", ChargeLimitRequest=90)
    _, t = run(v, T, REACTION_S - 0.05)
    assert v.state.charging and v.state.charge_limit == 80
    run(v, t, 0.1)
    assert not v.state.charging and v.state.charge_limit == 90


def drive_trace(v, seconds, start=T, step=0.02):
    frames, t = run(v, start, seconds, step)
    return [(t, vals) for t, vals in decoded(v, frames, "VCU_Status")], t


def test_drive_cycle_speed_gear_and_stops():
    trace, _ = drive_trace(SimulatedVehicle(VehicleState(drive=True)), 2 * CYCLE_S + 5)
    speeds = [vals["VehicleSpeed"] for _, vals in trace]
    assert max(speeds) == pytest.approx(60, abs=0.5) and min(speeds) == 0
    assert len({round(x) for x in speeds}) > 30  # it varies, not just on and off
    stopped = [t1 for (_, a), (t1, b) in zip(trace, trace[1:])
               if a["VehicleSpeed"] > 0 and b["VehicleSpeed"] == 0]
    assert len(stopped) == 4  # two stops a cycle
    for t in stopped:  # each for a few seconds
        assert all(vals["VehicleSpeed"] == 0 for t1, vals in trace if t <= t1 < t + 3)
    for (t0, a), (t1, b) in zip(trace, trace[1:]):  # plausible acceleration and braking
        assert abs(b["VehicleSpeed"] - a["VehicleSpeed"]) / 3.6 / (t1 - t0) <= 3.1
    assert {str(vals["Gear"]) for _, vals in trace} == {"D"}
    assert {vals["Ready"] for _, vals in trace} == {1}
    again, _ = drive_trace(SimulatedVehicle(VehicleState(drive=True)), 2 * CYCLE_S + 5)
    assert [vals["VehicleSpeed"] for _, vals in again] == speeds  # deterministic


def test_while_driving_no_unlock_and_no_charging():
    v = SimulatedVehicle(VehicleState(drive=True, plugged=True, locked=True))
    _, t = run(v, T, 10.0)
    assert v.state.speed_kph > 20
    request(v, "TCU_LockRequest", LockRequest="UNLOCK")
    request(v, "TCU_ChargeRequest", ChargeRequest="START")
    run(v, t, 1.0)
    assert v.state.locked and v.state.last_lock_result == "REFUSED_MOVING"
    assert not v.state.charging


def test_drive_off_brakes_to_a_stop_then_park():
    cfg = SimulatorConfig(drive=True, timeline=({"at_s": 20, "drive": False},))
    v = from_config(cfg)
    _, t = run(v, T, 20.5)
    assert v.state.gear == "D" and 0 < v.state.speed_kph < 50  # braking, not stopped
    _, t = run(v, t, 8.0)
    assert v.state.speed_kph == 0 and v.state.gear == "P" and not v.state.ready
    request(v, "TCU_ChargeRequest", ChargeRequest="START")  # parked again: it charges
    run(v, t, 1.0)
    assert v.state.charging


def test_timeline_drive_gear_and_fault():
    v = SimulatedVehicle(VehicleState(soc=50.0, charging=True), timeline=[
        (1, {"fault": True}), (3, {"fault": False}), (5, {"drive": True}),
        (15, {"gear": "P"}), (30, {"gear": "R", "speed_kph": 5.0})])
    frames, t = run(v, T, 1.5)
    assert not v.state.charging
    assert str(decoded(v, frames, "OBC_Status")[-1][1]["ChargeState"]) == "FAULT"
    request(v, "TCU_ChargeRequest", ChargeRequest="START")  # a faulty charger refuses
    frames, t = run(v, t, 1.0)
    assert not v.state.charging
    frames, t = run(v, t, 1.0)
    assert str(decoded(v, frames, "OBC_Status")[-1][1]["ChargeState"]) == "IDLE"
    _, t = run(v, t, 12.0)  # driving; at 15 s shifted to P at speed: stops first
    assert v.state.gear == "D" and v.state.speed_kph > 0 and not v.state.drive
    _, t = run(v, t, 14.0)
    assert v.state.speed_kph == 0 and v.state.gear == "P"
    run(v, t, 1.0)
    assert v.state.gear == "R" and v.state.speed_kph == 5.0 and v.state.ready


def test_unknown_timeline_state_is_refused_at_start():
    with pytest.raises(ValueError, match="charging"):
        SimulatedVehicle(timeline=[(1, {"charging": True})])


class Broken(SimulatedVehicle):
    def step(self, now):
        raise RuntimeError("model bug")


def test_crashed_simulator_thread_logs_once_and_stops(caplog):
    thread = SimulatorThread(Broken(), "virtual", f"s-{uuid.uuid4().hex}").start()
    try:
        deadline = time.monotonic() + 5
        while thread.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not thread.running and isinstance(thread.error, RuntimeError)
    finally:
        thread.stop()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "model bug" in errors[0].getMessage()


def simulate(*args, timeout=30):
    from conftest import ROOT
    cmd = [sys.executable, "-m", "agent", "simulate", "--interface", "virtual",
           "--channel", f"s-{uuid.uuid4().hex}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, fragment", [
    (["--set", "simulator.soc=200"], "soc 0..100"),
    (["--set", "simulator.drive=maybe"], "simulator.drive"),
    (["--set", "simulator.timeline=[{at_s=1, gear='X'}]"], "timeline.0.gear"),
    (["--set", "mqtt.host=x"], "simulator.*"),
    (["--duration", "-1"], "--duration"),
])
def test_simulate_cli_errors(args, fragment):
    proc = simulate(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_simulate_cli_applies_set_without_config():
    proc = simulate("--set", "simulator.soc=61.5", "--duration", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert "soc 61.5 %" in proc.stderr


def test_simulate_cli_exits_non_zero_when_the_simulator_crashes():
    from conftest import ROOT
    script = ("import sys; from agent.sim.vehicle import SimulatedVehicle as V\n"
              "def boom(self, now): raise RuntimeError('model bug')\n"
              "V.step = boom\n"
              "from agent.cli.main import main\n"
              "sys.exit(main(sys.argv[1:]))")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script, "simulate", "--interface", "virtual",
                           "--channel", f"s-{uuid.uuid4().hex}", "--duration", "30"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert time.monotonic() - start < 20  # it stopped instead of running on silently
    assert "simulator stopped: RuntimeError: model bug" in proc.stderr
