"""core/updates.py (pure) and adapters/updatestate.py (the record on disk)."""

from __future__ import annotations

import subprocess
from dataclasses import replace
import sys
import time

import pytest

from agent.adapters.updatestate import UpdateStateStore
from agent.core import updates as u
from agent.core import updatemachine as um
from agent.core.protocol import (
    BUSY,
    CANCELLED,
    DOWNLOAD_FAILED,
    FAILED,
    IN_PROGRESS,
    INSTALL_FAILED,
    PRECONDITION_FAILED,
    SUCCEEDED,
    SUPERSEDED,
    VERIFICATION_FAILED,
    is_newer,
    parse_version,
)
from agent.errors import StorageError

T0 = 1_700_000_000_000


# -- versions ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, parsed", [("1", (1,)), ("1.2.3", (1, 2, 3)),
                                          ("1.10", (1, 10)), ("1.2.0", (1, 2)),
                                          ("0.0.0", (0,)), ("007.1", (7, 1))])
def test_parse_version(text, parsed):
    assert parse_version(text) == parsed


@pytest.mark.parametrize("bad", ["", "1.", ".1", "1..2", "1.2-rc1", "v1.2", " 1.2", "1.2 ",
                                 "+1", "-1", "1_0", "１.２", "1.x", None, 12, 1.2, "9" * 65])
def test_parse_version_rejects(bad):
    with pytest.raises(u.UpdateError) as info:
        parse_version(bad)
    assert info.value.reason == VERIFICATION_FAILED


@pytest.mark.parametrize("a, b, newer", [("1.10", "1.9", True), ("1.9", "1.10", False),
                                         ("2", "1.99.99", True), ("1.2.0", "1.2", False),
                                         ("1.2.1", "1.2", True), ("1.2", "1.2", False)])
def test_is_newer_is_numeric(a, b, newer):
    assert is_newer(a, b) is newer


def test_accept_target():
    custom = {"hardware_id": "hw-1", "version": "1.5.0"}
    assert u.accept_target("fw", custom, "hw-1", "1.4.9") == "1.5.0"
    for custom, installed, words in [
        ({"hardware_id": "hw-2", "version": "1.5.0"}, "1.0", "hw-2"),
        ({"version": "1.5.0"}, "1.0", "hardware"),
        ({"hardware_id": "hw-1", "version": "1.4.0"}, "1.5.0", "not newer"),
        ({"hardware_id": "hw-1", "version": "1.5.0"}, "1.5.0", "not newer"),
        ({"hardware_id": "hw-1", "version": "1.5.0-beta"}, "1.0", "dotted"),
        ({"hardware_id": "hw-1"}, "1.0", "None"),
        (None, "1.0", "no custom"),
        (["hw-1", "1.5.0"], "1.0", "no custom"),
    ]:
        with pytest.raises(u.UpdateError) as info:
            u.accept_target("fw", custom, "hw-1", installed)
        assert info.value.reason == VERIFICATION_FAILED
        assert words in info.value.detail, (custom, info.value.detail)


# -- the state machine ------------------------------------------------------------------

LEGAL_PATH = [(u.STAGE, u.DOWNLOADING), (u.DOWNLOADED, u.VERIFYING), (u.VERIFIED, u.STAGED),
              (u.ACTIVATE, u.ACTIVATING), (u.SWITCHED, u.CONFIRMING),
              (u.CONFIRMED, u.COMMITTED), (u.STAGE, u.DOWNLOADING)]
EVENTS = [u.STAGE, u.DOWNLOADED, u.VERIFIED, u.FAIL, u.CANCEL, u.ACTIVATE, u.SWITCHED,
          u.CONFIRMED, u.ROLL_BACK]


def test_happy_path():
    s = u.UpdateState()
    for event, expected in LEGAL_PATH:
        s = u.transition(s, event)
        assert s.state == expected


@pytest.mark.parametrize("state", sorted(u.STATES))
@pytest.mark.parametrize("event", EVENTS)
def test_every_pair_is_legal_or_raises(state, event):
    s = u.UpdateState(state=state)
    legal = event in u.TRANSITIONS[state]
    if legal:
        assert u.transition(s, event).state == u.TRANSITIONS[state][event]
    else:
        with pytest.raises(u.IllegalTransition) as info:
            u.transition(s, event)
        assert info.value.state == state and info.value.event == event
        assert s.state == state  # frozen: nothing changed


def test_illegal_examples():
    for state, event in [(u.IDLE, u.ACTIVATE), (u.IDLE, u.CANCEL), (u.DOWNLOADING, u.ACTIVATE),
                         (u.ACTIVATING, u.CANCEL), (u.CONFIRMING, u.CANCEL),
                         (u.COMMITTED, u.ROLL_BACK), (u.STAGED, u.CONFIRMED)]:
        with pytest.raises(u.IllegalTransition):
            u.transition(u.UpdateState(state=state), event)


def test_cancel_allowed_up_to_staged_only():
    allowed = {s for s in u.STATES if u.UpdateState(state=s).cancellable}
    assert allowed == {u.DOWNLOADING, u.VERIFYING, u.STAGED}


def test_stage_while_downloading_supersedes_the_command_in_flight():
    s, reports = u.stage(u.UpdateState(), "c1", "fw-a", T0)
    assert (s.state, s.command_id, s.target, s.started_ms, reports) == \
        (u.DOWNLOADING, "c1", "fw-a", T0, [])
    s2, reports = u.stage(s, "c2", "fw-b", T0 + 5)
    assert (s2.state, s2.command_id, s2.target) == (u.DOWNLOADING, "c2", "fw-b")
    assert reports == [u.Report(command_id="c1", status=FAILED, reason=SUPERSEDED,
                                detail="superseded by command c2")]


def test_stage_while_staged_supersedes_quietly_and_busy_while_activating():
    staged = u.UpdateState(state=u.STAGED, command_id="c1", target="fw-a", version="1.2",
                           sha256="ab", slot="b", started_ms=T0)
    s, reports = u.stage(staged, "c2", "fw-b", T0 + 1)
    assert s.state == u.DOWNLOADING and s.slot is None and s.version is None and reports == []
    for state in (u.ACTIVATING, u.CONFIRMING):
        with pytest.raises(u.UpdateError) as info:
            u.stage(u.UpdateState(state=state, command_id="c3"), "c4", "fw", T0)
        assert info.value.reason == BUSY


def test_cancel_reports():
    s, _ = u.stage(u.UpdateState(), "c1", "fw", T0)
    s, reports = u.cancel(s, "k1")
    assert s.state == u.IDLE and s.final_status == SUCCEEDED and s.command_id == "k1"
    assert reports == [u.Report(command_id="c1", status=FAILED, reason=CANCELLED,
                                detail="cancelled by command k1"),
                       u.Report(command_id="k1", status=SUCCEEDED)]
    with pytest.raises(u.UpdateError) as info:
        u.cancel(s, "k2")  # nothing to cancel
    assert info.value.reason == PRECONDITION_FAILED


def test_fail_and_activate_checks():
    s, _ = u.stage(u.UpdateState(), "c1", "fw", T0)
    failed, reports = u.fail(s, DOWNLOAD_FAILED, "server gone")
    assert failed.state == u.FAILED_STATE and reports == [
        u.Report(command_id="c1", status=FAILED, reason=DOWNLOAD_FAILED, detail="server gone")]
    with pytest.raises(u.UpdateError) as info:
        u.check_activate(s, "fw")
    assert info.value.reason == PRECONDITION_FAILED
    staged = u.UpdateState(state=u.STAGED, target="fw")
    u.check_activate(staged, "fw")
    with pytest.raises(u.UpdateError):
        u.check_activate(staged, "other")


def test_record_validates_itself():
    with pytest.raises(ValueError):
        u.UpdateState(state="PARTY")
    with pytest.raises(ValueError):
        u.UpdateState(started_ms=-1)
    with pytest.raises(ValueError):
        u.UpdateState(slot=1)
    with pytest.raises(TypeError):
        u.UpdateState(u.IDLE)  # keyword-only


def test_json_round_trip_and_rejects():
    s = u.UpdateState(state=u.STAGED, command_id="c1", target="fw", version="1.2.3",
                      sha256="00" * 32, slot="b", started_ms=T0, detail="ok")
    assert u.UpdateState.from_json(s.to_json()) == s
    for bad in [b"", b"[]", b"{\"state\": \"NOPE\"}", b"{\"extra\": 1}", b"\xff",
                b"{\"state\": \"IDLE\", \"started_ms\": \"1\"}"]:
        with pytest.raises(ValueError):
            u.UpdateState.from_json(bad)


# -- restart rule -----------------------------------------------------------------------

def rec(state, **kw):
    return u.UpdateState(state=state, command_id="c1", target="fw", version="1.5",
                         sha256="ab", slot="b", started_ms=T0, **kw)


NO_PENDING = {"active": "a", "pending": None}
PENDING_B = {"active": "b", "pending": {"slot": "b", "previous": "a", "boots": 1}}


def test_restart_nothing_or_idle():
    assert u.on_restart(None, NO_PENDING, T0) == [u.Discard(what="downloads")]
    assert u.on_restart(u.UpdateState(), NO_PENDING, T0) == [u.Discard(what="downloads")]


def test_restart_resumes_a_recent_download_and_fails_an_old_one():
    s = rec(u.DOWNLOADING)
    assert u.on_restart(s, NO_PENDING, T0 + 1000) == [
        u.ResumeStage(state=s),
        u.Report(command_id="c1", status=IN_PROGRESS, detail="resuming after a restart")]
    actions = u.on_restart(s, NO_PENDING, T0 + 10**9, max_resume_age_ms=10**6)
    saved = actions[0].state
    assert saved.state == u.FAILED_STATE and saved.reason == DOWNLOAD_FAILED
    assert actions[1] == u.Discard(what="downloads")
    assert actions[2].command_id == "c1" and actions[2].reason == DOWNLOAD_FAILED


def test_restart_staged_rereports_success():
    assert u.on_restart(rec(u.STAGED), NO_PENDING, T0) == [u.Report(
        command_id="c1", status=SUCCEEDED,
        result={"target": "fw", "version": "1.5", "sha256": "ab"})]


def test_restart_activating_before_and_after_the_switch():
    before = u.on_restart(rec(u.ACTIVATING), NO_PENDING, T0)
    assert before[0].state.state == u.FAILED_STATE
    assert before[-1].status == FAILED and before[-1].reason == INSTALL_FAILED
    half = u.on_restart(rec(u.ACTIVATING), {"active": "a", "pending": {
        "slot": "b", "previous": "a", "boots": 0}}, T0)
    assert u.RollBackSlot() in half  # marker written, pointer not moved: drop the marker
    after = u.on_restart(rec(u.ACTIVATING), PENDING_B, T0)
    assert after[0].state.state == u.CONFIRMING and isinstance(after[1], u.Confirm)


def test_restart_confirming():
    ok = u.on_restart(rec(u.CONFIRMING), PENDING_B, T0)
    assert isinstance(ok[0], u.Confirm)
    crashing = {"active": "b", "pending": {"slot": "b", "previous": "a", "boots": 4}}
    for slots in (crashing, NO_PENDING):  # keeps crashing / bootloader already fell back
        actions = u.on_restart(rec(u.CONFIRMING), slots, T0, max_boot_attempts=3)
        saved = next(a for a in actions if isinstance(a, u.Save)).state
        assert saved.state == u.ROLLED_BACK
        assert (u.RollBackSlot() in actions) == (slots is crashing)
        assert actions[-1].status == FAILED and actions[-1].reason == INSTALL_FAILED


def test_restart_final_states_rereport():
    assert u.on_restart(rec(u.COMMITTED), NO_PENDING, T0) == [
        u.Discard(what="downloads"),
        u.Report(command_id="c1", status=SUCCEEDED, result={"target": "fw", "version": "1.5"})]
    failed = rec(u.FAILED_STATE, reason=DOWNLOAD_FAILED, detail="x")
    assert u.on_restart(failed, NO_PENDING, T0)[-1] == u.Report(
        command_id="c1", status=FAILED, reason=DOWNLOAD_FAILED, detail="x")


# -- persistence ------------------------------------------------------------------------

def test_store_round_trip(tmp_path):
    store = UpdateStateStore(tmp_path / "state")
    assert store.load() is None
    s = rec(u.STAGED)
    store.save(s)
    assert UpdateStateStore(tmp_path / "state").load() == s
    assert (store.path.stat().st_mode & 0o777) == 0o600


def test_store_ignores_and_cleans_a_torn_temp_file(tmp_path):
    store = UpdateStateStore(tmp_path)
    store.save(rec(u.DOWNLOADING))
    torn = tmp_path / ".update-state.json.deadbeef0000.tmp"
    torn.write_bytes(rec(u.STAGED).to_json()[:17])  # what a crash mid-write leaves
    assert store.load() == rec(u.DOWNLOADING)
    store.save(rec(u.STAGED))
    assert not torn.exists() and store.load() == rec(u.STAGED)


def test_store_reports_outside_damage(tmp_path):
    store = UpdateStateStore(tmp_path)
    store.path.write_bytes(b'{"state": "STAG')
    with pytest.raises(StorageError, match="update-state.json"):
        store.load()


WRITER = """
import sys
from pathlib import Path
from agent.adapters.updatestate import UpdateStateStore
from agent.core.updates import UpdateState
store = UpdateStateStore(Path(sys.argv[1]))
i = 0
while True:
    i += 1
    store.save(UpdateState(state="DOWNLOADING", command_id=f"c{i}", detail="x" * (i % 5000),
                           started_ms=i))
    if i == 3:
        print("go", flush=True)
"""


def test_store_survives_being_killed_mid_write(tmp_path):
    """SIGKILL a process that saves in a tight loop: the record is always a whole one."""
    for attempt in range(5):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)],
                                stdout=subprocess.PIPE, cwd=str(__import__("pathlib").Path(
                                    __file__).resolve().parent.parent))
        assert proc.stdout.readline() == b"go\n"
        time.sleep(0.05 + attempt * 0.03)
        proc.kill()
        proc.wait()
        proc.stdout.close()
        got = UpdateStateStore(tmp_path).load()
        assert got.state == u.DOWNLOADING and got.command_id == f"c{got.started_ms}"
        assert got.detail == "x" * (got.started_ms % 5000)


def test_installed_version_is_the_committed_one_then_the_configured_one():
    assert u.installed_version(None, "1.0") == "1.0"
    assert u.installed_version(u.UpdateState(), "1.0") == "1.0"
    committed = u.UpdateState(state=u.COMMITTED, version="2.0", installed="2.0")
    assert u.installed_version(committed, "1.0") == "2.0"
    # a later stage keeps the committed version as the anti-rollback floor
    staged, _ = u.stage(committed, "c2", "fw", T0, "http://r/")
    assert staged.installed == "2.0" and staged.repository == "http://r/"


@pytest.mark.parametrize("url, ok", [
    ("https://updates.example.com/fleet", True),
    ("https://updates.example.com/fleet/", True),
    ("https://updates.example.com/fleet/eu", True),
    ("https://updates.example.com/fleetX", False),  # a prefix must end at a path boundary
    ("https://updates.example.com.evil.net/fleet", False),
    ("http://updates.example.com/fleet", False),
])
def test_check_repository(url, ok):
    allowed = ("https://updates.example.com/fleet/",)
    if ok:
        u.check_repository(url, allowed)
    else:
        with pytest.raises(u.UpdateError) as info:
            u.check_repository(url, allowed)
        assert info.value.reason == "BAD_PARAMS"


def test_restart_confirming_after_mark_good_commits():
    # killed between mark_good (marker removed) and saving COMMITTED
    actions = u.on_restart(rec(u.CONFIRMING), {"active": "b", "pending": None}, T0)
    assert actions[0].state.state == u.COMMITTED and actions[0].state.installed == "1.5"
    assert actions[-1] == u.Report(command_id="c1", status=SUCCEEDED,
                                   result={"target": "fw", "version": "1.5"})


@pytest.mark.parametrize("found", [None, u.UpdateState(), rec(u.FAILED_STATE),
                                   rec(u.ROLLED_BACK)])
def test_restart_orphan_trial_slot_is_rolled_back(found):
    actions = u.on_restart(found, PENDING_B, T0)
    assert actions[0] == u.RollBackSlot()
    assert u.on_restart(found, NO_PENDING, T0).count(u.RollBackSlot()) == 0


def test_a_terminal_status_is_resent_only_if_it_never_went_out():
    for found in (rec(u.STAGED, final_status=SUCCEEDED), rec(u.COMMITTED, final_status=SUCCEEDED),
                  rec(u.FAILED_STATE, final_status="REJECTED", reason="VERIFICATION_FAILED"),
                  rec(u.ROLLED_BACK, final_status=FAILED, reason=INSTALL_FAILED)):
        again = [a for a in u.on_restart(found, NO_PENDING, T0) if isinstance(a, u.Report)]
        assert [(r.command_id, r.status) for r in again] == [("c1", found.final_status)]
        sent = replace(found, reported=True)
        assert not [a for a in u.on_restart(sent, NO_PENDING, T0) if isinstance(a, u.Report)]
    # a refused target stays REJECTED across a restart, not FAILED
    refused, reports = u.fail(rec(u.DOWNLOADING), "VERIFICATION_FAILED", "older", "REJECTED")
    assert reports[0].status == "REJECTED"
    assert u.final_report(refused).status == "REJECTED"


def test_abort_returns_an_activation_to_staged():
    s = u.transition(rec(u.STAGED), u.ACTIVATE)
    assert u.transition(s, u.ABORT).state == u.STAGED


# -- the live machine: on_command / on_event / poll / start (pure) ------------------------

def policy(**kw):
    from agent.core.conditions import parse_condition

    base = dict(hardware_id="hw", installed_version="1.0",
                allowed_repositories=("http://r/",),
                preconditions=(parse_condition("VCU_Drive.Gear == 0", "p"),), stale_ms=2000,
                health_timeout_s=5.0, max_boot_attempts=3, max_resume_age_ms=10**6)
    base.update(kw)
    return um.Policy(**base)


def machine(record=None, **kw):
    return um.Machine(record=record or u.UpdateState(), policy=policy(), **kw)


def vehicle(gear, t=T0):
    return lambda name: (gear, t) if name == "VCU_Drive.Gear" else None


PARKED, DRIVING = vehicle(0), vehicle(3)
NO_SLOTS = {"active": "a", "pending": None, "slots": {"a": None, "b": None}}


def ev(m, event):
    return u.UpdateEvent(gen=m.gen, event=event)


def staged_rec(**kw):
    return rec(u.STAGED, final_status=SUCCEEDED, reported=True, **kw)


def test_on_command_stage_from_idle():
    m, actions = um.on_command(machine(), u.Stage(command_id="c1", target="fw",
                                                 repository="http://r/x"), T0,
                              lookup=PARKED, slots=NO_SLOTS)
    new = m.record
    assert (new.state, new.command_id, new.target, new.repository, new.started_ms) == \
        (u.DOWNLOADING, "c1", "fw", "http://r/x", T0)
    assert m.gen == 1 and m.progress_step == -1
    assert actions == [u.Save(state=new), u.Report(command_id="c1", status="ACCEPTED"),
                       u.StartDownload(gen=1, state=new, hardware_id="hw", floor="1.0")]


def test_on_command_stage_supersedes_and_discards():
    downloading = machine(rec(u.DOWNLOADING), gen=4)
    m, actions = um.on_command(downloading, u.Stage(command_id="c2", target="fw2",
                                                   repository="http://r/"), T0,
                              lookup=PARKED, slots=NO_SLOTS)
    assert m.gen == 5 and m.record.command_id == "c2"
    assert actions[:4] == [u.Save(state=m.record),
                           u.Report(command_id="c1", status=FAILED, reason=SUPERSEDED,
                                    detail="superseded by command c2"),
                           u.Abort(), u.Discard(what="inactive")]
    assert actions[4:] == [u.Report(command_id="c2", status="ACCEPTED"),
                           u.StartDownload(gen=5, state=m.record, hardware_id="hw",
                                           floor="1.0")]
    # while STAGED: the staged artifact is discarded, its SUCCEEDED stage is not re-reported
    m, actions = um.on_command(machine(staged_rec()), u.Stage(
        command_id="c2", target="fw", repository="http://r/"), T0, lookup=PARKED, slots=None)
    assert [type(a) for a in actions] == [u.Save, u.Abort, u.Discard, u.Report,
                                          u.StartDownload]


def test_on_command_stage_refusals_change_nothing():
    for m0, repo, reason in [(machine(), "http://evil/", "BAD_PARAMS"),
                             (machine(rec(u.ACTIVATING)), "http://r/", BUSY),
                             (machine(rec(u.CONFIRMING)), "http://r/", BUSY)]:
        m, actions = um.on_command(m0, u.Stage(command_id="c9", target="fw", repository=repo),
                                  T0, lookup=PARKED, slots=NO_SLOTS)
        assert m is m0
        assert [(a.command_id, a.status, a.reason) for a in actions] == [
            ("c9", "REJECTED", reason)]


def test_on_command_stage_floor_reads_the_active_slot():
    slots = {"active": "b", "pending": None, "slots": {"b": {"version": "2.5"}}}
    _, actions = um.on_command(machine(), u.Stage(command_id="c1", target="fw",
                                                 repository="http://r/"), T0,
                              lookup=PARKED, slots=slots)
    assert actions[-1].floor == "2.5"
    # a pending (unconfirmed) slot's version is not the floor
    _, actions = um.on_command(machine(), u.Stage(command_id="c1", target="fw",
                                                 repository="http://r/"), T0, lookup=PARKED,
                              slots={**slots, "pending": {"slot": "b"}})
    assert actions[-1].floor == "1.0"


def test_floor():
    assert um.floor(None, "1.0", None) == "1.0"
    assert um.floor(u.UpdateState(installed="2.0"), "1.0", NO_SLOTS) == "2.0"
    meta = {"active": "a", "pending": None, "slots": {"a": {"version": "3.1"}}}
    assert um.floor(u.UpdateState(installed="2.0"), "1.0", meta) == "3.1"
    for broken in ({"active": "a", "slots": {"a": {"version": "x"}}}, {"slots": {}},
                   {"active": "a", "slots": {"a": "nope"}}):
        assert um.floor(None, "1.0", broken) == "1.0"


def test_on_command_activate():
    m0 = machine(staged_rec(), gen=2)
    m, actions = um.on_command(m0, u.Activate(command_id="a1", target="fw"), T0,
                              lookup=PARKED, slots=NO_SLOTS)
    new = m.record
    assert (new.state, new.command_id, new.started_ms, new.final_status, new.reported) == \
        (u.ACTIVATING, "a1", T0, None, False)
    assert m.gen == 3
    assert actions == [u.Save(state=new), u.Verify(gen=3, slot="b"),
                       u.Report(command_id="a1", status="ACCEPTED"),
                       u.Report(command_id="a1", status=IN_PROGRESS,
                                detail="checking the staged artifact again")]
    for m1, look, target in [(m0, DRIVING, "fw"), (m0, PARKED, "other"),
                             (machine(rec(u.DOWNLOADING)), PARKED, "fw"),
                             (m0, vehicle(0, T0 - 10_000), "fw")]:  # stale signal: not safe
        m, actions = um.on_command(m1, u.Activate(command_id="a2", target=target), T0,
                                  lookup=look, slots=NO_SLOTS)
        assert m is m1
        assert [(a.status, a.reason) for a in actions] == [("REJECTED", PRECONDITION_FAILED)]


def test_on_command_cancel():
    m, actions = um.on_command(machine(rec(u.DOWNLOADING), gen=1), u.Cancel(command_id="k1"),
                              T0, lookup=PARKED, slots=NO_SLOTS)
    assert m.record.state == u.IDLE and m.gen == 2
    assert actions == [u.Save(state=m.record), u.Abort(), u.Discard(what="inactive"),
                       u.Report(command_id="k1", status="ACCEPTED"),
                       u.Report(command_id="c1", status=FAILED, reason=CANCELLED,
                                detail="cancelled by command k1"),
                       u.Report(command_id="k1", status=SUCCEEDED)]
    m2, actions = um.on_command(m, u.Cancel(command_id="k2"), T0, lookup=PARKED, slots=None)
    assert m2 is m and [(a.status, a.reason) for a in actions] == [
        ("REJECTED", PRECONDITION_FAILED)]


def test_parse_command():
    assert u.parse_command("update.stage", "c", {"target": "t", "repository": "r"}) == \
        u.Stage(command_id="c", target="t", repository="r")
    assert u.parse_command("update.activate", "c", {"target": "t"}) == \
        u.Activate(command_id="c", target="t")
    assert u.parse_command("update.cancel", "c", {}) == u.Cancel(command_id="c")
    assert u.parse_command("update.other", "c", {}) is None


def test_events_of_another_generation_are_ignored():
    m = machine(rec(u.DOWNLOADING), gen=3)
    for event in (u.DownloadProgress(pct=50), u.Failed(reason=DOWNLOAD_FAILED, detail="x")):
        assert um.on_event(m, u.UpdateEvent(gen=2, event=event), T0) == (m, [])


def test_progress_is_reported_every_ten_percent():
    m = machine(rec(u.DOWNLOADING), gen=1)
    sent = []
    for pct in (0, 3, 9, 10, 15, 42, 99, 100):
        m, actions = um.on_event(m, ev(m, u.DownloadProgress(pct=pct)), T0)
        sent += [(a.progress, a.detail) for a in actions]
    assert sent == [(0, "downloading"), (10, "downloading"), (42, "downloading"),
                    (99, "downloading"), (100, "downloading")]
    # a late progress after the download is over changes nothing
    late = machine(rec(u.VERIFYING), gen=1)
    assert um.on_event(late, ev(late, u.DownloadProgress(pct=50)), T0) == (late, [])


def test_downloaded_then_installed():
    m = machine(rec(u.DOWNLOADING, ), gen=1)
    done = u.Downloaded(path="/d/fw", name="fw", sha256="cd" * 32, version="2.0")
    m, actions = um.on_event(m, ev(m, done), T0)
    assert (m.record.state, m.record.version, m.record.sha256) == (u.VERIFYING, "2.0", "cd" * 32)
    assert actions == [u.Save(state=m.record),
                       u.Report(command_id="c1", status=IN_PROGRESS,
                                detail="verified; installing into the inactive slot",
                                progress=100),
                       u.Install(gen=1, path="/d/fw", meta={"target": "fw", "version": "2.0",
                                                             "sha256": "cd" * 32})]
    m, actions = um.on_event(m, ev(m, u.Installed(slot="b")), T0)
    assert (m.record.state, m.record.slot, m.record.final_status, m.record.reported) == \
        (u.STAGED, "b", SUCCEEDED, False)
    assert actions == [u.Save(state=m.record), u.Report(
        command_id="c1", status=SUCCEEDED,
        result={"target": "fw", "version": "2.0", "sha256": "cd" * 32})]
    # a stage resumed in VERIFYING: installs again without a second IN_PROGRESS
    resumed = machine(rec(u.VERIFYING), gen=1)
    m, actions = um.on_event(resumed, ev(resumed, done), T0)
    assert m.record.state == u.VERIFYING and [type(a) for a in actions] == [u.Save, u.Install]


def test_failures_of_a_stage():
    for state in (u.DOWNLOADING, u.VERIFYING, u.ACTIVATING):
        m0 = machine(rec(state), gen=1)
        m, actions = um.on_event(m0, ev(m0, u.Failed(reason=DOWNLOAD_FAILED, detail="cut")), T0)
        assert (m.record.state, m.record.final_status) == (u.FAILED_STATE, FAILED)
        assert actions == [u.Save(state=m.record), u.Report(
            command_id="c1", status=FAILED, reason=DOWNLOAD_FAILED, detail="cut")]
    m0 = machine(rec(u.DOWNLOADING), gen=1)
    m, actions = um.on_event(m0, ev(m0, u.Failed(reason=VERIFICATION_FAILED, detail="older",
                                                refused=True)), T0)
    assert m.record.final_status == "REJECTED" and actions[-1].status == "REJECTED"
    # a job finishing after its command ended changes nothing
    for state in (u.STAGED, u.IDLE, u.CONFIRMING, u.COMMITTED):
        m0 = machine(rec(state), gen=1)
        assert um.on_event(m0, ev(m0, u.Failed(reason=DOWNLOAD_FAILED, detail="x")), T0) == \
            (m0, [])


def activating(**kw):
    return machine(replace(rec(u.ACTIVATING), command_id="a1"), gen=2, **kw)


def test_hashed_checks_the_hash_then_the_preconditions_again():
    m0 = activating()
    m, actions = um.on_event(m0, ev(m0, u.Hashed(sha256="ab")), T0, lookup=PARKED)
    assert m is m0 and actions == [u.Switch(gen=2, slot="b")]
    # shifted to D while the artifact was hashed: not activated, still staged
    m, actions = um.on_event(m0, ev(m0, u.Hashed(sha256="ab")), T0, lookup=DRIVING)
    assert (m.record.state, m.record.final_status, m.record.reason) == \
        (u.STAGED, FAILED, PRECONDITION_FAILED)
    assert actions == [u.Save(state=m.record), u.Report(
        command_id="a1", status=FAILED, reason=PRECONDITION_FAILED, detail=m.record.detail)]
    assert "stays staged" in m.record.detail
    assert not any(isinstance(a, (u.Switch, u.RequestRestart)) for a in actions)
    # changed on disk since it was verified
    m, actions = um.on_event(m0, ev(m0, u.Hashed(sha256="ff")), T0, lookup=PARKED)
    assert (m.record.state, m.record.reason) == (u.FAILED_STATE, VERIFICATION_FAILED)
    assert actions[-1].status == FAILED and "sha256 mismatch" in actions[-1].detail


def test_switched_saves_confirming_then_asks_for_the_restart():
    m0 = activating()
    m, actions = um.on_event(m0, ev(m0, u.Switched()), T0)
    assert m.record.state == u.CONFIRMING
    assert actions == [u.Save(state=m.record), u.RequestRestart(),
                       u.Report(command_id="a1", status=IN_PROGRESS,
                                detail="slot b active; restarting to confirm it")]


def test_a_failed_save():
    m0 = activating()
    confirming = u.transition(m0.record, u.SWITCHED)
    # the switch happened but cannot be recorded: undo it, the command ends INTERNAL_ERROR
    m, actions = um.on_event(m0, ev(m0, u.SaveFailed(state=confirming, detail="disk full")), T0)
    assert m is m0 and actions == [
        u.UndoSwitch(slot="b"),
        u.Report(command_id="a1", status=FAILED, reason="INTERNAL_ERROR", detail="disk full")]
    # a command's first save: that command ends INTERNAL_ERROR, nothing else happens
    idle = machine()
    new = u.UpdateState(state=u.DOWNLOADING, command_id="c7")
    m, actions = um.on_event(idle, ev(idle, u.SaveFailed(state=new, detail="x" * 300)), T0)
    assert m is idle and actions == [u.Report(command_id="c7", status=FAILED,
                                              reason="INTERNAL_ERROR", detail="x" * 200)]
    # the `reported` mark: sent again after a restart at worst
    done = machine(rec(u.COMMITTED, final_status=SUCCEEDED))
    m, actions = um.on_event(done, ev(done, u.SaveFailed(
        state=replace(done.record, reported=True), detail="x")), T0)
    assert (m, actions) == (done, [])
    # COMMITTED after mark_good: the new slot stays; retried at the next poll
    conf = machine(replace(rec(u.CONFIRMING), command_id="a1"), confirm_deadline_ms=T0 + 5000)
    m, actions = um.on_event(conf, ev(conf, u.SaveFailed(state=u.commit(conf.record),
                                                        detail="x")), T0)
    assert m.marked_good and m.record.state == u.CONFIRMING and actions == []
    m, actions = um.poll(m, T0 + 10**6, lambda: pytest.fail("no health check once marked good"))
    assert m.record.state == u.COMMITTED and not m.marked_good
    assert m.confirm_deadline_ms is None
    assert actions == [u.Save(state=m.record), u.Report(
        command_id="a1", status=SUCCEEDED, result={"target": "fw", "version": "1.5"})]


def confirming():
    return machine(replace(rec(u.CONFIRMING), command_id="a1"), gen=1,
                   confirm_deadline_ms=T0 + 5000)


def test_poll_confirms_when_healthy():
    idle = machine()
    assert um.poll(idle, T0, lambda: pytest.fail("asked while not confirming")) == (idle, [])
    m0 = confirming()
    assert um.poll(m0, T0, lambda: (True, "")) == (m0, [u.MarkGood()])
    m, actions = um.on_event(m0, ev(m0, u.MarkedGood()), T0)
    assert (m.record.state, m.record.installed, m.record.final_status) == \
        (u.COMMITTED, "1.5", SUCCEEDED)
    assert m.confirm_deadline_ms is None
    assert actions == [u.Save(state=m.record), u.Report(
        command_id="a1", status=SUCCEEDED, result={"target": "fw", "version": "1.5"})]


def test_poll_rolls_back_when_unhealthy_past_the_timeout():
    m0 = confirming()
    assert um.poll(m0, T0 + 4999, lambda: (False, "broker not reached")) == (m0, [])
    m, actions = um.poll(m0, T0 + 5000, lambda: (False, "broker not reached"))
    detail = "health check failed after 5 s: broker not reached; rolled back"
    assert (m.record.state, m.record.reason, m.record.detail) == \
        (u.ROLLED_BACK, INSTALL_FAILED, detail)
    assert m.confirm_deadline_ms is None
    assert actions == [u.RollBackSlot(), u.RequestRestart(),
                       u.Save(state=m.record, keep_going=True),
                       u.Report(command_id="a1", status=FAILED, reason=INSTALL_FAILED,
                                detail=detail)]
    # the slot backend failing while confirming: undo the switch, roll back
    m, actions = um.on_event(m0, ev(m0, u.SlotFailed(detail="marker unreadable")), T0)
    assert m.record.state == u.ROLLED_BACK
    assert m.record.detail == "confirming failed: marker unreadable"
    assert actions[:2] == [u.UndoSwitch(slot="b"), u.RequestRestart()]
    assert actions[-1].reason == INSTALL_FAILED and isinstance(actions[2], u.Save)
    assert actions[2].keep_going  # the slots are the truth; the status goes out anyway


def test_on_reported_marks_the_terminal_status_once():
    m0 = machine(rec(u.STAGED, final_status=SUCCEEDED))
    assert um.on_reported(m0, [("c1", IN_PROGRESS), ("c2", SUCCEEDED)]) == (m0, [])
    m, actions = um.on_reported(m0, [("c1", SUCCEEDED)])
    assert m.record.reported and actions == [u.Save(state=m.record)]
    assert um.on_reported(m, [("c1", SUCCEEDED)]) == (m, [])


def test_start_makes_on_restart_executable():
    # confirming: the health check starts with its deadline
    m, actions = um.start(rec(u.CONFIRMING), PENDING_B, T0, policy())
    assert m.confirm_deadline_ms == T0 + 5000 and isinstance(actions[0], u.Confirm)
    # an interrupted download resumes as a new job with the floor
    m, actions = um.start(rec(u.DOWNLOADING), NO_SLOTS, T0 + 1000, policy())
    assert m.gen == 1 and actions[0] == u.StartDownload(gen=1, state=rec(u.DOWNLOADING),
                                                        hardware_id="hw", floor="1.0")
    # saves keep going; the machine holds the saved record
    m, actions = um.start(rec(u.CONFIRMING), {"active": "b", "pending": None}, T0, policy())
    assert m.record.state == u.COMMITTED and actions[0] == u.Save(state=m.record,
                                                                   keep_going=True)
    # a roll-back that moves the active slot restarts into the previous slot
    for found in (rec(u.ROLLED_BACK), rec(u.CONFIRMING)):
        crashing = {"active": "b", "pending": {"slot": "b", "previous": "a", "boots": 9}}
        _, actions = um.start(found, crashing, T0, policy())
        assert u.RollBackSlot(keep_going=True, restart=True) in actions
    half = {"active": "a", "pending": {"slot": "b", "previous": "a", "boots": 0}}
    _, actions = um.start(rec(u.ACTIVATING), half, T0, policy())
    assert u.RollBackSlot(keep_going=True, restart=False) in actions


def test_typed_values_validate_themselves():
    for make in (lambda: u.Report(command_id="", status=SUCCEEDED),
                 lambda: u.Report(command_id="c", status="DONE"),
                 lambda: u.Report(command_id="c", status=FAILED, reason="OOPS"),
                 lambda: u.Report(command_id="c", status=IN_PROGRESS, progress=True),
                 lambda: u.DownloadProgress(pct=101),
                 lambda: u.DownloadProgress(pct="5"),
                 lambda: u.Discard(what="everything"),
                 lambda: u.Save(state="STAGED"),
                 lambda: u.Switch(gen=1, slot=None),
                 lambda: u.UpdateEvent(gen=1, event="progress"),
                 lambda: u.Failed(reason=DOWNLOAD_FAILED, detail=None),
                 lambda: u.Stage(command_id="c", target=1, repository="r")):
        with pytest.raises(ValueError):
            make()
    with pytest.raises(TypeError):
        u.Report("c1", SUCCEEDED)  # keyword-only
    with pytest.raises(AttributeError):
        u.Report(command_id="c1", status=SUCCEEDED).status = FAILED  # frozen


def test_running_means_not_in_a_final_state():
    for state in sorted(u.STATES):
        m = machine(rec(state))
        assert m.running("c1") == (state not in u.FINAL_STATES)
        assert not m.running("other")
