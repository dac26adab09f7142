"""UpdateService driven step by step: real slots and state file on disk, the worker thread's
events taken from a queue so that the test decides what the vehicle does in between."""

from __future__ import annotations

import hashlib
import queue

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
    vehicle = {"gear": 0, "t": 1_000}
    svc, events, slots = make(tmp_path, test_dbc, vehicle)
    try:
        out = svc.handle("a1", "update.activate", {"target": "fw.bin"}, 1_000)
        assert statuses(out)[0] == ("a1", "ACCEPTED", None)
        verified = events.get(timeout=10)
        assert verified.kind == "verified"
        vehicle.update(gear=3, t=1_500)  # shifted to D while the artifact was hashed
        out = svc.on_event(verified, 1_500)
        assert statuses(out) == [("a1", "FAILED", "PRECONDITION_FAILED")]
        assert svc.state.state == U.STAGED  # still staged: it can be activated later
        assert slots.report()["active"] == "a" and slots.report()["pending"] is None
        assert events.empty() and not svc.restart_requested

        vehicle.update(gear=0, t=2_000)  # parked again
        svc.handle("a2", "update.activate", {"target": "fw.bin"}, 2_000)
        assert svc.on_event(events.get(timeout=10), 2_000) == []  # checks hold: switch
        switched = events.get(timeout=10)
        assert switched.kind == "switched"
        out = svc.on_event(switched, 2_100)
        assert statuses(out) == [("a2", "IN_PROGRESS", None)] and svc.restart_requested
        assert slots.report()["active"] == "b" and slots.report()["pending"]["slot"] == "b"
        assert UpdateStateStore(tmp_path / "state" / "update").load().state == U.CONFIRMING
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
