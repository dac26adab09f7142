"""Campaigns in the core (core/campaigns.py, campaignengine.py, campaigncode.py, windows.py)
on a real telemetry core: validation, windows against a brute-force reference, ring-buffer
bounds, firing, time campaigns, start/expiry, run-time selection."""

from __future__ import annotations

import random

import cantools
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from agent.core import campaigns as K
from agent.core.campaignengine import CampaignEngine
from agent.core.selection import Selection, SignalChoice, resolve
from agent.core.telemetry import TelemetryCore
from agent.errors import ParamError

DBC = """VERSION ""
BU_: ECU
BO_ 256 Fast: 8 ECU
 SG_ A : 0|16@1+ (1,0) [0|65535] "" ECU
 SG_ B : 16|8@1+ (1,0) [0|255] "" ECU
 SG_ Mode : 24|8@1+ (1,0) [0|3] "" ECU
BO_ 512 Slow: 8 ECU
 SG_ C : 0|16@1+ (0.5,0) [0|1000] "" ECU
 SG_ D : 16|8@1+ (1,0) [0|255] "" ECU
BA_DEF_ BO_ "GenMsgCycleTime" INT 0 10000;
BA_DEF_DEF_ "GenMsgCycleTime" 0;
BA_ "GenMsgCycleTime" BO_ 256 10;
BA_ "GenMsgCycleTime" BO_ 512 100;
VAL_ 256 Mode 0 "OFF" 1 "IDLE" 2 "CHARGING" 3 "FAULT" ;
"""


@pytest.fixture(scope="module")
def db():
    return cantools.database.load_string(DBC, "dbc")


# Messages [telemetry] does not select get the tap's own decoder; those it selects have the
# tap's work inlined in their sampler (telemetry._sampler): the tests that take a reference
# run both ways.
ONLY_SLOW_D = ("Slow.D",)
EVERYTHING = ("Slow.D", "Fast.A", "Fast.B", "Fast.Mode", "Slow.C")
BOTH = pytest.mark.parametrize("sel", [ONLY_SLOW_D, EVERYTHING], ids=["tap", "sampler"])


def make(db, telemetry=ONLY_SLOW_D, **limits):
    sel = Selection(signals=tuple(SignalChoice(select=s) for s in telemetry))
    plans = resolve(sel, [("can0", [db])])
    core = TelemetryCore(plans)
    catalog = K.Catalog(plans)
    engine = CampaignEngine(catalog, K.Limits(**limits), stale_ms=5000, batch_age_ms=1000)
    return core, catalog, engine


def frame(db, name, **values):
    msg = db.get_message_by_name(name)
    full = {s.name: 0 for s in msg.signals}
    full.update(values)
    return msg.frame_id, msg.encode(full)


def doc(cid="c1", version=1, signals=("Fast.A",), **trigger):
    trigger = trigger or {"condition": "Fast.A > 100"}
    return {"id": cid, "version": version, "signals": [{"name": s} for s in signals],
            "trigger": trigger}


def start(core, engine, c, now_ms=0):
    engine.apply(c, now_ms)
    core.set_taps(engine.taps(), engine.trim)


# -- validation -----------------------------------------------------------------------------

def test_unknown_signals_are_listed(db):
    _, catalog, _ = make(db)
    d = doc(signals=("Fast.A", "Fast.Nope", "Other.X"), condition="Fast.Zzz > 1")
    with pytest.raises(ParamError, match=r"unknown signal\(s\) Fast.Nope, Other.X, Fast.Zzz"):
        K.parse_campaign(d, catalog, K.Limits())


def test_expression_errors_name_the_position(db):
    _, catalog, _ = make(db)
    with pytest.raises(ParamError, match=r"campaign.trigger.condition: expected '\)', found "
                                         r"end of expression at position 14"):
        K.parse_campaign(doc(condition="(Fast.A > 100"), catalog, K.Limits())
    deep = "Fast.A" + " + Fast.A" * 10 + " > 1"
    with pytest.raises(ParamError, match="11 levels deep, more than 10"):
        K.parse_campaign(doc(condition=deep), catalog, K.Limits())


def test_a_campaign_over_256_kib_is_refused(db):
    _, catalog, _ = make(db)
    d = doc()
    d["signals"] = [{"name": "Fast.A", "deadband": 0.0}] + [
        {"name": f"Fast.A{'x' * 200}{i}"} for i in range(1400)]
    with pytest.raises(ParamError, match=r"campaign: \d+ bytes, over the 262144-byte limit"):
        K.parse_campaign(d, catalog, K.Limits())


@pytest.mark.parametrize("change, fragment", [
    ({"priority": 10}, "campaign.priority: must be an integer 0-9"),
    ({"version": -1}, "campaign.version: must be an integer >= 0"),
    ({"id": "bad id"}, "campaign.id"),
    ({"expiry": 5, "start": 10}, "campaign.expiry: must be after start"),
    ({"trigger": {"period_ms": 10}}, "campaign.trigger.period_ms: must be an integer 100-"),
    ({"trigger": {"condition": "Fast.A > 1", "pre_ms": 10 ** 9}}, "campaign.trigger.pre_ms"),
    ({"trigger": {"edge": 1}}, "campaign.trigger: must be"),
    ({"trigger": {"condition": "Fast.A > 1", "extra": 1}}, "unknown key 'extra'"),
    ({"signals": []}, "campaign.signals: must be a non-empty list"),
    ({"signals": [{"name": "Fast.A"}, {"name": "Fast.A"}]}, "listed twice"),
    ({"colour": "red"}, "campaign: unknown key 'colour'"),
])
def test_bad_documents(db, change, fragment):
    _, catalog, _ = make(db)
    d = doc()
    d.update(change)
    with pytest.raises(ParamError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        K.parse_campaign(d, catalog, K.Limits())


def test_family_checks_params(db):
    _, catalog, _ = make(db)
    fam = K.campaign_family(catalog, K.Limits())
    assert fam.commands == {"campaign.apply", "campaign.remove", "campaign.list"}
    fam.check_params("campaign.apply", {"campaign": doc()})
    fam.check_params("campaign.remove", {"id": "c1"})
    fam.check_params("campaign.list", {})
    for name, params in [("campaign.apply", {}), ("campaign.apply", {"campaign": doc(), "x": 1}),
                         ("campaign.remove", {"id": 3}), ("campaign.list", {"a": 1})]:
        with pytest.raises(ParamError):
            fam.check_params(name, params)


def test_versions_and_the_buffer_budget(db):
    _, catalog, engine = make(db, max_buffer_bytes=10_000)
    c1 = K.parse_campaign(doc(version=2), catalog, engine.limits)
    engine.apply(c1, 0)
    for v in (1, 2):
        assert "is not newer than the applied version 2" in engine.check_apply(
            K.parse_campaign(doc(version=v), catalog, engine.limits))
    assert engine.check_apply(K.parse_campaign(doc(version=3), catalog, engine.limits)) == ""
    # pre_ms 500 on a 10 ms message: a ring of 51 frames and its slack (16) x 128 bytes
    big = doc("c2", trigger=None, condition="Fast.A > 1", pre_ms=500)
    big["trigger"] = {"condition": "Fast.A > 1", "pre_ms": 500}
    c2 = K.parse_campaign(big, catalog, engine.limits)
    assert K.buffer_bytes(c2, catalog, engine.limits) == (51 + 16) * 128
    engine.apply(c2, 0)
    c3 = K.parse_campaign(dict(big, id="c3", signals=[{"name": "Fast.A"}, {"name": "Fast.B"}]),
                          catalog, engine.limits)
    assert engine.check_apply(c3) == (
        "campaign c3: its buffers need 8576 bytes, only 1424 of campaigns.max_buffer_bytes "
        "(10000) are free; shorten pre_ms or windows, or remove a campaign")
    huge = dict(big, id="c4")
    huge["trigger"] = {"condition": "Fast.A > 1", "pre_ms": 100_000}
    with pytest.raises(ParamError, match="over campaigns.max_buffer_bytes"):
        K.parse_campaign(huge, catalog, engine.limits)


def test_a_start_loads_the_stored_campaigns_at_once_and_refuses_what_does_not_fit(db):
    core, catalog, engine = make(db, max_buffer_bytes=10_000)
    stored = []
    for cid, pre in (("a", 500), ("b", 500), ("c", 0)):
        d = doc(cid)
        d["trigger"] = {"condition": "Fast.A > 1", "pre_ms": pre}
        stored.append(K.parse_campaign(d, catalog, engine.limits))
    refused = engine.load(stored, 0)
    assert [(c.id, why) for c, why in refused] == [(
        "b", "campaign b: its buffers need 8576 bytes, only 1424 of campaigns.max_buffer_bytes "
        "(10000) are free; shorten pre_ms or windows, or remove a campaign")]
    assert sorted(engine.applied) == sorted(engine.running) == ["a", "c"]
    core.set_taps(engine.taps(), engine.trim)
    core.feed(0, 1.0, *frame(db, "Fast", A=5))
    assert engine.running["a"].firings == engine.running["c"].firings == 1


def test_at_least_256_active_conditions(db):
    core, catalog, engine = make(db)
    for i in range(300):
        c = K.parse_campaign(doc(f"c{i}", condition=f"Fast.A > {i}"), catalog, engine.limits)
        assert engine.check_apply(c) == ""
        engine.apply(c, 0)
    core.set_taps(engine.taps(), engine.trim)
    can_id, data = frame(db, "Fast", A=150)
    core.feed(0, 0.001, can_id, data)
    assert sum(r.firings for r in engine.running.values()) == 150


# -- windows against brute force ------------------------------------------------------------

@BOTH
@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 1000)), min_size=1, max_size=200),
       st.sampled_from(["avg", "min", "max"]), st.integers(1, 500))
def test_windows_match_brute_force(db, sel, steps, fn, n):
    core, catalog, engine = make(db, telemetry=sel, assumed_period_ms=1)  # 1 ms frames
    c = K.parse_campaign(doc(condition=f"{fn}(Fast.A, {n}) > 0 or Fast.A == 0"), catalog,
                         engine.limits)
    start(core, engine, c)
    seen = []
    t = 0
    for dt, value in steps:
        t += dt
        can_id, data = frame(db, "Fast", A=value)
        core.feed(0, t / 1000, can_id, data)
        seen.append((int(t / 1000 * 1000), value))  # the ms the engine reads off t seconds
        engine._now = t
        inside = [v for ts, v in seen if t - n <= ts <= t]
        want = {"avg": lambda x: sum(x) / len(x), "min": min, "max": max}[fn](inside)
        assert engine.window(fn, "Fast.A", n) == pytest.approx(want)


# -- rings ----------------------------------------------------------------------------------

def test_ring_buffers_stay_bounded_and_hold_the_pre_trigger_samples(db):
    core, catalog, engine = make(db)
    d = doc(signals=("Fast.A", "Fast.B"))
    d["trigger"] = {"condition": "Fast.B == 200", "pre_ms": 300, "post_ms": 100}
    c = K.parse_campaign(d, catalog, engine.limits)
    start(core, engine, c)
    run = engine.running["c1"]
    tap = engine.tapmap[(0, db.get_message_by_name("Fast").frame_id)]
    ring = tap.ring
    assert tap.cap == 31  # 300 ms of a 10 ms message, + 1: one ring of frames
    sent = []
    for i in range(2000):  # 2 frames per cycle: twice the DBC rate
        t_ms = 1_000_000 + i * 5
        can_id, data = frame(db, "Fast", A=i, B=7)
        core.feed(0, t_ms / 1000, can_id, data)
        sent.append((t_ms, i))
        assert len(ring) <= tap.limit == 31 + 11  # trimmed to 31 when past its slack
    assert 31 <= len(ring) and engine.held_bytes("c1") == len(ring) * 128
    t_fire = 1_000_000 + 2000 * 5
    can_id, data = frame(db, "Fast", A=2000, B=200)
    core.feed(0, t_fire / 1000, can_id, data)
    sent.append((t_fire, 2000))
    batches = engine.take_batches()
    assert len(batches) == 1 and batches[0].trigger == t_fire
    assert run.overflow == 1  # twice as fast as sized for: the firing is counted
    pre = [[batches[0].t0 + dt, v] for dt, v in batches[0].sig["Fast.A"]]
    # the ring held at least the newest 31 arrivals and the trigger's frame: the last
    # 155 ms or more of the 300, all of them intact
    assert len(pre) >= 32 and pre == [list(x) for x in sent[-len(pre):]]


@BOTH
def test_firing_rising_edge_min_interval_and_post_capture(db, sel):
    core, catalog, engine = make(db, telemetry=sel)
    d = doc(signals=("Fast.A",))
    d["trigger"] = {"condition": "Fast.A >= 10", "pre_ms": 50, "post_ms": 40,
                    "min_interval_ms": 500}
    d["priority"] = 1
    c = K.parse_campaign(d, catalog, engine.limits)
    start(core, engine, c)
    values = [0, 5, 10, 11, 12, 13, 14, 15, 16, 0, 20, 0, 0, 0, 30]
    t = 1000
    for i, v in enumerate(values):
        t = 1000 + i * 10
        core.feed(0, t / 1000, *frame(db, "Fast", A=v))
        engine.tick(t)
    engine.tick(t + 1000)
    engine.tick(t + 2000)
    run = engine.running["c1"]
    assert run.firings == 1  # 20 at 1100 is within min_interval; 30 too
    batches = engine.take_batches()
    pre, post = batches[0], batches[1]
    assert pre.trigger == post.trigger == 1020
    assert [v for _, v in pre.sig["Fast.A"]] == [0, 5, 10]  # 1000..1020, pre_ms 50
    assert [v for _, v in post.sig["Fast.A"]] == [11, 12, 13, 14]  # through 1060
    p = post.payload("VIN", 9)
    assert p["campaign"] == "c1" and p["trigger"] == 1020 and p["seq"] == 9
    assert post.priority == 1


def test_evaluation_only_on_change(db):
    core, catalog, engine = make(db)
    start(core, engine, K.parse_campaign(doc(condition="Fast.A + 1 > 6"), catalog,
                                         engine.limits))
    can_id, data = frame(db, "Fast", A=1, B=0)
    for i in range(100):
        core.feed(0, 1 + i / 100, can_id, data)
    assert engine.evaluations == 1
    for i in range(100):  # B changes, A does not: still no evaluation
        core.feed(0, 2 + i / 100, *frame(db, "Fast", A=1, B=i))
    assert engine.evaluations == 1
    core.feed(0, 3, *frame(db, "Fast", A=2))
    assert engine.evaluations == 2


def test_a_signal_against_a_constant_is_evaluated_only_when_it_holds_or_held(db):
    core, catalog, engine = make(db)
    start(core, engine, K.parse_campaign(doc(condition="5 < Fast.A", rising_edge=False),
                                         catalog, engine.limits))
    for i, a in enumerate([1, 2, 3, 4, 5]):  # changes that cannot make it hold
        core.feed(0, 1 + i / 100, *frame(db, "Fast", A=a))
    assert engine.evaluations == 0
    core.feed(0, 2, *frame(db, "Fast", A=6))  # holds: evaluated, fires
    core.feed(0, 3, *frame(db, "Fast", A=7))  # holds again: evaluated (rising_edge false)
    core.feed(0, 4, *frame(db, "Fast", A=0))  # held before: evaluated, turns false
    core.feed(0, 5, *frame(db, "Fast", A=1))
    assert engine.evaluations == 3 and engine.running["c1"].firings == 2
    assert engine.groups["5 < Fast.A"].true is False


def test_stale_and_never_seen_inputs_are_false(db):
    core, catalog, engine = make(db)
    start(core, engine, K.parse_campaign(doc(condition="Fast.A > 5 and Slow.D == 1",
                                             rising_edge=False), catalog, engine.limits))
    core.feed(0, 1.0, *frame(db, "Fast", A=10))  # Slow.D never seen
    assert engine.running["c1"].firings == 0
    core.feed(0, 1.01, *frame(db, "Slow", D=1))
    assert engine.running["c1"].firings == 1
    engine.tick(7000)  # Fast.A is 6 s old: stale, the condition turns false
    assert engine.running["c1"].prev is False


def test_value_table_names_and_output_names(db):
    core, catalog, engine = make(db, telemetry=())
    d = doc(signals=("Fast.Mode",), condition='Fast.Mode == "CHARGING"')
    start(core, engine, K.parse_campaign(d, catalog, engine.limits))
    core.feed(0, 1.0, *frame(db, "Fast", Mode=1))
    core.feed(0, 1.01, *frame(db, "Fast", Mode=2))
    assert engine.running["c1"].firings == 1


def test_time_campaign_sends_the_latest_value_every_period(db):
    core, catalog, engine = make(db)
    d = doc(signals=("Fast.A", "Slow.C"), period_ms=200)
    start(core, engine, K.parse_campaign(d, catalog, engine.limits), now_ms=0)
    for i in range(100):
        t = i * 10
        core.feed(0, t / 1000, *frame(db, "Fast", A=i))
        if i % 10 == 0:
            core.feed(0, t / 1000, *frame(db, "Slow", C=i))
        engine.tick(t)
    engine.flush()
    (batch,) = engine.take_batches()
    assert [batch.t0 + dt for dt, _ in batch.sig["Fast.A"]] == [200, 400, 600, 800]
    assert [v for _, v in batch.sig["Fast.A"]] == [20, 40, 60, 80]
    assert [v for _, v in batch.sig["Slow.C"]] == [20.0, 40.0, 60.0, 80.0]
    assert batch.trigger is None and batch.payload("V", 1)["campaign"] == "c1"


def test_start_and_expiry(db):
    core, catalog, engine = make(db)
    d = doc(period_ms=100)
    d.update(start=1000, expiry=2000)
    c = K.parse_campaign(d, catalog, engine.limits)
    engine.apply(c, 0)
    assert engine.list(0) == [{"id": "c1", "version": 1, "state": "waiting"}]
    assert not engine.running and engine.tick(500) == []
    assert engine.tick(1000) == [] and "c1" in engine.running
    assert engine.list(1500)[0]["state"] == "active"
    assert engine.tick(2000) == ["c1"]
    assert engine.applied == {} and engine.running == {}


# -- run-time selection on the core ---------------------------------------------------------

def test_taps_select_messages_at_run_time(db):
    core, catalog, engine = make(db, telemetry=("Slow.D",))
    fast_id = db.get_message_by_name("Fast").frame_id
    slow_id = db.get_message_by_name("Slow").frame_id
    assert core.tapped(0) == [slow_id]
    core.feed(0, 1.0, *frame(db, "Fast", A=1))
    assert core.counters[0].unselected == 1
    start(core, engine, K.parse_campaign(doc(), catalog, engine.limits))
    assert sorted(core.tapped(0)) == sorted([slow_id, fast_id])
    core.feed(0, 1.1, *frame(db, "Fast", A=500))
    assert engine.running["c1"].firings == 1
    assert core.counters[0].unselected == 1  # decoded now
    core.feed(0, 1.2, *frame(db, "Slow", D=3))
    assert core.lookup("Slow.D")[0] == 3  # telemetry as before
    engine.remove("c1", 2000)
    core.set_taps(engine.taps(), engine.trim)
    assert core.tapped(0) == [slow_id]
    core.feed(0, 1.3, *frame(db, "Fast", A=2))
    assert core.counters[0].unselected == 2
    core.flush()
    assert all("Fast.A" not in b.sig for b in core.take_batches())  # never base telemetry


def test_many_random_campaigns_never_raise(db):
    core, catalog, engine = make(db)
    rnd = random.Random(5)
    for i in range(40):
        cond = rnd.choice(["Fast.A > {n}", "avg(Fast.A, {n}) < 300", "Slow.C * 2 > {n}",
                           "not Fast.B == {n} or max(Slow.C, 300) > 4"]).format(n=rnd.randint(1, 600))
        d = doc(f"r{i}", signals=("Fast.A", "Slow.C"))
        d["trigger"] = {"condition": cond, "pre_ms": rnd.randint(0, 300),
                        "post_ms": rnd.randint(0, 300), "rising_edge": rnd.random() < 0.5}
        engine.apply(K.parse_campaign(d, catalog, engine.limits), 0)
    core.set_taps(engine.taps(), engine.trim)
    for i in range(1500):
        t = i * 3
        core.feed(0, t / 1000, *frame(db, "Fast", A=rnd.randint(0, 700), B=rnd.randint(0, 9)))
        if i % 7 == 0:
            core.feed(0, t / 1000, *frame(db, "Slow", C=rnd.randint(0, 900)))
        if i % 30 == 0:
            engine.tick(t)
    assert engine.errors == 0 and core.internal_errors == 0
    assert sum(r.firings for r in engine.running.values()) > 0


# -- the generated code agrees with the reference evaluator --------------------------------

from agent.core import expr as E  # noqa: E402

_sig = st.sampled_from(["Fast.A", "Fast.B", "Slow.C"])


def _num(depth):
    leaf = st.one_of(st.integers(0, 300).map(lambda v: E.Node("num", (v,))),
                     _sig.map(lambda n: E.Node("sig", (n,))),
                     st.tuples(st.sampled_from(E.WINDOWS), _sig, st.integers(1, 300)).map(
                         lambda w: E.Node(w[0], (w[1], w[2]))))
    if depth == 0:
        return leaf
    sub = _num(depth - 1)
    return st.one_of(leaf, st.tuples(st.sampled_from("+-*/"), sub, sub).map(
        lambda t: E.Node(t[0], (t[1], t[2]))), sub.map(lambda x: E.Node("abs", (x,))))


def _cond(depth):
    cmp = st.tuples(st.sampled_from(list(E.CMP)), _num(2), _num(2)).map(
        lambda t: E.Node(t[0], (t[1], t[2])))
    if depth == 0:
        return cmp
    sub = _cond(depth - 1)
    return st.one_of(cmp, st.tuples(st.sampled_from(["and", "or"]), sub, sub).map(
        lambda t: E.Node(t[0], (t[1], t[2]))), sub.map(lambda x: E.Node("not", (x,))))


class _RefEnv:
    def __init__(self, engine, now):
        self.engine, self.now = engine, now

    def value(self, name):
        s = self.engine.sigs[name]
        if s.tap.last_t < 0 or self.now - s.tap.last_t > self.engine.stale_ms or s.value is None:
            raise E.Unknown(name)
        return s.value

    def window(self, fn, name, n):
        return self.engine.window(fn, name, n)

    def param(self, name):
        raise E.Unknown(name)


@BOTH
@settings(max_examples=150, deadline=None)
@given(_cond(2), st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255),
                                    st.integers(0, 300)), min_size=1, max_size=6),
       st.booleans())
def test_generated_conditions_agree_with_the_reference(db, sel, tree, steps, slow_seen):
    core, catalog, engine = make(db, telemetry=sel)
    text = E.to_text(tree)
    start(core, engine, K.parse_campaign(doc(signals=("Fast.A",), condition=text), catalog,
                                         engine.limits))
    t = 1000
    for a, b, c in steps:
        t += 7
        core.feed(0, t / 1000, *frame(db, "Fast", A=a, B=b))
        if slow_seen:
            core.feed(0, t / 1000, *frame(db, "Slow", C=c))
    for now in (t, t + 200, t + 6000):  # fresh, windows partly empty, everything stale
        engine._now = now
        want = E.holds(E.compile_condition(tree), _RefEnv(engine, now))
        assert engine.groups[text].fn(now) is want, (text, now)


@BOTH
@settings(max_examples=150, deadline=None)
@given(_cond(2), st.lists(st.tuples(st.integers(1, 120), st.integers(0, 300),
                                    st.integers(0, 255), st.integers(0, 300),
                                    st.booleans()), min_size=1, max_size=40))
def test_ticks_that_skip_conditions_by_their_bounds_agree_with_the_reference(db, sel, tree, steps):
    """A false windowed condition is not evaluated at a tick while the bounds of its
    windows' signals rule it out: after every tick each condition is what the reference
    evaluator makes of it then."""
    assume(E.value_signals(tree) or E.windows(tree))  # (constants are never evaluated)
    core, catalog, engine = make(db, telemetry=sel, assumed_period_ms=1)
    text = E.to_text(tree)
    start(core, engine, K.parse_campaign(doc(signals=("Fast.A",), condition=text), catalog,
                                         engine.limits))
    group = engine.groups[text]
    t = 1000
    for dt, a, b, c, slow in steps:
        t += dt
        core.feed(0, t / 1000, *frame(db, "Fast", A=a, B=b))
        if slow:
            core.feed(0, t / 1000, *frame(db, "Slow", C=c))
        for now in (t, t + 60):  # at the frame, and later: windows age
            engine.tick(now)
            want = E.holds(E.compile_condition(tree), _RefEnv(engine, now))
            assert group.true is want, (text, now)


# -- the lazy paths: rings filled by the core, windows read in runs, the capture hook -------

@BOTH
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), st.sampled_from([0, 7, 7, 7, 300, 1000]),
                          st.integers(0, 3), st.booleans(),
                          st.sampled_from([0, 0, 0, 1, 20, 450])), min_size=1, max_size=150),
       st.sampled_from(["avg", "min", "max"]), st.integers(1, 400))
def test_windows_read_lazily_match_brute_force(db, sel, steps, fn, n):
    """Repeated frames, frames where only other bits change (B), several frames between two
    queries (taken as runs at once; more than the ring holds: its newest cover the window):
    the same as the reference over every arrival."""
    core, catalog, engine = make(db, telemetry=sel, assumed_period_ms=1)  # 1 ms frames
    c = K.parse_campaign(doc(condition=f"{fn}(Fast.A, {n}) > 1000"), catalog,
                         engine.limits)  # (A is read by the window only)
    start(core, engine, c)
    seen = []
    t = 0
    for dt, value, other, query, later in steps:
        t += dt
        core.feed(0, t / 1000, *frame(db, "Fast", A=value, B=other))
        seen.append((int(t / 1000 * 1000), value))  # the ms the engine reads off t seconds
        if query:
            t += later  # (a look later than the last frame: samples may have aged out)
            engine._now = t
            inside = [v for ts, v in seen if t - n <= ts <= t]
            if not inside:
                with pytest.raises(E.Unknown):
                    engine.window(fn, "Fast.A", n)
                continue
            want = {"avg": lambda x: sum(x) / len(x), "min": min, "max": max}[fn](inside)
            assert engine.window(fn, "Fast.A", n) == pytest.approx(want)


def test_avg_of_one_repeated_value_is_that_value(db):
    """A running sum would drift (355.1 added and taken away again): one value is exact, so
    `avg(x) > max(x)` never holds."""
    core, catalog, engine = make(db)
    c = K.parse_campaign(doc(signals=("Slow.C",), condition="avg(Slow.C, 300) > 355.5"),
                         catalog, engine.limits)
    start(core, engine, c)
    for i in range(400):
        t = 1000 + i * 10
        core.feed(0, t / 1000, *frame(db, "Slow", C=355.5 if i < 200 else 10, D=i % 7))
        if i % 10 == 0:
            engine.tick(t)
        if i == 150:
            engine._now = t
            assert engine.window("avg", "Slow.C", 300) == 355.5
    assert engine.running["c1"].firings == 0


def test_rings_take_repeated_frames_and_windows_see_the_gap(db):
    core, catalog, engine = make(db)
    d = doc(signals=("Fast.A",))
    d["trigger"] = {"condition": "max(Fast.A, 50) > 100 or max(Fast.A, 2000) > 5000",
                    "pre_ms": 100}
    start(core, engine, K.parse_campaign(d, catalog, engine.limits))
    tap = engine.tapmap[(0, db.get_message_by_name("Fast").frame_id)]
    assert tap.cap == 201  # the 2 s window at 10 ms (> pre_ms 100)
    can_id, data = frame(db, "Fast", A=5)
    for i in range(5):
        core.feed(0, 1 + i / 100, can_id, data)  # the same frame: every one in the ring
    assert [f[1] for f in tap.ring] == [1 + i / 100 for i in range(5)]
    engine.tick(1040)
    assert engine.window("max", "Fast.A", 50) == 5 and engine.window_gaps == 0
    sent = []
    for i in range(1500):  # 1 ms apart, ten times faster than sized: more than the ring holds
        t = (1050 + i) / 1000
        core.feed(0, t, *frame(db, "Fast", A=2000 - i))
        sent.append((int(t * 1000), 2000 - i))
        assert len(tap.ring) <= tap.limit
    now = engine._now = sent[-1][0]
    # the 50 ms window: in the ring, exact
    assert engine.window("max", "Fast.A", 50) == max(a for t, a in sent if t >= now - 50)
    # the 2 s window holds the ring's newest 201 frames or more, and the trims that cut
    # it are counted
    assert len(tap.ring) >= 201
    assert engine.window("max", "Fast.A", 2000) == max(a for _t, a in sent[-len(tap.ring):])
    assert engine.window_gaps > 0
    w = engine.wsigs["Fast.A"]  # a new value every frame: a run each, bounded all the same
    assert len(w.starts) == len(w.values) <= max(64, 2 * tap.limit) + 1


@BOTH
def test_a_frame_longer_than_its_dbc_length_is_no_sample_of_a_window(db, sel):
    core, catalog, engine = make(db, telemetry=sel)
    start(core, engine, K.parse_campaign(doc(condition="avg(Fast.A, 1000) > 500"), catalog,
                                         engine.limits))
    core.feed(0, 1.00, *frame(db, "Fast", A=10))
    can_id, data = frame(db, "Fast", A=900)
    core.feed(0, 1.01, can_id, data + b"\x00")  # 9 bytes: the core counts it, cantools decodes
    core.feed(0, 1.02, *frame(db, "Fast", A=20))
    core.feed(0, 1.03, *frame(db, "Fast", A=20))
    engine._now = 1030
    assert engine.window("avg", "Fast.A", 1000) == pytest.approx((10 + 20 + 20) / 3)
    assert engine.errors == 0 and core.internal_errors == 0


def test_post_trigger_frames_are_taken_from_the_ring_at_ticks(db):
    core, catalog, engine = make(db)
    d = doc(signals=("Fast.A", "Fast.B"))
    d["trigger"] = {"condition": "Fast.A > 100", "pre_ms": 30, "post_ms": 50}
    start(core, engine, K.parse_campaign(d, catalog, engine.limits))
    tap = engine.tapmap[(0, db.get_message_by_name("Fast").frame_id)]
    quiet = frame(db, "Fast", A=1, B=2)
    for i in range(10):
        core.feed(0, 1 + i / 100, *quiet)
    assert tap.hold is None and tap.cap == 4 and len(tap.ring) <= tap.limit
    core.feed(0, 1.1, *frame(db, "Fast", A=200, B=3))
    assert tap.hold is not None  # the ring keeps what the capture has yet to take
    for i in range(1, 21):  # repeated frames after the trigger, no tick: each is a sample
        core.feed(0, 1.1 + i / 100, *quiet)
    assert len(tap.ring) > tap.limit  # (all kept for the capture)
    engine.tick(1300)
    assert tap.hold is None and "c1" not in engine._capturing
    core.feed(0, 1.31, *quiet)
    assert len(tap.ring) == tap.cap
    pre, *post = engine.take_batches()
    assert [pre.t0 + dt for dt, _ in pre.sig["Fast.A"]] == [1070, 1080, 1090, 1100]
    times = [p.t0 + dt for p in post for dt, _ in p.sig["Fast.B"]]
    assert times == [1110, 1120, 1130, 1140, 1150]  # through trigger + post_ms
    assert [v for p in post for _, v in p.sig["Fast.B"]] == [2] * 5


def test_windowed_conditions_are_evaluated_at_ticks_only_when_their_windows_move(db):
    core, catalog, engine = make(db)
    start(core, engine, K.parse_campaign(doc(condition="avg(Fast.A, 100) > 50"), catalog,
                                         engine.limits))
    for i in range(10):  # 0 for 50 ms, then 100: avg 50 at 1090, not above
        core.feed(0, 1 + i / 100, *frame(db, "Fast", A=0 if i < 5 else 100, B=i))
    engine.tick(1090)
    assert engine.running["c1"].firings == 0
    n = engine.evaluations
    engine.tick(1095)  # nothing arrived or aged out: the same value, not evaluated again
    assert engine.evaluations == n
    engine.tick(1120)  # the zeros of 1000 and 1010 aged out: 500 / 8 > 50, fired by time alone
    assert engine.running["c1"].firings == 1 and engine.evaluations == n + 1
    engine.tick(1400)  # everything aged out: no sample, false (evaluated once more)
    engine.tick(1500)
    engine.tick(1600)
    assert engine.running["c1"].prev is False and engine.evaluations == n + 3


def test_a_new_campaign_reads_a_message_that_only_repeats(db):
    """The core calls the tap for changed frames only: installing it must not wait for a
    change of a [telemetry] message that keeps repeating."""
    core, catalog, engine = make(db, telemetry=("Fast.A",))
    can_id, data = frame(db, "Fast", A=150)
    for i in range(5):
        core.feed(0, 1 + i / 100, can_id, data)
    start(core, engine, K.parse_campaign(doc(), catalog, engine.limits), now_ms=1050)
    core.feed(0, 1.06, can_id, data)
    assert engine.running["c1"].firings == 1
    core.flush()
    assert [v for b in core.take_batches() for _, v in b.sig.get("Fast.A", [])] == [150]


def test_an_after_feed_hook_that_raises_is_counted_once_and_the_feed_returns(db):
    core, catalog, engine = make(db)
    start(core, engine, K.parse_campaign(doc(), catalog, engine.limits))
    calls = []

    def broken() -> None:
        calls.append(1)
        raise RuntimeError("trim failed")

    core.set_taps(engine.taps(), broken)
    core.feed_many([(0, 1.0, *frame(db, "Fast", A=150)), (0, 1.01, *frame(db, "Fast", A=1))])
    assert calls == [1] and core.internal_errors == 1
    assert "trim failed" in core.last_internal_error
    assert engine.running["c1"].firings == 1  # the frames were taken all the same
