"""Remote commands end to end: a cloud key signs, Mosquitto carries, the agent verifies,
acts on the virtual CAN bus where the simulated EV answers, and signs its statuses.

Every rejection is produced by a real message, and for each one the test watches the bus
and asserts that no request frame was sent."""

from __future__ import annotations

import json
import threading
import time
import uuid

import can
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.adapters.keys import generate_keypair, load_private_key, load_public_key
from agent.config import load_config
from agent.core.cose import Signer, kid_of, verify
from agent.app.runtime import Agent
from conftest import ROOT
from support.mosquitto import Consumer, Mosquitto, publish

pytestmark = pytest.mark.mqtt

VIN = "DEMO0EV0000000001"
REQUEST_IDS = {0x5A0, 0x5A1}  # TCU_ChargeRequest, TCU_LockRequest


class BusWatch:
    """Records every frame on the virtual bus (what the agent sends, what the EV sends)."""

    def __init__(self, channel: str):
        self.bus = can.Bus(interface="virtual", channel=channel)
        self.frames: list[tuple[float, int, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            msg = self.bus.recv(0.05)
            if msg is not None:
                self.frames.append((time.monotonic(), msg.arbitration_id, bytes(msg.data)))

    def requests_since(self, t: float) -> list:
        return [f for f in self.frames if f[0] >= t and f[1] in REQUEST_IDS]

    def close(self):
        self._stop.set()
        self._thread.join(1)
        self.bus.shutdown()


class Cloud:
    """Signs commands like a cloud service and reads the verified statuses."""

    def __init__(self, broker: Mosquitto, key_path, vehicle_pub):
        self.broker = broker
        self.signer = Signer(load_private_key(key_path))
        vk = load_public_key(str(vehicle_pub))
        self.vehicle_keys = {kid_of(vk): vk}
        self.consumer = Consumer(broker.host, broker.port, f"vehicles/{VIN}/responses").start()

    def command(self, name, params=None, *, signer=None, cid=None, vin=VIN, iat=None, exp=None,
                ttl_ms=60_000, raw=None) -> tuple[str, bytes]:
        now = int(time.time() * 1000)
        cid = cid or f"t-{uuid.uuid4().hex[:16]}"
        iat = now if iat is None else iat
        payload = {"v": 1, "id": cid, "vin": vin, "name": name, "params": params or {},
                   "iat": iat, "exp": exp if exp is not None else iat + ttl_ms}
        message = raw if raw is not None else (signer or self.signer).sign(payload)
        publish(self.broker.host, self.broker.port, f"vehicles/{VIN}/commands", message)
        return cid, message

    def statuses(self, cid) -> list[dict]:
        out = []
        for m in self.consumer.messages:
            body = verify(m.payload, self.vehicle_keys).payload  # every status is signed
            if body.get("id") == cid:
                out.append(body)
        return out

    def wait_terminal(self, cid, timeout=10.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for s in self.statuses(cid):
                if s["status"] in ("SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT"):
                    return s
            time.sleep(0.02)
        raise AssertionError(f"no terminal status for {cid}: {self.statuses(cid)}")

    def close(self):
        self.consumer.stop()


@pytest.fixture
def rig(tmp_path):
    broker = Mosquitto().start()
    keys = tmp_path / "keys"
    generate_keypair(keys, stem="vehicle")
    generate_keypair(keys, stem="cloud")
    generate_keypair(keys, stem="doors")  # a car-sharing key: may only lock and unlock
    generate_keypair(keys, stem="rogue")  # not in the trust store
    trust = tmp_path / "trust.toml"
    trust.write_text(f"""
[[key]]
name = "fleet-backend"
public_key = "{keys / 'cloud.pub'}"
allow = ["charge.*", "doors.*", "state.*"]

[[key]]
name = "car-sharing"
public_key = "{keys / 'doors.pub'}"
allow = ["doors.*"]
""")
    channel = f"cmd-{uuid.uuid4().hex}"
    overrides = [f"bus.0.channel={channel!r}", f"storage.dir={str(tmp_path / 'state')!r}",
                 f"signing.key_file={str(keys / 'vehicle.key')!r}", f"mqtt.port={broker.port}",
                 f"commands.trust_store={str(trust)!r}", "commands.queue_size=1",
                 "commands.reject_rate_per_s=1000", "commands.reject_burst=1000",
                 "commands.redelivery_interval_ms=0",  # re-deliveries: tests of their own
                 "commands.garbage_rate_per_s=1000", "commands.garbage_burst=1000",
                 "simulator.charge_rate_pct_per_s=0.5", "mqtt.reconnect_min_s=0.1",
                 f"control.socket={str(tmp_path / 'control.sock')!r}"]

    class Rig:
        pass

    r = Rig()
    r.tmp, r.keys, r.broker, r.channel, r.overrides = tmp_path, keys, broker, channel, overrides
    r.config = load_config(ROOT / "configs" / "demo.toml", overrides)
    r.watch = BusWatch(channel)
    r.agent = Agent(r.config)
    r.agent.start()
    r.cloud = Cloud(broker, keys / "cloud.key", keys / "vehicle.pub")
    r.signer = lambda stem: Signer(load_private_key(keys / f"{stem}.key"))
    wait_ready(r.agent)
    yield r
    r.cloud.close()
    r.agent.stop()
    r.watch.close()
    broker.close()


def wait_ready(agent, timeout=10.0):
    """Connected to the broker, subscribed, and the simulated EV heard from."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        up = agent.publisher.uplink.status()
        if up["state"] == "connected" and agent.core.lookup("OBC_Status.ChargeState"):
            time.sleep(0.2)  # the subscription is acknowledged right after the CONNACK
            return
        time.sleep(0.05)
    raise AssertionError(f"agent not ready: {agent.publisher.uplink.status()}")


def assert_rejected_without_frames(r, reason, **command):
    t = time.monotonic()
    before = len(r.cloud.consumer.messages)
    cid, _ = r.cloud.command(**command)
    if reason in ("BAD_ENVELOPE", "BAD_SIGNATURE", "UNKNOWN_KEY"):
        # nothing unverified is trusted, not even the id: the answer carries id null
        cid = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(r.cloud.consumer.messages) == before:
            time.sleep(0.02)
        new = [verify(m.payload, r.cloud.vehicle_keys).payload
               for m in r.cloud.consumer.messages[before:]]
        assert len(new) == 1, new
        status = new[0]
    else:
        status = r.cloud.wait_terminal(cid)
    time.sleep(0.3)
    assert (status["id"], status["status"], status.get("reason")) == (cid, "REJECTED", reason), \
        status
    assert r.watch.requests_since(t) == [], "a rejected command reached the bus"
    if cid is not None:
        assert [s["status"] for s in r.cloud.statuses(cid)] == ["REJECTED"]  # no ACCEPTED
    return status


@pytest.mark.parametrize("name, params, check", [
    ("charge.start", {}, lambda s: s.charging),
    ("charge.set_limit", {"percent": 90}, lambda s: s.charge_limit == 90),
    ("doors.unlock", {}, lambda s: not s.locked),
    ("state.snapshot", {}, lambda s: True),
])
def test_success_paths(rig, name, params, check):
    t = time.monotonic()
    cid, _ = rig.cloud.command(name, params)
    final = rig.cloud.wait_terminal(cid)
    assert final["status"] == "SUCCEEDED", (final.get("reason"), final.get("detail"))
    assert check(rig.agent.simulator.vehicle.state)
    statuses = [s["status"] for s in rig.cloud.statuses(cid)]
    if name == "state.snapshot":
        assert statuses == ["SUCCEEDED"]
        assert "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current" in final["result"]
        assert rig.watch.requests_since(t) == []
    else:
        assert statuses[0] == "ACCEPTED"
        assert rig.watch.requests_since(t), "no request frame on the bus"


def test_stop_and_lock_after_start_and_unlock(rig):
    for name in ("charge.start", "charge.stop", "doors.unlock", "doors.lock"):
        cid, _ = rig.cloud.command(name)
        assert rig.cloud.wait_terminal(cid)["status"] == "SUCCEEDED", name
    s = rig.agent.simulator.vehicle.state
    assert not s.charging and s.locked


def test_already_in_state_succeeds_without_frames(rig):
    t = time.monotonic()
    cid, _ = rig.cloud.command("doors.lock")  # the simulated EV starts locked
    final = rig.cloud.wait_terminal(cid)
    assert final["status"] == "SUCCEEDED" and final["detail"] == "already in that state"
    assert rig.watch.requests_since(t) == []


def test_every_rejection_reason_and_no_frame(rig):
    r = rig
    now = int(time.time() * 1000)
    # forged: a valid message with one signature bit flipped
    good = r.cloud.signer.sign({"v": 1, "id": "forged-1", "vin": VIN, "name": "charge.start",
                                "params": {}, "iat": now, "exp": now + 60_000})
    forged = bytearray(good)
    forged[-3] ^= 0x01
    assert_rejected_without_frames(r, "BAD_SIGNATURE", name="charge.start", raw=bytes(forged))
    assert_rejected_without_frames(r, "UNKNOWN_KEY", name="charge.start", signer=r.signer("rogue"))
    assert_rejected_without_frames(r, "UNAUTHORIZED", name="charge.start", signer=r.signer("doors"))
    assert_rejected_without_frames(r, "WRONG_VEHICLE", name="charge.start", vin="OTHERVIN000000001")
    assert_rejected_without_frames(r, "EXPIRED", name="charge.start", iat=now - 120_000,
                                   exp=now - 60_000)
    s = assert_rejected_without_frames(r, "EXPIRED", name="charge.start", iat=now + 300_000,
                                       ttl_ms=60_000)
    assert "future" in s["detail"]
    s = assert_rejected_without_frames(r, "EXPIRED", name="charge.start", ttl_ms=3_600_000)
    assert "lifetime" in s["detail"]
    assert_rejected_without_frames(r, "UNKNOWN_COMMAND", name="charge.turbo")
    assert_rejected_without_frames(r, "BAD_PARAMS", name="charge.set_limit",
                                   params={"percent": 20})
    assert_rejected_without_frames(r, "BAD_PARAMS", name="charge.start", params={"now": True})
    r.agent.simulator.vehicle.state.plugged = False
    time.sleep(0.3)
    s = assert_rejected_without_frames(r, "PRECONDITION_FAILED", name="charge.start")
    assert "CablePlugged" in s["detail"]


def test_replay_with_other_bytes_and_identical_redelivery(rig):
    r = rig
    t = time.monotonic()
    cid, message = r.cloud.command("charge.set_limit", {"percent": 95})
    assert r.cloud.wait_terminal(cid)["status"] == "SUCCEEDED"
    sent = len(r.watch.requests_since(t))
    # the same id with other bytes: REPLAYED, nothing sent
    t2 = time.monotonic()
    r.cloud.command("charge.set_limit", {"percent": 60}, cid=cid)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(
            s.get("reason") == "REPLAYED" for s in r.cloud.statuses(cid)):
        time.sleep(0.02)
    assert any(s.get("reason") == "REPLAYED" for s in r.cloud.statuses(cid))
    # the identical bytes again (an MQTT re-delivery): the latest status again, not re-run
    before = len(r.cloud.statuses(cid))
    publish(r.broker.host, r.broker.port, f"vehicles/{VIN}/commands", message)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(r.cloud.statuses(cid)) == before:
        time.sleep(0.02)
    time.sleep(0.3)
    assert r.cloud.statuses(cid)[-1]["status"] == "SUCCEEDED"  # the stored terminal status
    assert len(r.watch.requests_since(t)) == sent and r.watch.requests_since(t2) == []
    assert r.agent.simulator.vehicle.state.charge_limit == 95


def test_busy_and_superseded(rig):
    r = rig
    state = r.agent.simulator.vehicle.state
    state.soc = 60.0
    state.fault = True  # the charger will not answer: commands stay in progress
    t = time.monotonic()
    c1, _ = r.cloud.command("charge.start")
    c2, _ = r.cloud.command("charge.start")  # waits (queue size 1)
    time.sleep(0.3)
    c3, _ = r.cloud.command("charge.start")  # the queue is full
    assert (r.cloud.wait_terminal(c3)["reason"]) == "BUSY"
    time.sleep(0.4)
    # Only c1's three repeats reached the bus: the queued c2 and the refused c3 sent nothing.
    assert len(r.watch.requests_since(t)) == 3, r.watch.requests_since(t)
    c4, _ = r.cloud.command("charge.stop")  # supersedes the running start
    assert r.cloud.wait_terminal(c1)["reason"] == "SUPERSEDED"
    assert r.cloud.wait_terminal(c2)["reason"] == "SUPERSEDED"  # waited behind c1: ends too
    assert r.cloud.wait_terminal(c4)["status"] == "SUCCEEDED"  # sent STOP, not charging


def test_a_command_cut_off_by_a_restart_ends_failed(rig):
    r = rig
    r.agent.stop()
    # No vehicle on the bus: charge.set_limit is sent but never confirmed.
    config = load_config(ROOT / "configs" / "demo.toml", r.overrides + ["simulator.enabled=false"])
    r.agent = Agent(config)
    r.agent.start()
    deadline = time.monotonic() + 10
    while not r.agent.publisher.uplink.status()["subscribed"]:
        assert time.monotonic() < deadline, r.agent.publisher.uplink.status()
        time.sleep(0.05)
    cid, _ = r.cloud.command("charge.set_limit", {"percent": 70})
    deadline = time.monotonic() + 5
    while [s["status"] for s in r.cloud.statuses(cid)] != ["ACCEPTED"]:
        assert time.monotonic() < deadline, r.cloud.statuses(cid)
        time.sleep(0.02)
    r.agent.stop()  # mid-command
    r.agent = Agent(config)
    r.agent.start()
    final = r.cloud.wait_terminal(cid)
    assert (final["status"], final["reason"]) == ("FAILED", "INTERNAL_ERROR"), final
    time.sleep(0.5)
    terminal = [s for s in r.cloud.statuses(cid) if s["status"] not in ("ACCEPTED", "IN_PROGRESS")]
    assert len(terminal) == 1, terminal


def test_no_response_times_out(rig):
    r = rig
    r.agent.simulator.vehicle.state.fault = True  # a charger fault: START is ignored
    cid, _ = r.cloud.command("charge.start")
    final = r.cloud.wait_terminal(cid, timeout=15)
    assert (final["status"], final["reason"]) == ("TIMED_OUT", "NO_RESPONSE")


def test_replay_rejected_after_restart(rig):
    r = rig
    cid, message = r.cloud.command("doors.unlock")
    assert r.cloud.wait_terminal(cid)["status"] == "SUCCEEDED"
    r.agent.stop()
    r.agent = Agent(load_config(ROOT / "configs" / "demo.toml", r.overrides))
    r.agent.start()
    wait_ready(r.agent)
    t = time.monotonic()
    r.cloud.command("doors.unlock", cid=cid)  # new bytes (other iat), same id
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(
            s.get("reason") == "REPLAYED" for s in r.cloud.statuses(cid)):
        time.sleep(0.02)
    assert any(s.get("reason") == "REPLAYED" for s in r.cloud.statuses(cid))
    assert r.watch.requests_since(t) == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(garbage=st.binary(max_size=300))
def test_garbage_never_crashes_and_is_bad_envelope(rig, garbage):
    r = rig
    before = len(r.cloud.consumer.messages)
    publish(r.broker.host, r.broker.port, f"vehicles/{VIN}/commands", garbage)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(r.cloud.consumer.messages) == before:
        time.sleep(0.01)
    new = r.cloud.consumer.messages[before:]
    assert new, "no answer to garbage"
    body = verify(new[-1].payload, r.cloud.vehicle_keys).payload
    assert (body["id"], body["status"], body["reason"]) == (None, "REJECTED", "BAD_ENVELOPE")
    assert r.agent._core_thread.is_alive()


def test_status_shows_command_counters(rig):
    rig.cloud.command("charge.turbo")
    time.sleep(0.5)
    status = rig.agent.status()
    assert status["counters"]["commands.received"] >= 1
    assert status["counters"]["commands.rejected.UNKNOWN_COMMAND"] == 1
    assert json.dumps(status)  # what `tcu-agent status` reads


def test_flood_of_garbage_is_rate_limited(rig):
    r = rig
    r.agent.stop()
    r.agent = Agent(load_config(ROOT / "configs" / "demo.toml", r.overrides + [
        "commands.reject_rate_per_s=2", "commands.reject_burst=3"]))
    r.agent.start()
    wait_ready(r.agent)
    before = len(r.cloud.consumer.messages)
    for i in range(30):
        publish(r.broker.host, r.broker.port, f"vehicles/{VIN}/commands", b"junk%d" % i)
    time.sleep(1.0)
    answers = len(r.cloud.consumer.messages) - before
    counters = r.agent.status()["counters"]
    assert counters["commands.received"] == 30
    assert 3 <= answers <= 6  # the burst, plus what refilled at 2/s
    assert counters["commands.flood_dropped"] >= 20
    time.sleep(1.0)  # after the flood, a genuine command is served again
    cid, _ = r.cloud.command("state.snapshot")
    assert r.cloud.wait_terminal(cid)["status"] == "SUCCEEDED"


def test_tcu_cloud_command_and_listen(rig):
    """The reference cloud tool, as a developer runs it."""
    import subprocess
    import sys

    r = rig
    base = ["--broker", f"{r.broker.host}:{r.broker.port}", "--vin", VIN]

    def tool(*args):
        return subprocess.run([sys.executable, "-m", "agent.cloud.main", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    ok = tool("command", *base, "--key", str(r.keys / "cloud.key"), "--name",
              "charge.set_limit", "--param", "percent=85", "--pub", str(r.keys / "vehicle.pub"))
    lines = [json.loads(line) for line in ok.stdout.splitlines()]
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert [x["status"] for x in lines] == ["ACCEPTED", "SUCCEEDED"]
    assert all(x["verified"] for x in lines)
    bad = tool("command", *base, "--key", str(r.keys / "cloud.key"), "--name", "charge.turbo",
               "--pub", str(r.keys / "vehicle.pub"))
    assert bad.returncode == 1 and json.loads(bad.stdout.splitlines()[-1])["reason"] == \
        "UNKNOWN_COMMAND"
    listen = tool("listen", *base, "--pub", str(r.keys / "vehicle.pub"), "--count", "3",
                  "--duration", "20")
    got = [json.loads(line) for line in listen.stdout.splitlines()]
    assert listen.returncode == 0 and len(got) == 3 and all(g["verified"] for g in got)
    wrong = tool("listen", *base, "--pub", str(r.keys / "cloud.pub"), "--count", "1",
                 "--duration", "20")  # the wrong key: every message is flagged
    flagged = json.loads(wrong.stdout.splitlines()[0])
    assert wrong.returncode == 1 and flagged["verified"] is False
    assert flagged["error"] == "UNKNOWN_KEY"


def test_trust_store_reload_on_sighup(rig):
    r = rig
    cid, _ = r.cloud.command("state.snapshot")
    assert r.cloud.wait_terminal(cid)["status"] == "SUCCEEDED"
    trust = r.config.commands.trust_store
    trust.write_text(trust.read_text().split("[[key]]\nname = \"car-sharing\"")[0]
                     .replace('name = "fleet-backend"', 'name = "fleet-backend-removed"')
                     .replace(str(r.keys / "cloud.pub"), str(r.keys / "doors.pub"))
                     .replace('["charge.*", "doors.*", "state.*"]', '["doors.*"]'))
    r.agent.reload_trust()  # what SIGHUP does in `tcu-agent run`
    time.sleep(0.3)
    assert_rejected_without_frames(r, "UNKNOWN_KEY", name="state.snapshot")
    ok, _ = r.cloud.command("doors.unlock", signer=r.signer("doors"))
    assert r.cloud.wait_terminal(ok)["status"] == "SUCCEEDED"


def test_can_write_error_is_write_failed(tmp_path):
    """An slcan adapter that vanishes between the vehicle's last frames and the command."""
    import os

    import cantools

    from agent.config import load_config as load

    db = cantools.database.load_file(str(ROOT / "dbc" / "demo_ev.dbc"))
    master, slave = os.openpty()
    link = tmp_path / "ttyCAN0"
    link.symlink_to(os.ttyname(slave))
    keys = tmp_path / "keys"
    generate_keypair(keys, stem="vehicle")
    generate_keypair(keys, stem="cloud")
    trust = tmp_path / "trust.toml"
    trust.write_text(f'[[key]]\nname = "c"\npublic_key = "{keys / "cloud.pub"}"\n'
                     'allow = ["charge.*"]\n')
    with Mosquitto() as broker:
        config = load(ROOT / "configs" / "demo.toml", [
            "bus.0.interface='slcan'", f"bus.0.channel={str(link)!r}",
            "bus.0.options={sleep_after_open = 0}", "simulator.enabled=false",
            f"storage.dir={str(tmp_path / 'state')!r}",
            f"signing.key_file={str(keys / 'vehicle.key')!r}", f"mqtt.port={broker.port}",
            f"commands.trust_store={str(trust)!r}"])
        agent = Agent(config)
        agent.readers[0].backoff_s = 5.0  # stays down once unplugged
        agent.start()
        cloud = Cloud(broker, keys / "cloud.key", keys / "vehicle.pub")
        try:
            obc, vcu = db.get_message_by_name("OBC_Status"), db.get_message_by_name("VCU_Status")
            assert agent.readers[0].wait_open(5)
            for msg, values in ((obc, {"CablePlugged": 1, "ChargeState": 0, "ChargeLimit": 80,
                                       "ChargeCurrent": 0, "ChargeVoltageAC": 230,
                                       "OBC_Counter": 0}),
                                (vcu, {"VehicleSpeed": 0, "Gear": 0, "Ready": 1,
                                       "BrakePressed": 0, "Odometer": 1, "VCU_Counter": 0,
                                       "VCU_Checksum": 0})):
                os.write(master, f"t{msg.frame_id:03X}8{msg.encode(values).hex().upper()}\r"
                         .encode())
            deadline = time.monotonic() + 10
            while not (agent.core.lookup("OBC_Status.CablePlugged") and
                       agent.core.lookup("VCU_Status.Gear") and
                       agent.publisher.uplink.status()["state"] == "connected"):
                assert time.monotonic() < deadline, "agent not ready"
                time.sleep(0.05)
            time.sleep(0.3)
            os.close(master)  # unplugged: the reader fails and closes the bus
            os.close(slave)
            link.unlink()
            deadline = time.monotonic() + 5
            while agent.readers[0].state != "down":
                assert time.monotonic() < deadline, "bus not down"
                time.sleep(0.02)
            cid, _ = cloud.command("charge.start")  # preconditions still fresh (< 2 s)
            final = cloud.wait_terminal(cid)
            assert (final["status"], final["reason"]) == ("FAILED", "WRITE_FAILED"), final
            assert [s["status"] for s in cloud.statuses(cid)] == ["ACCEPTED", "FAILED"]
        finally:
            cloud.close()
            agent.stop()
