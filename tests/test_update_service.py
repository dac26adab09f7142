"""UpdateService driven step by step: real slots and state file on disk, the worker thread's
events taken from a queue so that the test decides what the vehicle does in between."""

from __future__ import annotations

import hashlib
import queue
from dataclasses import replace

from agent.adapters.slots import DirectorySlots
from agent.adapters.updatestate import UpdateStateStore
from agent.config import config_from_dict
from agent.core import updates as U
from agent.app.updateservice import UpdateService

PARKED = ['VCU_Drive.Gear == 0']  # test.dbc: Gear 0 = P


def make(tmp_path, test_dbc, vehicle):
    config = svc_config(tmp_path, test_dbc)
    # A staged update, as a successful update.stage leaves it.
    artifact = tmp_path / "fw.bin"
    artifact.write_bytes(b"new firmware" * 1000)
    sha = hashlib.sha256(artifact.read_bytes()).hexdigest()
    slot = DirectorySlots(config.slots_dir).install_inactive(
        artifact, {"target": "fw.bin", "version": "2.0.0", "sha256": sha})
    UpdateStateStore(config.storage.dir / "update").save(U.UpdateState(
        state=U.STAGED, command_id="s1", target="fw.bin", version="2.0.0", sha256=sha,
        slot=slot, final_status="SUCCEEDED", reported=True))
    events: queue.Queue = queue.Queue()
    lookup = lambda name: (vehicle["gear"], vehicle["t"]) if name == "VCU_Drive.Gear" else None
    return UpdateService(config, lookup, events.put), events, DirectorySlots(config.slots_dir)


def statuses(out):
    return [(s.id, s.status, s.reason) for s in out]


def test_preconditions_are_checked_again_after_hashing(tmp_path, test_dbc):
    """The executor's side of it (the decision itself: test_update_core): the worker hashes
    the real slot, a refusal leaves the record STAGED on disk and the slots untouched, and an
    accepted one switches the slot, saves CONFIRMING and asks for the restart."""
    vehicle = {"gear": 0, "t": 1_000}
    svc, events, slots = make(tmp_path, test_dbc, vehicle)
    try:
        out = svc.handle("a1", "update.activate", {"target": "fw.bin"}, 1_000)
        assert statuses(out)[0] == ("a1", "ACCEPTED", None)
        hashed = events.get(timeout=10)
        assert hashed.event == U.Hashed(sha256=svc.state.sha256)  # the slot's real hash
        vehicle.update(gear=3, t=1_500)  # shifted to D while the artifact was hashed
        out = svc.on_event(hashed, 1_500)
        assert statuses(out) == [("a1", "FAILED", "PRECONDITION_FAILED")]
        assert svc.state.state == U.STAGED  # still staged: it can be activated later
        assert UpdateStateStore(tmp_path / "state" / "update").load().state == U.STAGED
        assert slots.report()["active"] == "a" and slots.report()["pending"] is None
        assert events.empty() and not svc.restart_requested

        vehicle.update(gear=0, t=2_000)  # parked again
        svc.handle("a2", "update.activate", {"target": "fw.bin"}, 2_000)
        assert svc.on_event(events.get(timeout=10), 2_000) == []  # checks hold: switch
        switched = events.get(timeout=10)
        assert switched.event == U.Switched()
        out = svc.on_event(switched, 2_100)
        assert statuses(out) == [("a2", "IN_PROGRESS", None)] and svc.restart_requested
        assert slots.report()["active"] == "b" and slots.report()["pending"]["slot"] == "b"
        assert UpdateStateStore(tmp_path / "state" / "update").load().state == U.CONFIRMING
    finally:
        svc.close()


def break_saves(tmp_path):
    """A real write failure: the record's path is a directory, so the rename onto it fails."""
    path = tmp_path / "state" / "update" / "update-state.json"
    kept = path.read_bytes()
    path.unlink()
    path.mkdir()
    return lambda: (path.rmdir(), path.write_bytes(kept))


def test_a_switch_that_cannot_be_recorded_is_undone(tmp_path, test_dbc):
    svc, events, slots = make(tmp_path, test_dbc, {"gear": 0, "t": 1_000})
    try:
        svc.handle("a1", "update.activate", {"target": "fw.bin"}, 1_000)
        assert svc.on_event(events.get(timeout=10), 1_000) == []
        switched = events.get(timeout=10)
        assert slots.report()["pending"]["slot"] == "b"  # the worker switched
        break_saves(tmp_path)
        out = svc.on_event(switched, 1_100)
        assert statuses(out) == [("a1", "FAILED", "INTERNAL_ERROR")]
        assert slots.report()["active"] == "a" and slots.report()["pending"] is None
        assert svc.state.state == U.ACTIVATING and not svc.restart_requested
    finally:
        svc.close()


def test_a_command_whose_record_cannot_be_saved_ends_internal_error(tmp_path, test_dbc):
    svc, events, slots = make(tmp_path, test_dbc, {"gear": 0, "t": 1_000})
    try:
        break_saves(tmp_path)
        out = svc.handle("a1", "update.activate", {"target": "fw.bin"}, 1_000)
        assert statuses(out) == [("a1", "FAILED", "INTERNAL_ERROR")]  # no ACCEPTED, no job
        assert svc.state.state == U.STAGED and svc.state.command_id == "s1"
    finally:
        svc.close()
    assert events.empty()  # the worker is stopped: no job was queued


def confirming(tmp_path, test_dbc):
    """The agent restarted after the switch: slot b on trial, the record CONFIRMING."""
    svc, _, slots = make(tmp_path, test_dbc, {"gear": 0, "t": 1_000})
    svc.close()
    slots.switch_active("b")
    store = UpdateStateStore(tmp_path / "state" / "update")
    store.save(replace(store.load(), state=U.CONFIRMING, command_id="a1", final_status=None,
                       reported=False))
    svc = UpdateService(svc_config(tmp_path, test_dbc), lambda name: None, lambda ev: None)
    assert statuses(svc.start(10_000)) == [("a1", "IN_PROGRESS", None)]
    assert slots.report()["pending"]["boots"] == 1  # the start was counted
    return svc, slots, store


def test_confirming_marks_the_slot_good_and_saves_committed(tmp_path, test_dbc):
    svc, slots, store = confirming(tmp_path, test_dbc)
    try:
        out = svc.poll(10_000, lambda: (True, ""))
        assert [(s.id, s.status, s.result) for s in out] == [
            ("a1", "SUCCEEDED", {"target": "fw.bin", "version": "2.0.0"})]
        assert (slots.report()["active"], slots.report()["pending"]) == ("b", None)
        assert store.load().state == U.COMMITTED and store.load().installed == "2.0.0"
        assert not svc.restart_requested
    finally:
        svc.close()


def test_a_commit_that_cannot_be_saved_is_retried_and_never_rolled_back(tmp_path, test_dbc):
    svc, slots, store = confirming(tmp_path, test_dbc)
    try:
        repair = break_saves(tmp_path)
        assert svc.poll(10_000, lambda: (True, "")) == []  # marked good, not yet recorded
        assert slots.report()["pending"] is None and slots.report()["active"] == "b"
        # past the health timeout and unhealthy: still no roll-back over a failed save
        assert svc.poll(10**9, lambda: (False, "broker not reached")) == []
        assert slots.report()["active"] == "b" and not svc.restart_requested
        repair()
        out = svc.poll(10**9, lambda: (False, "broker not reached"))
        assert [(s.id, s.status) for s in out] == [("a1", "SUCCEEDED")]
        assert store.load().state == U.COMMITTED
    finally:
        svc.close()


def test_an_unhealthy_slot_is_rolled_back_on_disk(tmp_path, test_dbc):
    svc, slots, store = confirming(tmp_path, test_dbc)
    try:
        timeout_ms = int(svc.cfg.health_timeout_s * 1000)
        assert svc.poll(10_000 + timeout_ms - 1, lambda: (False, "bus down")) == []
        out = svc.poll(10_000 + timeout_ms, lambda: (False, "bus down"))
        assert [(s.id, s.status, s.reason) for s in out] == [("a1", "FAILED", "INSTALL_FAILED")]
        assert (slots.report()["active"], slots.report()["pending"]) == ("a", None)
        assert store.load().state == U.ROLLED_BACK and svc.restart_requested
    finally:
        svc.close()


def test_anti_rollback_floor_survives_a_lost_record(tmp_path, test_dbc):
    svc, _, slots = make(tmp_path, test_dbc, {"gear": 0, "t": 1_000})
    svc.close()
    slots.switch_active("b")
    slots.mark_good()  # 2.0.0 committed and running
    (tmp_path / "state" / "update" / "update-state.json").unlink()  # the record is lost
    fresh = UpdateService(svc_config(tmp_path, test_dbc), lambda name: None, lambda ev: None)
    try:
        assert fresh.state.state == U.IDLE
        assert fresh.installed_version == "2.0.0"  # not the configured 1.0.0
    finally:
        fresh.close()


def svc_config(tmp_path, test_dbc):
    (tmp_path / "root.json").write_text("{}")
    (tmp_path / "trust.toml").write_text("")
    raw = {"vehicle": {"vin": "V1"}, "storage": {"dir": str(tmp_path / "state")},
           "bus": [{"name": "a", "interface": "virtual", "channel": "x", "dbc": [str(test_dbc)]}],
           "commands": {"trust_store": str(tmp_path / "trust.toml")},
           "updates": {"trusted_root": str(tmp_path / "root.json"),
                       "allowed_repositories": ["http://127.0.0.1/"], "hardware_id": "hw",
                       "installed_version": "1.0.0", "preconditions": PARKED}}
    return config_from_dict(raw, base=tmp_path)


def test_tuf_expiry_of_an_update_is_checked_against_the_time_floor(tmp_path, test_dbc):
    """The system clock is behind the trusted time floor (60 days ahead): metadata that
    expires in 30 days is expired for the vehicle, so update.stage fails VERIFICATION_FAILED."""
    import time

    from agent.adapters.clockstore import mono_ms
    from agent.cloud import repo
    from agent.core.clock import TrustedClock

    directory = tmp_path / "repo"
    root = repo.init_repo(directory, expires_days=30)
    artifact = tmp_path / "fw-2.0.0.bin"
    artifact.write_bytes(b"x" * 1000)
    repo.add_target(directory, artifact, "2.0.0", "hw")
    floor = int(time.time() * 1000) + 60 * 86_400_000
    events: queue.Queue = queue.Queue()
    with repo.serve(directory) as server:
        config = svc_config(tmp_path, test_dbc)
        config = replace(config, updates=replace(config.updates, trusted_root=root,
                                                 allowed_repositories=(server.url,)))
        svc = UpdateService(config, lambda name: None, events.put,
                            clock=TrustedClock(floor, "gnss", mono_ms()))
        out = svc.handle("u1", "update.stage", {"target": artifact.name,
                                                "repository": server.url}, 1)
        assert statuses(out) == [("u1", "ACCEPTED", None)]
        final = []
        deadline = time.monotonic() + 30
        while not final and time.monotonic() < deadline:
            try:
                ev = events.get(timeout=1)
            except queue.Empty:
                continue
            final = [s for s in svc.on_event(ev, 2) if s.status in ("FAILED", "SUCCEEDED")]
    assert [(s.status, s.reason) for s in final] == [("FAILED", "VERIFICATION_FAILED")]
    assert "expired" in final[0].detail.lower()
    svc.close()
