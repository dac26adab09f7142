"""The power machine, the link recovery policy and the quiet core: pure, time passed in."""

from __future__ import annotations

import pytest

from agent.core import power as P
from agent.core.executor import ActionPlan, Executor, FramePlan, Send, Status
from agent.core.conditions import parse_condition
from agent.core.protocol import status_record
from agent.core.recovery import RADIO, REREAD, RESET, POWER_CYCLE, RecoveryPolicy
from agent.app.assemble import plans_for_dbc, telemetry_core
from agent.config import TelemetryConfig

T0 = 1_700_000_000_000


def machine(**kw):
    policy = dict(sleep_after_ms=10_000, buses=2, heartbeat_ms=600_000)
    policy.update(kw)
    return P.PowerMachine(P.PowerPolicy(**policy), T0)


def states(changes):
    return [c.state for c in changes]


def moves(changes):
    """The changes of state (not the quiet/resume of a drowsy, still awake, machine)."""
    return [c for c in changes if c.state != c.previous]


def test_asleep_only_when_every_bus_is_silent():
    m = machine()
    assert moves(m.tick(T0 + 9_999)) == []
    m.frame(1, T0 + 9_000)  # bus 1 still talks
    assert moves(m.tick(T0 + 10_500)) == []
    [change] = m.tick(T0 + 19_000)
    assert (change.state, change.previous) == ("asleep", "awake")
    assert "every bus silent for 10 s" in change.reason
    assert change.actions == (P.CLOSE_BATCH, P.PUBLISH_STATE, P.PUBLISH_STATUS, P.FLUSH_OUTBOX,
                              P.QUIET, P.SLOW_POLLING, P.ON_SLEEP)
    assert m.tick(T0 + 20_000) == []  # no second change


def test_first_frame_of_any_bus_wakes():
    m = machine()
    m.tick(T0 + 10_000)
    assert m.state == "asleep"
    [change] = m.frame(0, T0 + 50_000)
    assert change.state == "awake" and change.reason == "frame on bus 0"
    assert change.actions[0] == P.RESUME and P.PUBLISH_STATUS in change.actions
    assert m.frame(1, T0 + 50_001) == []


def test_slow_heartbeat_while_asleep_only():
    m = machine(heartbeat_ms=60_000)
    m.tick(T0 + 10_000)  # asleep
    beats = [c for t in range(10_000, 10_000 + 3_600_000, 1000) for c in m.tick(T0 + t + 1000)]
    assert len(beats) == 60 and all(c.actions == (P.HEARTBEAT,) for c in beats)
    m.frame(0, T0 + 4_000_000)
    after = [c for i in range(1, 9) for c in m.tick(T0 + 4_000_000 + i * 1000)]
    assert all(P.HEARTBEAT not in c.actions for c in after)


def test_sleep_after_zero_never_sleeps():
    m = machine(sleep_after_ms=0)
    assert m.tick(T0 + 10**9) == [] and m.state == "awake"
    assert not m.bus_asleep(0, T0 + 10**9)


def test_protect_with_hysteresis():
    m = machine(protect_below_v=11.8, protect_resume_v=12.2)
    m.frame(0, T0 + 1)
    assert m.voltage(11.9, T0 + 1000) == []
    [change] = m.voltage(11.7, T0 + 2000)
    assert change.state == "protect" and "11.70 V, below 11.8 V" in change.reason
    assert P.DROP_BATCHES in change.actions and P.ON_SLEEP not in change.actions
    for v in (11.9, 12.0, 12.19, 11.5):  # inside the band: stays
        assert m.voltage(v, T0 + 3000) == []
    assert m.frame(0, T0 + 3500) == [] and m.state == "protect"  # frames do not end protect
    [back] = m.voltage(12.2, T0 + 4000)
    assert back.state == "awake" and back.actions[0] == P.KEEP_BATCHES


def test_protect_over_asleep_and_back_to_asleep():
    m = machine(protect_below_v=11.8, protect_resume_v=12.2)
    m.tick(T0 + 10_000)
    assert m.state == "asleep"
    assert states(m.voltage(11.0, T0 + 11_000)) == ["protect"]
    assert m.frame(0, T0 + 12_000) == []  # still protect
    assert states(m.voltage(12.5, T0 + 40_000)) == ["asleep"]  # buses silent again by then


def test_hysteresis_needs_resume_above_threshold():
    with pytest.raises(ValueError, match="hysteresis"):
        machine(protect_below_v=12.0, protect_resume_v=12.0)


def test_status_record_power_field():
    assert "power" not in status_record("V", 1, True)
    assert "power" not in status_record("V", 1, True, "awake")  # absent means awake (§5)
    assert status_record("V", 1, True, "asleep")["power"] == "asleep"
    with pytest.raises(ValueError):
        status_record("V", 1, True, "dozing")


# -- recovery ------------------------------------------------------------------------------

def policy(**kw):
    args = dict(after_ms=120_000, backoff_ms=30_000, max_per_hour=6, power_cycle=True)
    args.update(kw)
    return RecoveryPolicy(**args)


def run(p, start, end, registered=False, bearer=None, link_up=lambda t: False, step=1000):
    taken = []
    for t in range(start, end, step):
        s = p.poll(T0 + t, link_up(t), registered, bearer)
        if s:
            taken.append((t, s))
    return taken


def test_escalates_with_backoff_after_the_outage_lasts():
    p = policy()
    taken = run(p, 0, 1_000_000)
    assert [s for _, s in taken[:4]] == [REREAD, RADIO, RESET, POWER_CYCLE]
    times = [t for t, _ in taken]
    assert times[0] == 120_000
    assert times[1] - times[0] == 30_000 and times[2] - times[1] == 60_000
    assert times[3] - times[2] == 120_000


def test_no_step_when_the_modem_is_fine_or_the_link_is_up():
    assert run(policy(), 0, 1_000_000, registered=True, bearer=True) == []
    assert run(policy(), 0, 1_000_000, registered=True) == []  # bearer unknown: not its fault
    assert run(policy(), 0, 1_000_000, link_up=lambda t: True) == []
    # registered but no data bearer: the modem's fault
    assert run(policy(), 0, 200_000, registered=True, bearer=False)[0][1] == REREAD


def test_stops_once_back_and_restarts_from_the_first_step():
    p = policy()
    taken = run(p, 0, 200_000, link_up=lambda t: t >= 160_000)
    assert [s for _, s in taken] == [REREAD, RADIO]
    assert p.recoveries == 1 and p.level == 0
    again = run(p, 200_000, 400_000)
    assert again[0] == (320_000, REREAD)


def test_hourly_cap():
    p = policy(backoff_ms=1000, max_per_hour=3)
    taken = run(p, 0, 3_600_000)
    assert len(taken) == 3 and p.capped > 0  # the first hour since the first step: 3
    later = run(p, 3_600_000, 3_900_000)
    assert later and later[0][0] >= 120_000 + 3_600_000  # the oldest step aged out


def test_without_power_cycle_the_reset_repeats():
    p = policy(power_cycle=False, max_per_hour=60)
    assert [s for _, s in run(p, 0, 3_000_000)][:5] == [REREAD, RADIO, RESET, RESET, RESET]


# -- the quiet core ------------------------------------------------------------------------

def _core(test_dbc):
    plans = plans_for_dbc([test_dbc], TelemetryConfig(messages=("VCU_Drive", "BMS_Status")))
    return telemetry_core(plans, TelemetryConfig(max_batch_age_ms=1000), live=True)


def test_quiet_core_has_no_null_storm_and_no_heartbeats(test_dbc):
    import cantools
    db = cantools.database.load_file(str(test_dbc))
    drive = db.get_message_by_name("VCU_Drive")
    core = _core(test_dbc)
    t = T0 / 1000
    core.tick(t)
    core.feed(0, t, drive.frame_id, drive.encode({"Speed": 10.0, "Gear": 3, "Ready": 1}))
    core.flush()
    core.take_batches()
    core.set_quiet(True, t + 1)
    for i in range(1, 3600):  # an hour asleep
        core.tick(t + i)
    core.flush()
    assert core.take_batches() == []  # no nulls, no heartbeats
    assert core.lookup("VCU_Drive.Speed")[0] == 10.0  # the last-known value stays
    core.set_quiet(False, t + 3600)
    for i in range(1, 5):  # awake, but the frame has not come yet: within its timeout
        core.tick(t + 3600 + i * 0.1)
    core.flush()
    assert core.take_batches() == []  # no storm at the wake either
    core.feed(0, t + 3600.5, drive.frame_id, drive.encode({"Speed": 12.0, "Gear": 3, "Ready": 1}))
    core.tick(t + 3600.6)
    core.flush()
    [batch] = core.take_batches()
    assert batch.sig["VCU_Drive.Speed"][-1][1] == 12.0
    assert all(v is not None for _, v in batch.sig["VCU_Drive.Speed"])
    for i in range(1, 30):  # it stays away now: a real timeout, one null
        core.tick(t + 3600.6 + i * 0.1)
    core.flush()
    nulls = [v for b in core.take_batches() for _, v in b.sig.get("VCU_Drive.Speed", [])]
    assert nulls == [None]


# -- the executor on a sleeping bus --------------------------------------------------------

class Bus:
    """The power machine's view, driven by hand."""

    def __init__(self):
        self.asleep = True
        self.heard = -1

    def bus_asleep(self, bus, now_ms):
        return self.asleep

    def bus_heard_since(self, bus, t_ms):
        return self.heard >= t_ms


def _executor(test_dbc, wake: bool):
    import cantools
    db = cantools.database.load_file(str(test_dbc))
    msg = db.get_message_by_name("VCU_Drive")
    fp = FramePlan(0, msg.frame_id, msg, {"Gear": 0}, {}, 1, 0)
    values = {}

    def lookup(name):
        return values.get(name)

    plan = ActionPlan("park", "drive", (parse_condition("VCU_Drive.Ready == 1", "p"),), (),
                      (parse_condition("VCU_Drive.Gear == 0", "c"),), 2000, 2000, (fp,),
                      (fp,) if wake else (), 1000)
    ex = Executor({"park": plan}, lookup, lambda b, c: None)
    bus = Bus()
    ex.power = bus
    ex.bus_names = ["pt"]
    return ex, bus, values


def test_without_wake_frames_a_sleeping_bus_is_refused(test_dbc):
    ex, bus, _ = _executor(test_dbc, wake=False)
    [status] = ex.submit("c1", "park", {}, T0)
    assert (status.status, status.reason) == ("REJECTED", "PRECONDITION_FAILED")
    assert "the vehicle is asleep (bus pt silent)" in status.detail
    assert "no wake frames" in status.detail


def test_wake_frames_first_then_preconditions_then_the_action(test_dbc):
    ex, bus, values = _executor(test_dbc, wake=True)
    out = ex.submit("c1", "park", {}, T0)
    assert [o.status for o in out if isinstance(o, Status)] == ["ACCEPTED"]
    assert out[0].detail == "waking the vehicle"
    assert len([o for o in out if isinstance(o, Send)]) == 1  # the wake frame
    assert ex.poll(T0 + 100) == []  # not heard yet
    bus.asleep, bus.heard = False, T0 + 150
    assert ex.poll(T0 + 160) == []  # heard, but the precondition signal has not come
    values["VCU_Drive.Ready"] = (1, T0 + 200)
    out = ex.poll(T0 + 210)
    assert [type(o).__name__ for o in out] == ["Send"]  # the action's own frame now
    values["VCU_Drive.Gear"] = (0, T0 + 300)
    [done] = ex.poll(T0 + 310)
    assert done.status == "SUCCEEDED"


def test_a_vehicle_that_does_not_wake_times_out(test_dbc):
    ex, bus, _ = _executor(test_dbc, wake=True)
    ex.submit("c1", "park", {}, T0)
    [status] = ex.poll(T0 + 1000)
    assert (status.status, status.reason) == ("TIMED_OUT", "NO_RESPONSE")
    assert "did not wake within 1000 ms" in status.detail


def test_woken_but_precondition_fails(test_dbc):
    ex, bus, values = _executor(test_dbc, wake=True)
    ex.submit("c1", "park", {}, T0)
    bus.asleep, bus.heard = False, T0 + 100
    values["VCU_Drive.Ready"] = (0, T0 + 200)
    [status] = ex.poll(T0 + 1000)
    assert (status.status, status.reason) == ("REJECTED", "PRECONDITION_FAILED")


def test_all_buses_silent_quiets_the_core_before_asleep():
    m = machine(quiet_after_ms=300)
    [c] = m.tick(T0 + 300)
    assert (c.state, c.actions) == ("awake", (P.QUIET,)) and m.drowsy
    assert m.tick(T0 + 400) == []
    [c] = m.frame(1, T0 + 500)  # the car was not going to sleep after all
    assert (c.state, c.actions) == ("awake", (P.RESUME,)) and not m.drowsy
    assert m.tick(T0 + 700) == []  # bus 1 spoke at 500
    assert m.tick(T0 + 800)[0].actions == (P.QUIET,)
    assert states(m.tick(T0 + 10_500)) == ["asleep"]
    assert not m.drowsy


def test_after_a_wake_unchanged_values_are_sent_again(test_dbc):
    import cantools
    db = cantools.database.load_file(str(test_dbc))
    drive = db.get_message_by_name("VCU_Drive")
    data = drive.encode({"Speed": 10.0, "Gear": 3, "Ready": 1})
    core = _core(test_dbc)
    t = T0 / 1000
    core.tick(t)
    core.feed(0, t, drive.frame_id, data)
    core.flush()
    core.take_batches()
    core.set_quiet(True, t + 1)
    core.set_quiet(False, t + 100)
    core.tick(t + 100)
    core.feed(0, t + 100.1, drive.frame_id, data)  # the same frame as before the sleep
    core.flush()
    [batch] = core.take_batches()
    assert batch.sig["VCU_Drive.Speed"] == [(0, 10.0)] and batch.t0 == int((t + 100.1) * 1000)
    assert batch.sig["VCU_Drive.Gear"][0][1] == "D"
