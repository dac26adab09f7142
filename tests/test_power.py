"""The parked car end to end: the simulated EV sleeps and wakes on the virtual bus, the agent
follows it and tells the cloud over a real Mosquitto; commands on the sleeping car; protect
on a sagging 12 V battery; listen-only buses."""

from __future__ import annotations

import time
import tomllib
import uuid

import can
import pytest

from agent.adapters.keys import generate_keypair, load_public_key
from agent.app.runtime import Agent
from agent.config import config_from_dict
from agent.core.cose import kid_of, verify
from agent.errors import BusError
from conftest import ROOT
from support.mosquitto import Consumer, Mosquitto
from test_commands_e2e import BusWatch, Cloud, wait_ready

pytestmark = pytest.mark.mqtt

VIN = "DEMO0EV0000000001"
NM_TCU = 0x500


def wait_until(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Feed:
    """Everything the vehicle publishes, verified, with the time it arrived."""

    def __init__(self, broker, vehicle_pub):
        vk = load_public_key(str(vehicle_pub))
        self.keys = {kid_of(vk): vk}
        self.consumer = Consumer(broker.host, broker.port, f"vehicles/{VIN}/#").start()

    def records(self, kind: str) -> list[dict]:
        return [verify(m.payload, self.keys).payload for m in self.consumer.messages
                if m.topic.endswith("/" + kind)]

    def count(self, kind: str) -> int:
        return sum(1 for m in self.consumer.messages if m.topic.endswith("/" + kind))

    def statuses(self) -> list[dict]:
        return self.records("status")

    def batches(self) -> list[dict]:
        return self.records("telemetry")

    def close(self):
        self.consumer.stop()


@pytest.fixture
def car(tmp_path, request):
    broker = Mosquitto().start()
    keys = tmp_path / "keys"
    generate_keypair(keys, stem="vehicle")
    generate_keypair(keys, stem="cloud")
    trust = tmp_path / "trust.toml"
    trust.write_text(f"""
[[key]]
name = "fleet-backend"
public_key = "{keys / 'cloud.pub'}"
allow = ["charge.*", "doors.*", "state.*"]
""")
    channel = f"pwr-{uuid.uuid4().hex}"
    raw = tomllib.loads((ROOT / "configs" / "demo.toml").read_text())
    raw["bus"][0]["channel"] = channel
    raw["storage"]["dir"] = str(tmp_path / "state")
    raw["signing"]["key_file"] = str(keys / "vehicle.key")
    raw["mqtt"].update(port=broker.port, reconnect_min_s=0.1)
    raw["commands"]["trust_store"] = str(trust)
    raw["power"].update(sleep_after_s=1.0, heartbeat_s=10.0)
    for action in raw["commands"]["action"]:
        if action["name"] == "doors.lock":  # the one action without wake frames
            del action["wake"]
    config = config_from_dict(raw, base=ROOT / "configs")

    class Car:
        pass

    c = Car()
    c.broker, c.config, c.channel = broker, config, channel
    c.watch = BusWatch(channel)
    c.feed = Feed(broker, keys / "vehicle.pub")
    c.agent = Agent(config)
    c.agent.start()
    c.cloud = Cloud(broker, keys / "cloud.key", keys / "vehicle.pub")
    wait_ready(c.agent)
    c.sim = c.agent.simulator.vehicle
    yield c
    c.cloud.close()
    c.feed.close()
    c.agent.stop()
    c.watch.close()
    broker.close()


def power_states(car) -> list[str]:
    return [s.get("power", "awake") for s in car.feed.statuses() if s["online"]]


def sleep_car(car):
    car.sim.state.asleep = True
    wait_until(lambda: car.agent.power.state == "asleep", what="asleep")
    wait_until(lambda: power_states(car)[-1:] == ["asleep"], what="the asleep status")


def test_sleep_then_wake(car):
    sleep_car(car)
    status = car.agent.status()
    assert status["power"]["state"] == "asleep"
    assert "every bus silent" in status["power"]["reason"]
    # no null storm: nothing in the batches says the signals went missing
    nulls = [(name, v) for b in car.feed.batches() for name, samples in b["sig"].items()
             for _, v in samples if v is None]
    assert nulls == []
    # while asleep: no telemetry at all (the slow heartbeat is 10 s away)
    batches = car.feed.count("telemetry")
    time.sleep(3.0)
    assert car.feed.count("telemetry") == batches
    assert car.agent.core.quiet
    # wake: the first frame -> status without `power`, data within 2 s
    t_wake = time.monotonic()
    car.sim.state.asleep = False
    wait_until(lambda: car.feed.count("telemetry") > batches, timeout=5, what="a batch")
    assert time.monotonic() - t_wake < 2.0
    wait_until(lambda: power_states(car)[-1:] == ["awake"], what="the awake status")
    assert car.agent.power.state == "awake" and not car.agent.core.quiet
    fresh = car.feed.batches()[-1]
    assert all(v is not None for samples in fresh["sig"].values() for _, v in samples)


def test_slow_heartbeat_while_asleep(car):
    sleep_car(car)
    n = len(power_states(car))
    wait_until(lambda: len(power_states(car)) > n, timeout=15, what="a heartbeat")
    assert power_states(car)[-1] == "asleep"
    assert car.agent.status()["power"]["heartbeats"] >= 1


def test_command_with_wake_frames_wakes_the_car(car):
    sleep_car(car)
    t = time.monotonic()
    cid, _ = car.cloud.command("doors.unlock")
    final = car.cloud.wait_terminal(cid)
    assert final["status"] == "SUCCEEDED", final
    statuses = car.cloud.statuses(cid)
    assert statuses[0]["status"] == "ACCEPTED" and statuses[0]["detail"] == "waking the vehicle"
    sent = [f for f in car.watch.frames if f[0] >= t]
    wake = [f for f in sent if f[1] == NM_TCU]
    lock = [f for f in sent if f[1] == 0x5A1]
    assert wake and lock and wake[0][0] < lock[0][0]  # woken first, then acted
    assert car.sim.wakes == 1 and not car.sim.state.locked


def test_command_without_wake_frames_is_refused_while_asleep(car):
    car.sim.state.locked = False
    time.sleep(0.3)
    sleep_car(car)
    t = time.monotonic()
    cid, _ = car.cloud.command("doors.lock")
    final = car.cloud.wait_terminal(cid)
    assert (final["status"], final["reason"]) == ("REJECTED", "PRECONDITION_FAILED")
    assert "the vehicle is asleep" in final["detail"] and "bus pt" in final["detail"]
    assert [s["status"] for s in car.cloud.statuses(cid)] == ["REJECTED"]
    assert car.watch.requests_since(t) == [] and car.sim.state.asleep


def test_protect_on_a_sagging_battery_with_hysteresis(car):
    batches = car.feed.count("telemetry")
    car.sim.state.battery_v = 11.5
    wait_until(lambda: car.agent.power.state == "protect", what="protect")
    wait_until(lambda: power_states(car)[-1:] == ["protect"], what="the protect status")
    assert "below 11.8 V" in car.agent.status()["power"]["reason"]
    time.sleep(0.5)
    during = car.feed.count("telemetry")
    car.sim.state.battery_v = 12.0  # above the threshold, below the resume level: stays
    time.sleep(1.5)
    assert car.agent.power.state == "protect"
    assert car.feed.count("telemetry") == during  # the car talks, nothing is published
    assert car.agent.power.dropped_samples > 0
    car.sim.state.battery_v = 12.4
    wait_until(lambda: car.agent.power.state == "awake", what="awake again")
    wait_until(lambda: car.feed.count("telemetry") > during, what="telemetry again")
    drop = car.feed.batches()[-1].get("drop", 0)
    assert during > batches and drop > 0  # what protect held back is reported as dropped


def test_listen_only_bus_never_carries_our_frames(tmp_path, test_dbc):
    channel = f"lo-{uuid.uuid4().hex}"
    raw = {"vehicle": {"vin": "VIN0001"}, "storage": {"dir": str(tmp_path / "state")},
           "bus": [{"name": "pt", "interface": "virtual", "channel": channel,
                    "dbc": [str(test_dbc)]}],
           "telemetry": {"messages": ["*"]}}
    agent = Agent(config_from_dict(raw, base=tmp_path), publish=False)
    watch = BusWatch(channel)
    agent.start()
    try:
        assert agent.readers[0].wait_open(2)
        assert agent.readers[0].listen_only
        with pytest.raises(BusError, match="listen-only, refusing to send"):
            agent.readers[0].send(0x123, b"\x01\x02")
        time.sleep(0.3)
        assert watch.frames == []
        assert agent.bus_status()[0]["refused_sends"] == 1
    finally:
        agent.stop()
        watch.close()
    raw["bus"][0]["listen_only"] = False  # said in the config: writable
    agent = Agent(config_from_dict(raw, base=tmp_path), publish=False)
    assert not agent.readers[0].listen_only


def test_a_bus_with_actions_is_writable_and_one_without_is_not(tmp_path):
    raw = tomllib.loads((ROOT / "configs" / "demo.toml").read_text())
    raw["storage"]["dir"] = str(tmp_path / "state")
    raw["bus"].append({"name": "body", "interface": "virtual", "channel": "x",
                       "dbc": ["../dbc/demo_ev.dbc"]})
    raw["simulator"]["enabled"] = False
    del raw["mqtt"], raw["commands"]
    agent = Agent(config_from_dict(raw, base=ROOT / "configs"), publish=False)
    assert [r.listen_only for r in agent.readers] == [True, True]  # no commands: no writing
    raw = tomllib.loads((ROOT / "configs" / "demo.toml").read_text())
    raw["bus"].append({"name": "body", "interface": "virtual", "channel": "x",
                       "dbc": ["../dbc/demo_ev.dbc"]})
    from agent.app.runtime import _written_buses
    from agent.app.assemble import bus_plans
    cfg = config_from_dict(raw, base=ROOT / "configs")
    assert _written_buses(cfg, bus_plans(cfg)) == {0}  # actions find their messages on pt


# -- the power service on a real core, a real notify socket, a real command ---------------

def test_service_tells_systemd_and_runs_the_on_sleep_command(tmp_path, test_dbc, caplog):
    import logging
    import socket
    import sys

    import cantools

    from agent.adapters.sdnotify import Notifier
    from agent.app.assemble import plans_for_dbc, telemetry_core
    from agent.app.power import PowerService
    from agent.config import PowerConfig, TelemetryConfig

    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    marker = tmp_path / "suspended"
    plans = plans_for_dbc([test_dbc], TelemetryConfig(messages=("VCU_Drive",)))
    core = telemetry_core(plans, TelemetryConfig(), live=True)
    t = time.time()
    cfg = PowerConfig(sleep_after_s=2.0, on_sleep_command=(
        sys.executable, "-c", f"open({str(marker)!r}, 'w').write('z')"))
    svc = PowerService(cfg, core, 1, notifier=Notifier({"NOTIFY_SOCKET": path}), now=t)
    drive = cantools.database.load_file(str(test_dbc)).get_message_by_name("VCU_Drive")
    core.feed(0, t, drive.frame_id, drive.encode({"Speed": 1.0, "Gear": 0, "Ready": 0}))
    svc.poll(t + 0.1)
    assert svc.state == "awake"
    svc.poll(t + 2.5)
    assert svc.state == "asleep" and core.quiet and svc.slow
    assert sock.recv(512) == b"STATUS=power asleep: every bus silent for 2 s"
    wait_until(lambda: marker.exists(), what="the on-sleep command")
    wait_until(lambda: svc.on_sleep.get("last") == "ok", what="its outcome")
    core.feed(0, t + 3, drive.frame_id, drive.encode({"Speed": 2.0, "Gear": 0, "Ready": 0}))
    svc.poll(t + 3.05)
    assert svc.state == "awake" and not core.quiet
    assert sock.recv(512) == b"STATUS=power awake: frame on bus 0"
    # a failing or hanging command is logged, never raised
    cfg = PowerConfig(sleep_after_s=1.0, on_sleep_timeout_s=0.3,
                      on_sleep_command=(sys.executable, "-c", "import time; time.sleep(5)"))
    svc = PowerService(cfg, telemetry_core(plans, TelemetryConfig(), live=True), 1, now=t)
    with caplog.at_level(logging.ERROR, logger="agent.app.power"):
        svc.poll(t + 1.5)
        wait_until(lambda: svc.on_sleep.get("last"), what="the timeout")
    assert svc.on_sleep["last"] == "timed out after 0.3 s"
    assert "on-sleep command" in caplog.text and "timed out" in caplog.text
    sock.close()


def test_asleep_gnss_fixes_and_modem_polls_slow_down(tmp_path, test_dbc):
    from agent.app.messages import Values

    raw = {"vehicle": {"vin": "VIN0001"}, "storage": {"dir": str(tmp_path / "state")},
           "bus": [{"name": "pt", "interface": "virtual", "channel": f"g-{uuid.uuid4().hex}",
                    "dbc": [str(test_dbc)]}],
           "telemetry": {"messages": ["*"]},
           "gnss": {"port": str(tmp_path / "no-gnss")},
           "modem": {"port": str(tmp_path / "no-modem"), "poll_interval_s": 30},
           "power": {"sleep_after_s": 1, "slow_poll_s": 600}}
    agent = Agent(config_from_dict(raw, base=tmp_path), publish=False)
    modem = agent.serial[0]
    t = time.time()
    fix = {"Vehicle.CurrentLocation.Latitude": 48.1}
    for i in range(5):
        agent._on_gnss(t + i, fix)  # awake: every fix
    agent.power.poll(t + 2)  # every bus silent for 1 s: asleep
    assert agent.power.state == "asleep" and modem.poll_interval_s == 600
    for i in range(2000):
        agent._on_gnss(t + 3 + i, fix)  # 2,000 s of fixes at 1 Hz while parked
    taken = []
    while True:
        try:
            taken.append(agent._other.get_nowait())
        except Exception:
            break
    assert sum(type(x) is Values for x in taken) == 5 + 4  # one per 600 s while asleep
    agent.core.feed(0, t + 2100, 0x100, bytes(8))
    agent.power.poll(t + 2100)
    assert agent.power.state == "awake" and modem.poll_interval_s == 30


def test_simulated_ev_sleeps_by_timeline_and_wakes_on_a_wake_frame():
    from agent.config import SimulatorConfig, build_section
    from agent.sim import from_config

    sim = build_section(SimulatorConfig, {"enabled": True, "battery_v": 12.3, "timeline": [
        {"at_s": 1.0, "asleep": True}, {"at_s": 5.0, "battery_v": 11.2},
        {"at_s": 8.0, "asleep": False}]}, "simulator", ROOT)
    v = from_config(sim)
    db = v.db
    nm, bcm = db.get_message_by_name("NM_TCU"), db.get_message_by_name("BCM_Status")
    t0 = 1000.0

    def frames(start, end):
        out = []
        t = start
        while t < end:
            out += v.step(t)
            t = round(t + 0.01, 2)
        return out

    assert frames(t0, t0 + 0.9)  # awake: the ECUs talk
    volts = [bcm.decode(d)["BatteryVoltage"] for i, d in frames(t0 + 0.9, t0 + 1.0)
             if i == bcm.frame_id]
    assert volts == [pytest.approx(12.3, abs=0.02)]
    assert frames(t0 + 1.0, t0 + 3.0) == []  # asleep: silence
    v.receive(0x5A1, bytes(8))  # an application frame does not wake it
    assert frames(t0 + 3.0, t0 + 4.0) == [] and v.ignored_requests == 1
    v.receive(nm.frame_id, nm.encode({"NM_SourceNode": 42, "NM_RepeatMessageRequest": 1}))
    woke = frames(t0 + 4.0, t0 + 6.0)
    assert woke and v.wakes == 1
    volts = [bcm.decode(d)["BatteryVoltage"] for i, d in woke if i == bcm.frame_id]
    assert volts[-1] == pytest.approx(11.2, abs=0.02)  # the sag from the timeline


@pytest.mark.parametrize("section, values, message", [
    ("power", {"protect_below_v": 12.0, "protect_resume_v": 11.9},
     "power: protect_resume_v must be above protect_below_v (hysteresis)"),
    ("power", {"quiet_after_ms": 10}, "power.quiet_after_ms: must be 50..60000"),
    ("power", {"on_sleep_command": "suspend"}, "power.on_sleep_command: expected an array"),
    ("modem", {"port": "/dev/x", "recovery_max_per_hour": 0}, "recovery_max_per_hour 1..60"),
])
def test_power_config_errors_are_one_line(tmp_path, test_dbc, section, values, message):
    from agent.errors import ConfigError

    raw = {"vehicle": {"vin": "V"}, "storage": {"dir": str(tmp_path)},
           "bus": [{"name": "pt", "interface": "virtual", "channel": "c", "dbc": [str(test_dbc)]}],
           section: values}
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, base=tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_wake_frames_name_messages_of_the_dbc(tmp_path):
    from agent.errors import ConfigError

    raw = tomllib.loads((ROOT / "configs" / "demo.toml").read_text())
    raw["storage"]["dir"] = str(tmp_path)
    raw["commands"]["action"][0]["wake"] = [{"message": "NM_Nope"}]
    with pytest.raises(ConfigError, match=r"commands\.action\.0\.wake\.0\.message: no message "
                                          r"'NM_Nope'"):
        Agent(config_from_dict(raw, base=ROOT / "configs"), publish=False)
