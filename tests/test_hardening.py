"""Attacks from the CAN side on what commands rely on: a short frame with the id of the ECU
that reports a precondition must not make that precondition fresh."""

from __future__ import annotations

import cantools

from agent.app.assemble import action_plans, bus_plans, telemetry_core
from agent.config import config_from_dict
from agent.core.executor import Executor, Status
from conftest import ROOT

DBC = ROOT / "dbc" / "demo_ev.dbc"
T0 = 1_700_000_000_000  # ms

UNLOCK = {"name": "doors.unlock", "actuator": "doors", "stale_ms": 500,
          "preconditions": ['VCU_Status.Gear == "P"'],
          "confirm": ['BCM_Status.DoorsLocked == "UNLOCKED"'], "timeout_ms": 1000,
          "frame": [{"message": "TCU_LockRequest", "signals": {"LockRequest": "UNLOCK"}}]}


def test_short_frames_with_the_vcu_id_do_not_make_parked_fresh(tmp_path):
    raw = {"vehicle": {"vin": "V1"}, "storage": {"dir": str(tmp_path)},
           "bus": [{"name": "pt", "interface": "virtual", "channel": "x", "dbc": [str(DBC)]}],
           "telemetry": {"messages": ["BMS_Status"]},
           "commands": {"trust_store": "t.toml", "action": [UNLOCK]}}
    cfg = config_from_dict(raw, base=tmp_path)
    plans = bus_plans(cfg)
    core = telemetry_core(plans, cfg.telemetry, live=True)
    ex = Executor(action_plans(cfg, plans), core.lookup, core.last_frame, queue_size=1)
    db = cantools.database.load_file(str(DBC))
    vcu = db.get_message_by_name("VCU_Status")
    full = vcu.encode({"VehicleSpeed": 0, "Gear": "P", "Ready": 1, "BrakePressed": 0,
                       "Odometer": 1, "VCU_Counter": 0, "VCU_Checksum": 0})
    core.tick(T0 / 1000)
    core.feed(0, T0 / 1000, vcu.frame_id, full)  # the real VCU, then silent
    for i in range(1, 11):  # an attacker's DLC-1 and DLC-0 frames with the VCU's id
        t = (T0 + i * 100) / 1000
        core.tick(t)
        core.feed(0, t, vcu.frame_id, full[:1])
        core.feed(0, t, vcu.frame_id, b"")
    out = ex.submit("c1", "doors.unlock", {}, T0 + 1000)
    assert [(o.status, o.reason) for o in out if isinstance(o, Status)] == \
        [("REJECTED", "PRECONDITION_FAILED")]
    assert not [o for o in out if not isinstance(o, Status)]  # nothing for the bus
