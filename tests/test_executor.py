"""The command executor (sans-I/O) against the demo EV's DBC, with state fed as frames."""

from __future__ import annotations

import cantools
import pytest

from agent.app.assemble import action_plans, bus_plans, telemetry_core
from agent.config import config_from_dict
from agent.app.families import ActionsHandler, StateHandler, UpdateHandler
from agent.core.commands import Command
from agent.core.executor import Executor, Send, Status, actions_family
from agent.errors import BusError
from conftest import ROOT

DBC = ROOT / "dbc" / "demo_ev.dbc"
T0 = 1_700_000_000_000  # ms

ACTIONS = [
    {"name": "charge.start", "actuator": "charger",
     "preconditions": ['OBC_Status.CablePlugged == "PLUGGED"', 'VCU_Status.Gear == "P"'],
     "already": ['OBC_Status.ChargeState == "CHARGING"'],
     "confirm": ['OBC_Status.ChargeState == "CHARGING"'], "timeout_ms": 1000,
     "frame": [{"message": "TCU_ChargeRequest", "signals": {"ChargeRequest": "START"},
                "repeat": 3, "interval_ms": 50, "counter": "TCU_ChargeCounter",
                "checksum": "TCU_ChargeChecksum"}]},
    {"name": "charge.stop", "actuator": "charger",
     "already": ['OBC_Status.ChargeState != "CHARGING"'],
     "confirm": ['OBC_Status.ChargeState != "CHARGING"'], "timeout_ms": 1000,
     "frame": [{"message": "TCU_ChargeRequest", "signals": {"ChargeRequest": "STOP"}}]},
    {"name": "charge.set_limit", "actuator": "charge_limit",
     "confirm": ["OBC_Status.ChargeLimit == {percent}"], "timeout_ms": 1000,
     "frame": [{"message": "TCU_ChargeRequest",
                "signals": {"ChargeRequest": "NONE", "ChargeLimitRequest": "{percent}"}}]},
]


@pytest.fixture
def rig(tmp_path):
    raw = {"vehicle": {"vin": "V1"}, "storage": {"dir": str(tmp_path)},
           "bus": [{"name": "pt", "interface": "virtual", "channel": "x", "dbc": [str(DBC)]}],
           "telemetry": {"messages": ["BMS_Status"]},
           "commands": {"trust_store": "t.toml", "queue_size": 1, "action": ACTIONS}}
    cfg = config_from_dict(raw, base=tmp_path)
    plans = bus_plans(cfg)
    core = telemetry_core(plans, cfg.telemetry)
    ex = Executor(action_plans(cfg, plans), core.lookup, core.last_frame, queue_size=1)
    db = cantools.database.load_file(str(DBC))
    return core, ex, db


def state(core, db, t_ms, plugged="PLUGGED", charge="IDLE", gear="P", limit=80, speed=0.0):
    obc = db.get_message_by_name("OBC_Status")
    vcu = db.get_message_by_name("VCU_Status")
    core.feed(0, t_ms / 1000, obc.frame_id, obc.encode(
        {"CablePlugged": plugged, "ChargeState": charge, "ChargeLimit": limit,
         "ChargeCurrent": 0, "ChargeVoltageAC": 230, "OBC_Counter": 0}))
    core.feed(0, t_ms / 1000, vcu.frame_id, vcu.encode(
        {"VehicleSpeed": speed, "Gear": gear, "Ready": 1, "BrakePressed": 0, "Odometer": 1,
         "VCU_Counter": 0, "VCU_Checksum": 0}))


def statuses(out):
    return [(o.id, o.status, o.reason) for o in out if isinstance(o, Status)]


def test_charge_start_sends_frames_and_succeeds_on_confirmation(rig):
    core, ex, db = rig
    state(core, db, T0)
    out = ex.submit("c1", "charge.start", {}, T0 + 10)
    assert statuses(out) == [("c1", "ACCEPTED", None)]
    sends = [o for o in out if isinstance(o, Send)]
    assert len(sends) == 1 and sends[0].can_id == 0x5A0
    req = db.get_message_by_name("TCU_ChargeRequest")
    first = req.decode(sends[0].data, decode_choices=False)
    assert first["ChargeRequest"] == 1 and first["TCU_ChargeCounter"] == 0
    assert sum(sends[0].data[:7]) & 0xFF == sends[0].data[7]  # the checksum
    more = ex.poll(T0 + 120)  # the two repeats are due; not confirmed yet
    assert [req.decode(s.data, decode_choices=False)["TCU_ChargeCounter"]
            for s in more if isinstance(s, Send)] == [1, 2]
    assert statuses(more) == []
    state(core, db, T0 + 200, charge="CHARGING")
    done = ex.poll(T0 + 210)
    assert statuses(done) == [("c1", "SUCCEEDED", None)]
    assert done[-1].result == {"OBC_Status.ChargeState": "CHARGING"}
    assert not ex.busy


def test_precondition_failed_sends_nothing(rig):
    core, ex, db = rig
    state(core, db, T0, plugged="UNPLUGGED")
    out = ex.submit("c1", "charge.start", {}, T0 + 10)
    assert statuses(out) == [("c1", "REJECTED", "PRECONDITION_FAILED")]
    assert "CablePlugged" in out[0].detail
    assert not any(isinstance(o, Send) for o in out)


def test_never_seen_and_stale_signals_fail_preconditions(rig):
    core, ex, db = rig
    out = ex.submit("c1", "charge.start", {}, T0)
    assert statuses(out) == [("c1", "REJECTED", "PRECONDITION_FAILED")]
    assert "never received" in out[0].detail
    state(core, db, T0)
    out = ex.submit("c2", "charge.start", {}, T0 + 5000)
    assert statuses(out) == [("c2", "REJECTED", "PRECONDITION_FAILED")]
    assert "stale" in out[0].detail


def test_already_charging_succeeds_without_sending(rig):
    core, ex, db = rig
    state(core, db, T0, charge="CHARGING")
    out = ex.submit("c1", "charge.start", {}, T0 + 10)
    assert statuses(out) == [("c1", "ACCEPTED", None), ("c1", "SUCCEEDED", None)]
    assert not any(isinstance(o, Send) for o in out)


def test_no_response_times_out(rig):
    core, ex, db = rig
    state(core, db, T0)
    ex.submit("c1", "charge.start", {}, T0)
    for t in range(100, 1000, 100):
        state(core, db, T0 + t)  # the charger keeps reporting IDLE
        assert statuses(ex.poll(T0 + t)) == []
    assert statuses(ex.poll(T0 + 1000)) == [("c1", "TIMED_OUT", "NO_RESPONSE")]


def test_set_limit_uses_the_parameter(rig):
    core, ex, db = rig
    state(core, db, T0, limit=80)
    out = ex.submit("c1", "charge.set_limit", {"percent": 90}, T0)
    (send,) = [o for o in out if isinstance(o, Send)]
    req = db.get_message_by_name("TCU_ChargeRequest").decode(send.data, decode_choices=False)
    assert req["ChargeLimitRequest"] == 90 and req["ChargeRequest"] == 0
    state(core, db, T0 + 50, limit=80)
    assert statuses(ex.poll(T0 + 60)) == []
    state(core, db, T0 + 100, limit=90)
    assert statuses(ex.poll(T0 + 110)) == [("c1", "SUCCEEDED", None)]


def test_busy_and_supersede(rig):
    core, ex, db = rig
    state(core, db, T0)
    ex.submit("c1", "charge.start", {}, T0)
    out = ex.submit("c2", "charge.start", {}, T0 + 1)  # same name: waits (queue size 1)
    assert statuses(out) == [("c2", "ACCEPTED", None)]
    out = ex.submit("c3", "charge.start", {}, T0 + 2)  # the queue is full
    assert statuses(out) == [("c3", "REJECTED", "BUSY")]
    assert not any(isinstance(o, Send) for o in out)
    out = ex.submit("c4", "charge.stop", {}, T0 + 3)  # stop during start supersedes it
    assert ("c1", "FAILED", "SUPERSEDED") in statuses(out)
    assert ("c2", "FAILED", "SUPERSEDED") in statuses(out)  # and what waited behind it
    # The charger has not reacted to c1's START yet, so it still reads "not charging": the
    # stop must not take that as "already stopped" -- it sends its frames and confirms.
    assert ("c4", "SUCCEEDED", None) not in statuses(out)
    assert any(isinstance(o, Send) and o.command_id == "c4" for o in out)
    assert not ex.running("c2")
    # different actuators run in parallel
    out = ex.submit("c5", "charge.set_limit", {"percent": 70}, T0 + 4)
    assert ("c5", "ACCEPTED", None) in statuses(out)
    assert any(isinstance(o, Send) and o.command_id == "c5" for o in out)


def test_write_failed_starts_the_next(rig):
    core, ex, db = rig
    state(core, db, T0)
    ex.submit("c1", "charge.start", {}, T0)
    ex.submit("c2", "charge.start", {}, T0 + 1)
    out = ex.send_failed("c1", "bus down", T0 + 2)
    assert statuses(out)[0] == ("c1", "FAILED", "WRITE_FAILED")
    assert any(isinstance(o, Send) and o.command_id == "c2" for o in out)


def command(cid, name, **params):
    return Command(id=cid, vin="V1", name=name, params=params, iat=T0, exp=T0 + 60_000,
                   kid=b"k", key_name="ops", digest=b"d")


def test_unconfigured_and_snapshot(rig):
    core, ex, db = rig
    assert statuses(ex.submit("c1", "doors.lock", {}, T0)) == [
        ("c1", "REJECTED", "UNKNOWN_COMMAND")]
    # state.snapshot is the state family's: the record is published, the values answered
    published = []
    handler = StateHandler(lambda: {"Vehicle.Speed": [T0, 0.0]},
                           lambda values, t: published.append((values, t)))
    assert handler.handle(command("c2", "state.snapshot"), T0) == [
        Status("c2", "SUCCEEDED", result={"Vehicle.Speed": [T0, 0.0]})]
    assert published == [({"Vehicle.Speed": [T0, 0.0]}, T0)]
    assert not handler.running("c2")


def test_update_commands_without_updates_configured_are_unknown():
    handler = UpdateHandler(None, lambda: (True, ""))
    assert statuses(handler.handle(command("u1", "update.stage", target="fw",
                                           repository="https://x"), T0)) == [
        ("u1", "REJECTED", "UNKNOWN_COMMAND")]
    assert handler.poll(T0) == [] and not handler.running("u1") and handler.status() == {}


def test_actions_handler_sends_frames_and_turns_write_errors_into_statuses(rig):
    core, ex, db = rig
    state(core, db, T0)
    sent = []
    handler = ActionsHandler(actions_family(ex.actions), ex,
                             lambda bus, can_id, data: sent.append((bus, can_id, data)))
    out = handler.handle(command("c1", "charge.start"), T0)
    assert statuses(out) == [("c1", "ACCEPTED", None)] and len(sent) == 1  # repeat 3, 50 ms
    assert handler.busy and handler.running("c1")
    handler.poll(T0 + 100)
    assert len(sent) == 3 and handler.status() == {"counters": {"frames_sent": 3}}

    def broken(bus, can_id, data):
        raise BusError("bus down")

    failing = ActionsHandler(actions_family(ex.actions), ex, broken)
    out = failing.handle(command("c2", "charge.stop"), T0 + 200)  # supersedes c1
    assert statuses(out) == [("c1", "FAILED", "SUPERSEDED"), ("c2", "ACCEPTED", None),
                             ("c2", "FAILED", "WRITE_FAILED")]
    assert failing.status() == {"counters": {"write_failed": 1}} and not failing.busy


def test_out_of_range_parameter_is_rejected_before_sending(rig):
    core, ex, db = rig
    state(core, db, T0)
    out = ex.submit("c1", "charge.set_limit", {"percent": 200}, T0)
    assert statuses(out) == [("c1", "REJECTED", "BAD_PARAMS")]
    assert not any(isinstance(o, Send) for o in out)
