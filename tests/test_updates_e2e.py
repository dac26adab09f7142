"""Update staging end to end: a TUF repository built in the test (cloud/repo.py) and served on
loopback, a cloud key signing update.* commands through a real Mosquitto, the agent with the
simulated EV, the directory A/B slots on disk.

Every failure is produced for real (a tampered file, expired metadata, an older version,
another hardware id, a server that dies mid-transfer, a vehicle that is driving, a broker that
cannot be reached after the switch) and each one must leave the active slot untouched.
The power-loss tests run the agent as a process and SIGKILL it right after each state is saved.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from agent.adapters.control import ControlClient
from agent.adapters.keys import generate_keypair, load_private_key
from agent.adapters.slots import DirectorySlots
from agent.adapters.updatestate import UpdateStateStore
from agent.cloud import repo
from agent.config import load_config
from agent.core.cose import Signer
from agent.app.runtime import RESTART_EXIT_CODE, Agent
from agent.errors import ControlError
from conftest import ROOT
from support.agentproc import wait_for
from support.mosquitto import Mosquitto, _free_port
from test_commands_e2e import VIN, Cloud, wait_ready

pytestmark = pytest.mark.mqtt

HW = "tcu-demo-1"
ACTIVATE_WHEN = ['VCU_Status.Gear == "P"', "VCU_Status.VehicleSpeed <= 0.5",
                 'OBC_Status.ChargeState != "CHARGING"', "BMS_Status.SOC >= 20"]


class UpdateRig:
    """Broker, keys, trust store, TUF repository, and agents started on demand."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.broker = Mosquitto().start()
        keys = tmp / "keys"
        generate_keypair(keys, stem="vehicle")
        generate_keypair(keys, stem="cloud")
        self.keys = keys
        trust = tmp / "trust.toml"
        trust.write_text(f'[[key]]\nname = "fleet-backend"\npublic_key = "{keys / "cloud.pub"}"'
                         '\nallow = ["update.*", "charge.*", "state.*"]\n')
        self.repo_dir = tmp / "repo"
        self.root = repo.init_repo(self.repo_dir, expires_days=30)
        self.artifact = tmp / "fw-2.0.0.bin"
        self.artifact.write_bytes(os.urandom(200_000))
        repo.add_target(self.repo_dir, self.artifact, "2.0.0", HW)
        self.server = repo.serve(self.repo_dir)
        self.channel = f"upd-{uuid.uuid4().hex}"
        self.state_dir = tmp / "state"
        self.slots = DirectorySlots(self.state_dir / "slots")
        self.control = f"/tmp/tcu-upd-{uuid.uuid4().hex[:12]}.sock"
        self.overrides = [
            f"bus.0.channel={self.channel!r}", f"storage.dir={str(self.state_dir)!r}",
            f"signing.key_file={str(keys / 'vehicle.key')!r}", f"mqtt.port={self.broker.port}",
            f"commands.trust_store={str(trust)!r}", "mqtt.reconnect_min_s=0.1",
            "commands.reject_rate_per_s=1000", "commands.reject_burst=1000",
            f"updates.trusted_root={str(self.root)!r}",
            f"updates.allowed_repositories={json.dumps([self.server.url + '/'])}",
            f"updates.hardware_id={HW!r}", "updates.installed_version='1.0.0'",
            f"updates.preconditions={json.dumps(ACTIVATE_WHEN)}",
            "updates.health_timeout_s=5",
            # never the default /run/tcu-agent socket another test's agent may hold
            f"control.socket={self.control!r}",
        ]
        self.cloud = Cloud(self.broker, keys / "cloud.key", keys / "vehicle.pub")
        self.agent: Agent | None = None
        self.procs: list[subprocess.Popen] = []  # `tcu-agent run` processes (_run_agent)

    def start_agent(self, *extra: str, ready: bool = True) -> Agent:
        config = load_config(ROOT / "configs" / "demo.toml", [*self.overrides, *extra])
        self.agent = Agent(config)
        self.agent.start()
        if ready:
            wait_ready(self.agent)
        return self.agent

    def stop_agent(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            self.agent = None

    def stage(self, target="fw-2.0.0.bin", repository=None) -> tuple[str, dict]:
        cid, _ = self.cloud.command("update.stage", {
            "target": target, "repository": repository or self.server.url})
        return cid, self.cloud.wait_terminal(cid, timeout=20)

    def assert_untouched(self) -> None:
        report = self.slots.report()
        assert report["active"] == "a" and report["pending"] is None, report
        assert not (self.slots.base / "b" / "payload").exists()

    def update_status(self) -> dict:
        done = subprocess.run(
            [sys.executable, "-m", "agent", "update", "status", "-c",
             str(ROOT / "configs" / "demo.toml"), "--json",
             *[a for o in self.overrides for a in ("--set", o)]],
            capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def close(self) -> None:
        self.stop_agent()
        for proc in self.procs:  # processes of a test that failed before stopping them
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        self.cloud.close()
        self.server.close()
        self.broker.close()


@pytest.fixture
def rig(tmp_path):
    r = UpdateRig(tmp_path)
    yield r
    r.close()


def statuses(rig, cid) -> list[str]:
    return [s["status"] for s in rig.cloud.statuses(cid)]


# -- the happy path ------------------------------------------------------------------------

def test_stage_activate_restart_commit(rig):
    rig.start_agent()
    cid, final = rig.stage()
    assert final["status"] == "SUCCEEDED", final
    sha = final["result"]["sha256"]
    assert final["result"] == {"target": "fw-2.0.0.bin", "version": "2.0.0", "sha256": sha}
    seen = rig.cloud.statuses(cid)
    assert seen[0]["status"] == "ACCEPTED"
    progress = [s["progress"] for s in seen if s["status"] == "IN_PROGRESS" and "progress" in s]
    assert progress and progress == sorted(progress) and progress[-1] == 100
    assert (rig.slots.base / "b" / "payload").read_bytes() == rig.artifact.read_bytes()
    assert rig.slots.report()["active"] == "a"  # staging never touches the active slot

    aid, _ = rig.cloud.command("update.activate", {"target": "fw-2.0.0.bin"})
    wait_for(lambda: rig.agent.restart_requested, what="the restart request")
    assert rig.slots.report()["active"] == "b" and rig.slots.report()["pending"]["slot"] == "b"
    assert statuses(rig, aid)[:1] == ["ACCEPTED"] and "SUCCEEDED" not in statuses(rig, aid)
    rig.stop_agent()  # what run_forever does before exiting with RESTART_EXIT_CODE

    rig.start_agent()  # the restart: confirmed by the health check
    final = rig.cloud.wait_terminal(aid, timeout=15)
    assert final["status"] == "SUCCEEDED", final
    assert final["result"] == {"target": "fw-2.0.0.bin", "version": "2.0.0"}
    assert (rig.slots.report()["active"], rig.slots.report()["pending"]) == ("b", None)
    assert UpdateStateStore(rig.state_dir / "update").load().installed == "2.0.0"
    assert not (rig.state_dir / "update" / "downloads").exists() or \
        not any((rig.state_dir / "update" / "downloads").iterdir())

    # Anti-rollback now uses the committed version: 2.0.0 again is not newer.
    _, again = rig.stage()
    assert (again["status"], again["reason"]) == ("REJECTED", "VERIFICATION_FAILED"), again
    rig.stop_agent()
    shown = rig.update_status()
    assert shown["installed_version"] == "2.0.0" and shown["active_slot"] == "b"
    assert shown["state"] == "FAILED"  # the last command (the refused stage)


# -- stage failures: each leaves the active slot untouched ---------------------------------

def _tamper(rig):
    path = rig.repo_dir / "targets" / "fw-2.0.0.bin"
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))


def _older(rig):
    old = rig.tmp / "fw-0.9.0.bin"
    old.write_bytes(b"old firmware" * 1000)
    repo.add_target(rig.repo_dir, old, "0.9.0", HW)
    return {"target": "fw-0.9.0.bin"}


def _other_hw(rig):
    other = rig.tmp / "fw-other.bin"
    other.write_bytes(b"for another unit" * 1000)
    repo.add_target(rig.repo_dir, other, "3.0.0", "some-other-ecu")
    return {"target": "fw-other.bin"}


def _cut(rig):
    rig.server.cut_after_bytes = 50_000


@pytest.mark.parametrize("case, prepare, status, reason, fetched", [
    ("tampered artifact", _tamper, "FAILED", "VERIFICATION_FAILED", True),
    ("expired timestamp", lambda r: repo.expire_timestamp(r.repo_dir), "FAILED",
     "VERIFICATION_FAILED", False),
    ("older version (rollback attack)", _older, "REJECTED", "VERIFICATION_FAILED", False),
    ("another hardware id", _other_hw, "REJECTED", "VERIFICATION_FAILED", False),
    ("server dies mid-download", _cut, "FAILED", "DOWNLOAD_FAILED", True),
    ("repository not allowed", lambda r: {"repository": "http://127.0.0.1:9/evil"},
     "REJECTED", "BAD_PARAMS", False),
])
def test_stage_failures_leave_the_active_slot_untouched(rig, case, prepare, status, reason,
                                                        fetched):
    rig.start_agent()
    params = prepare(rig) or {}
    before = len(rig.server.requests)
    cid, final = rig.stage(**params)
    assert (final["status"], final["reason"]) == (status, reason), (case, final)
    target_requests = [p for p in rig.server.requests[before:] if p.startswith("/targets/")]
    assert bool(target_requests) == fetched, (case, rig.server.requests[before:])
    rig.assert_untouched()
    saved = UpdateStateStore(rig.state_dir / "update").load()
    # a parameter refused up front never starts the state machine
    assert (saved.state if saved else "IDLE") == ("IDLE" if reason == "BAD_PARAMS" else "FAILED")


def test_not_enough_disk_space_fails_before_downloading(rig):
    rig.start_agent("updates.min_free_bytes=1000000000000000")  # 1 PB must stay free
    before = len(rig.server.requests)
    _, final = rig.stage()
    assert (final["status"], final["reason"]) == ("FAILED", "DOWNLOAD_FAILED"), final
    assert "not enough space" in final["detail"]
    assert not [p for p in rig.server.requests[before:] if p.startswith("/targets/")]
    rig.assert_untouched()


def test_activate_while_driving_is_refused(rig):
    rig.start_agent()
    _, staged = rig.stage()
    assert staged["status"] == "SUCCEEDED"
    rig.stop_agent()
    rig.start_agent("simulator.speed_kph=40")
    wait_for(lambda: (rig.agent.core.lookup("VCU_Status.VehicleSpeed") or (0,))[0] > 1,
             what="the simulated EV driving")
    aid, _ = rig.cloud.command("update.activate", {"target": "fw-2.0.0.bin"})
    final = rig.cloud.wait_terminal(aid)
    assert (final["status"], final["reason"]) == ("REJECTED", "PRECONDITION_FAILED"), final
    assert "VCU_Status" in final["detail"]
    assert rig.slots.report()["active"] == "a" and rig.slots.report()["pending"] is None
    assert UpdateStateStore(rig.state_dir / "update").load().state == "STAGED"  # still staged


def test_activate_a_target_that_is_not_staged_is_refused(rig):
    rig.start_agent()
    aid, _ = rig.cloud.command("update.activate", {"target": "fw-2.0.0.bin"})
    final = rig.cloud.wait_terminal(aid)
    assert (final["status"], final["reason"]) == ("REJECTED", "PRECONDITION_FAILED"), final
    rig.assert_untouched()


def test_a_staged_artifact_changed_on_disk_is_not_activated(rig):
    rig.start_agent()
    _, staged = rig.stage()
    assert staged["status"] == "SUCCEEDED"
    payload = rig.slots.base / "b" / "payload"
    data = bytearray(payload.read_bytes())
    data[-1] ^= 0x01  # bit rot, or someone with write access to the slot
    payload.write_bytes(bytes(data))
    aid, _ = rig.cloud.command("update.activate", {"target": "fw-2.0.0.bin"})
    final = rig.cloud.wait_terminal(aid)
    assert (final["status"], final["reason"]) == ("FAILED", "VERIFICATION_FAILED"), final
    assert rig.slots.report()["active"] == "a" and rig.slots.report()["pending"] is None
    assert not rig.agent.restart_requested


def test_failed_health_check_rolls_back(rig):
    rig.start_agent()
    _, staged = rig.stage()
    assert staged["status"] == "SUCCEEDED"
    aid, _ = rig.cloud.command("update.activate", {"target": "fw-2.0.0.bin"})
    wait_for(lambda: rig.agent.restart_requested, what="the switch")
    rig.stop_agent()
    assert rig.slots.report()["active"] == "b"

    # The new version cannot reach the broker: not confirmed within the health timeout.
    agent = rig.start_agent(f"mqtt.port={_free_port()}", "updates.health_timeout_s=1.5",
                            ready=False)
    wait_for(lambda: agent.restart_requested, timeout=15, what="the rollback")
    assert rig.slots.report()["active"] == "a" and rig.slots.report()["pending"] is None
    state = UpdateStateStore(rig.state_dir / "update").load()
    assert (state.state, state.reason) == ("ROLLED_BACK", "INSTALL_FAILED")
    assert "broker not reached" in state.detail
    rig.stop_agent()

    rig.start_agent()  # back on the previous slot, the signed FAILED leaves the outbox
    final = rig.cloud.wait_terminal(aid)
    assert (final["status"], final["reason"]) == ("FAILED", "INSTALL_FAILED"), final
    assert rig.slots.report()["active"] == "a"
    assert rig.agent.updates.installed_version == "1.0.0"


def test_cancel_a_staged_update_and_nothing_to_cancel(rig):
    rig.start_agent()
    _, staged = rig.stage()
    assert staged["status"] == "SUCCEEDED"
    cid, _ = rig.cloud.command("update.cancel")
    final = rig.cloud.wait_terminal(cid)
    assert final["status"] == "SUCCEEDED", final
    wait_for(lambda: not (rig.slots.base / "b").exists(), what="the staged slot discarded")
    rig.assert_untouched()
    assert UpdateStateStore(rig.state_dir / "update").load().state == "IDLE"
    again, _ = rig.cloud.command("update.cancel")
    final = rig.cloud.wait_terminal(again)
    assert (final["status"], final["reason"]) == ("REJECTED", "PRECONDITION_FAILED"), final


def test_a_new_stage_supersedes_the_staged_one(rig):
    newer = rig.tmp / "fw-2.1.0.bin"
    newer.write_bytes(os.urandom(100_000))
    repo.add_target(rig.repo_dir, newer, "2.1.0", HW)
    rig.start_agent()
    _, first = rig.stage()
    assert first["status"] == "SUCCEEDED"
    _, second = rig.stage("fw-2.1.0.bin")
    assert second["status"] == "SUCCEEDED" and second["result"]["version"] == "2.1.0"
    assert (rig.slots.base / "b" / "payload").read_bytes() == newer.read_bytes()
    assert rig.slots.report()["active"] == "a"


def _stage_slowly(rig, target="fw-2.0.0.bin"):
    """Start a stage over a slow link and return its id once the download is under way."""
    rig.server.bytes_per_s = 60_000  # 200 kB: about 3 s
    cid, _ = rig.cloud.command("update.stage", {"target": target,
                                                "repository": rig.server.url})
    wait_for(lambda: any(s.get("progress", 0) > 0 for s in rig.cloud.statuses(cid)),
             what="download progress")
    return cid


def test_cancel_during_download(rig):
    rig.start_agent()
    cid = _stage_slowly(rig)
    xid, _ = rig.cloud.command("update.cancel")
    assert rig.cloud.wait_terminal(xid)["status"] == "SUCCEEDED"
    final = rig.cloud.wait_terminal(cid)
    assert (final["status"], final["reason"]) == ("FAILED", "CANCELLED"), final
    time.sleep(3.5)  # the aborted transfer would have finished by now
    assert "SUCCEEDED" not in statuses(rig, cid)
    rig.assert_untouched()
    assert UpdateStateStore(rig.state_dir / "update").load().state == "IDLE"


def test_a_new_stage_supersedes_a_download_in_flight(rig):
    newer = rig.tmp / "fw-2.1.0.bin"
    newer.write_bytes(os.urandom(50_000))
    repo.add_target(rig.repo_dir, newer, "2.1.0", HW)
    rig.start_agent()
    first = _stage_slowly(rig)
    second, final = rig.stage("fw-2.1.0.bin")
    assert final["status"] == "SUCCEEDED" and final["result"]["version"] == "2.1.0", final
    old = rig.cloud.wait_terminal(first)
    assert (old["status"], old["reason"]) == ("FAILED", "SUPERSEDED"), old
    assert (rig.slots.base / "b" / "payload").read_bytes() == newer.read_bytes()
    assert rig.slots.report()["active"] == "a"


# -- SIGKILL at every state, then a restart ------------------------------------------------

def _run_agent(rig, kill_at: str | None = None, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TCU_AGENT_TEST_KILL_AT"}
    if kill_at:
        env["TCU_AGENT_TEST_KILL_AT"] = kill_at
    args = [sys.executable, "-m", "agent", "run", "-c", str(ROOT / "configs" / "demo.toml")]
    for o in [*rig.overrides, *extra]:
        args += ["--set", o]
    log = open(rig.tmp / "agent.log", "ab")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    rig.procs.append(proc)
    return proc


def _wait_connected(rig, proc, timeout=20.0):
    """The agent process is up: its status file says connected (commands are subscribed),
    and it has seen every signal the activation's preconditions read (a never-seen one makes
    them false: an activation sent before the simulator's first frames would be REJECTED)."""
    status = rig.state_dir / "status.json"
    inputs = {tuple(w.split()[0].split(".")) for w in ACTIVATE_WHEN}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, (rig.tmp / "agent.log").read_text()[-3000:]
        try:
            s = json.loads(status.read_text())
            if s.get("running") and s.get("pid") == proc.pid and \
                    s["uplink"]["state"] == "connected" and s["uplink"].get("subscribed"):
                with ControlClient(rig.control) as c:
                    seen = {(m["message"], m["signal"])
                            for m in c.request("signals")["signals"].values()
                            if m.get("value") is not None}
                if inputs <= seen:
                    return
        except (OSError, ValueError, KeyError, ControlError):
            pass
        time.sleep(0.1)
    raise AssertionError("agent process not connected, or its preconditions' signals not seen: "
                         + (rig.tmp / "agent.log").read_text()[-3000:])


def _stop(proc, sig=signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(30)


@pytest.mark.parametrize("kill_at", ["DOWNLOADING", "VERIFYING", "STAGED"])
def test_sigkill_while_staging_then_restart(rig, kill_at):
    proc = _run_agent(rig, kill_at)
    _wait_connected(rig, proc)
    cid, _ = rig.cloud.command("update.stage", {"target": "fw-2.0.0.bin",
                                                "repository": rig.server.url})
    assert proc.wait(30) == -signal.SIGKILL
    assert UpdateStateStore(rig.state_dir / "update").load().state == kill_at
    proc = _run_agent(rig)
    try:
        final = rig.cloud.wait_terminal(cid, timeout=30)  # resumed, or re-reported
        assert final["status"] == "SUCCEEDED", final
        assert final["result"]["version"] == "2.0.0"
        assert [s["status"] for s in rig.cloud.statuses(cid)].count("SUCCEEDED") == 1
        assert (rig.slots.base / "b" / "payload").read_bytes() == rig.artifact.read_bytes()
        assert rig.slots.report()["active"] == "a"
    finally:
        assert _stop(proc) == 0


@pytest.mark.parametrize("kill_at, outcome, active", [
    ("ACTIVATING", ("FAILED", "INSTALL_FAILED"), "a"),  # killed before the switch: clean up
    ("CONFIRMING", ("SUCCEEDED", None), "b"),  # killed after the switch: confirm it
    ("COMMITTED", ("SUCCEEDED", None), "b"),  # killed before the status went out: re-send
])
def test_sigkill_while_activating_then_restart(rig, kill_at, outcome, active):
    proc = _run_agent(rig)
    _wait_connected(rig, proc)
    _, staged = rig.stage()
    assert staged["status"] == "SUCCEEDED"
    _stop(proc)
    proc = _run_agent(rig, kill_at if kill_at != "COMMITTED" else None)
    _wait_connected(rig, proc)
    aid, _ = rig.cloud.command("update.activate", {"target": "fw-2.0.0.bin"})
    code = proc.wait(30)
    if kill_at == "COMMITTED":
        assert code == RESTART_EXIT_CODE  # switched: the unit restarts the agent ...
        proc = _run_agent(rig, kill_at)  # ... which is killed right after committing
        assert proc.wait(30) == -signal.SIGKILL
    else:
        assert code == -signal.SIGKILL
    assert UpdateStateStore(rig.state_dir / "update").load().state == kill_at
    proc = _run_agent(rig)
    try:
        final = rig.cloud.wait_terminal(aid, timeout=30)
        assert (final["status"], final.get("reason")) == outcome, final
        assert [s["status"] for s in rig.cloud.statuses(aid)].count(outcome[0]) == 1
        wait_for(lambda: rig.slots.report()["pending"] is None, what="no pending activation")
        assert rig.slots.report()["active"] == active
    finally:
        assert _stop(proc) == 0


def test_a_terminal_status_is_not_sent_again_after_restarts(rig):
    """Even when the replay store no longer remembers the command (its exp passed, or the
    database was lost), the update record knows its terminal status already went out."""
    _older(rig)
    rig.start_agent()
    cid, final = rig.stage("fw-0.9.0.bin")
    assert (final["status"], final["reason"]) == ("REJECTED", "VERIFICATION_FAILED")
    for _ in range(2):
        rig.stop_agent()
        for f in rig.state_dir.glob("replay.db*"):
            f.unlink()
        rig.start_agent()
    time.sleep(1.0)
    terminal = [s["status"] for s in rig.cloud.statuses(cid)
                if s["status"] not in ("ACCEPTED", "IN_PROGRESS")]
    assert terminal == ["REJECTED"], terminal


def test_sigkill_right_after_a_refusal_is_saved(rig):
    _older(rig)
    proc = _run_agent(rig, "FAILED")
    _wait_connected(rig, proc)
    cid, _ = rig.cloud.command("update.stage", {"target": "fw-0.9.0.bin",
                                                "repository": rig.server.url})
    assert proc.wait(30) == -signal.SIGKILL
    proc = _run_agent(rig)
    try:
        final = rig.cloud.wait_terminal(cid, timeout=30)
        # still a rejection of the target (not FAILED), and only one terminal status
        assert (final["status"], final["reason"]) == ("REJECTED", "VERIFICATION_FAILED"), final
        time.sleep(1.0)
        assert [s["status"] for s in rig.cloud.statuses(cid)].count("REJECTED") == 1
        rig.assert_untouched()
    finally:
        assert _stop(proc) == 0


def test_sigkill_right_after_a_rollback_is_saved(rig):
    proc = _run_agent(rig)
    _wait_connected(rig, proc)
    _, staged = rig.stage()
    assert staged["status"] == "SUCCEEDED"
    aid, _ = rig.cloud.command("update.activate", {"target": "fw-2.0.0.bin"})
    assert proc.wait(30) == RESTART_EXIT_CODE
    # The new version cannot reach the broker; killed right after the rollback is saved.
    proc = _run_agent(rig, "ROLLED_BACK", f"mqtt.port={_free_port()}",
                      "updates.health_timeout_s=1.5")
    assert proc.wait(30) == -signal.SIGKILL
    assert rig.slots.report()["active"] == "a"
    proc = _run_agent(rig)
    try:
        final = rig.cloud.wait_terminal(aid, timeout=30)
        assert (final["status"], final["reason"]) == ("FAILED", "INSTALL_FAILED"), final
        time.sleep(1.0)
        assert [s["status"] for s in rig.cloud.statuses(aid)].count("FAILED") == 1
        assert (rig.slots.report()["active"], rig.slots.report()["pending"]) == ("a", None)
    finally:
        assert _stop(proc) == 0
