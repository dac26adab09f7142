"""core/updates.py (pure) and adapters/updatestate.py (the record on disk)."""

from __future__ import annotations

import subprocess
from dataclasses import replace
import sys
import time

import pytest

from agent.adapters.updatestate import UpdateStateStore
from agent.core import updates as u
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
    assert reports == [u.Report("c1", FAILED, SUPERSEDED, "superseded by command c2")]


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
    assert reports == [u.Report("c1", FAILED, CANCELLED, "cancelled by command k1"),
                       u.Report("k1", SUCCEEDED)]
    with pytest.raises(u.UpdateError) as info:
        u.cancel(s, "k2")  # nothing to cancel
    assert info.value.reason == PRECONDITION_FAILED


def test_fail_and_activate_checks():
    s, _ = u.stage(u.UpdateState(), "c1", "fw", T0)
    failed, reports = u.fail(s, DOWNLOAD_FAILED, "server gone")
    assert failed.state == u.FAILED_STATE and reports == [
        u.Report("c1", FAILED, DOWNLOAD_FAILED, "server gone")]
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
    assert u.on_restart(None, NO_PENDING, T0) == [u.Discard("downloads")]
    assert u.on_restart(u.UpdateState(), NO_PENDING, T0) == [u.Discard("downloads")]


def test_restart_resumes_a_recent_download_and_fails_an_old_one():
    s = rec(u.DOWNLOADING)
    assert u.on_restart(s, NO_PENDING, T0 + 1000) == [
        u.ResumeStage(s), u.Report("c1", IN_PROGRESS, None, "resuming after a restart")]
    actions = u.on_restart(s, NO_PENDING, T0 + 10**9, max_resume_age_ms=10**6)
    saved = actions[0].state
    assert saved.state == u.FAILED_STATE and saved.reason == DOWNLOAD_FAILED
    assert actions[1] == u.Discard("downloads")
    assert actions[2].command_id == "c1" and actions[2].reason == DOWNLOAD_FAILED


def test_restart_staged_rereports_success():
    assert u.on_restart(rec(u.STAGED), NO_PENDING, T0) == [u.Report(
        "c1", SUCCEEDED, result={"target": "fw", "version": "1.5", "sha256": "ab"})]


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
        u.Discard("downloads"),
        u.Report("c1", SUCCEEDED, result={"target": "fw", "version": "1.5"})]
    failed = rec(u.FAILED_STATE, reason=DOWNLOAD_FAILED, detail="x")
    assert u.on_restart(failed, NO_PENDING, T0)[-1] == u.Report("c1", FAILED,
                                                                DOWNLOAD_FAILED, "x")


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
    assert actions[-1] == u.Report("c1", SUCCEEDED, result={"target": "fw", "version": "1.5"})


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
