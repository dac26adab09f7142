"""The time floor (agent.core.clock), its file (agent.adapters.clockstore), the gate's use of it
(the time source injected, no faketime), the status record and `tcu-agent status`."""

from __future__ import annotations

import json
import logging
import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.adapters.clockstore import ClockStore
from agent.cli.status import render
from agent.core import updates
from agent.core.clock import TrustedClock, rmc_time_ms
from agent.core.commands import Accepted, CommandGate, GateLimits, Rejected, TrustedKey, TrustStore
from agent.core.cose import Signer
from agent.core.executor import STATE_FAMILY, actions_family
from agent.core.nmea import location_values, parse_sentence
from agent.core.protocol import status_record
from agent.core.registry import Registry

VIN = "WVWZZZ1JZXW000001"
NOW = 1_767_225_600_000  # 2026-01-01T00:00:00Z
BOOT_1970 = 20_000  # what a TCU with a dead RTC battery reads, 20 s after boot
LIMITS = GateLimits(max_skew_ms=30_000, max_lifetime_ms=600_000, max_message_bytes=4096)
REGISTRY = Registry([actions_family(), STATE_FAMILY, updates.FAMILY])
CLOUD = Ed25519PrivateKey.generate()
STORE = TrustStore([TrustedKey("ops", CLOUD.public_key(), ("*",))])


def command(cid="c-1", iat=NOW - 1000, ttl=60_000) -> bytes:
    return Signer(CLOUD).sign({"v": 1, "id": cid, "vin": VIN, "name": "doors.lock",
                               "params": {}, "iat": iat, "exp": iat + ttl}, compress=False)


def never_seen(cid):
    return None


# -- the pure clock ----------------------------------------------------------------------------

def test_without_a_floor_the_system_clock_is_used():
    clock = TrustedClock()
    assert clock.now_ms(BOOT_1970, 5) == BOOT_1970 and not clock.behind
    assert clock.status()["clock"] == "ok"


def test_floor_plus_monotonic_time_when_the_system_clock_is_behind():
    clock = TrustedClock(NOW, "stored", mono_ms=1_000)
    assert clock.now_ms(BOOT_1970, 1_000) == NOW
    assert clock.behind and clock.behind_by_ms == NOW - BOOT_1970
    assert clock.now_ms(BOOT_1970 + 5_000, 6_000) == NOW + 5_000  # the bound keeps moving
    # A system clock ahead of the bound is used as it is, and is not behind.
    assert clock.now_ms(NOW + 3_600_000, 7_000) == NOW + 3_600_000 and not clock.behind
    # A little behind (a cloud clock slightly ahead raised the floor) is tolerated.
    assert clock.now_ms(NOW + 6_000 - 1_500, 7_000) == NOW + 6_000 and not clock.behind


def test_observations_only_raise_the_floor():
    clock = TrustedClock(NOW, "stored", mono_ms=0)
    assert not clock.observe(NOW - 1, 0, "command")
    assert not clock.observe(NOW + 500, 1_000, "command")  # under the bound NOW + 1000
    assert clock.observe(NOW + 5_000, 1_000, "command")
    assert clock.floor_ms == NOW + 5_000 and clock.source == "command"
    assert clock.bound_ms(3_000) == NOW + 7_000
    with pytest.raises(ValueError):
        clock.observe(NOW + 9_000, 1_000, "ntp")


def test_gnss_fix_raises_the_floor_and_measures_the_skew():
    clock = TrustedClock()
    assert clock.gnss_fix(NOW, BOOT_1970, 100, max_skew_ms=30_000)
    assert clock.skew_warning and clock.gnss_skew_ms == BOOT_1970 - NOW
    assert clock.now_ms(BOOT_1970, 100) == NOW and clock.behind
    clock.gnss_fix(NOW + 1_000, NOW + 1_200, 1_100, max_skew_ms=30_000)
    assert not clock.skew_warning and clock.gnss_skew_ms == 200
    # A system clock ahead of GNSS is reported too (the floor cannot correct that).
    clock.gnss_fix(NOW + 2_000, NOW + 3_602_000, 2_100, max_skew_ms=30_000)
    assert clock.skew_warning and clock.status()["gnss_skew_ms"] == 3_600_000


def test_rmc_time_only_from_a_valid_fix():
    valid = location_values(parse_sentence(
        "$GPRMC,000000.00,A,5230.0000,N,01322.0000,E,0.0,0.0,010126,,,A*5C"))
    assert rmc_time_ms(valid) == NOW
    void = location_values(parse_sentence(
        "$GPRMC,000000.00,V,,,,,,,010126,,,N*79"))
    assert "Vehicle.CurrentLocation.Timestamp" in void and rmc_time_ms(void) is None
    gga = location_values(parse_sentence(
        "$GPGGA,000000.00,5230.0000,N,01322.0000,E,1,08,0.9,35.0,M,0.0,M,,*6D"))
    assert rmc_time_ms(gga) is None


# -- the gate, its time source injected --------------------------------------------------------

def test_a_gate_booted_in_1970_checks_against_the_floor():
    # Without the floor, a fresh command looks issued 56 years in the future.
    plain = CommandGate(STORE, VIN, LIMITS, REGISTRY)
    outcome = plain.check(command(), BOOT_1970, never_seen)
    assert isinstance(outcome, Rejected) and outcome.detail == "issued in the future"

    clock = TrustedClock(NOW - 5_000, "stored", mono_ms=0)
    gate = CommandGate(STORE, VIN, LIMITS, REGISTRY, clock=clock)
    outcome = gate.check(command(), BOOT_1970, never_seen, mono_ms=2_000)
    assert isinstance(outcome, Accepted), outcome
    assert clock.floor_ms == NOW - 1000 and clock.source == "command"  # its iat raised the floor
    assert clock.behind

    # A command captured before the floor is expired, though the system clock says 1970.
    old = command("c-old", iat=NOW - 120_000)
    assert isinstance(plain.check(old, BOOT_1970, never_seen), Rejected)
    outcome = gate.check(old, BOOT_1970, never_seen, mono_ms=3_000)
    assert isinstance(outcome, Rejected) and outcome.reason == "EXPIRED"
    assert outcome.detail.startswith("expired")


def test_only_accepted_commands_raise_the_floor():
    clock = TrustedClock(NOW, "stored", mono_ms=0)
    gate = CommandGate(STORE, VIN, LIMITS, REGISTRY, clock=clock)
    far = command("c-far", iat=NOW + 3_600_000)  # genuine, signed, but an hour ahead
    outcome = gate.check(far, NOW, never_seen, mono_ms=0)
    assert isinstance(outcome, Rejected) and outcome.reason == "EXPIRED"
    assert clock.floor_ms == NOW
    wrong_vin = Signer(CLOUD).sign({"v": 1, "id": "c-v", "vin": "OTHER", "name": "doors.lock",
                                    "params": {}, "iat": NOW + 20_000, "exp": NOW + 80_000})
    assert gate.check(wrong_vin, NOW, never_seen, mono_ms=0).reason == "WRONG_VEHICLE"
    assert clock.floor_ms == NOW


# -- the file ----------------------------------------------------------------------------------

class Mono:
    def __init__(self):
        self.ms = 0

    def __call__(self):
        return self.ms


def test_floor_survives_a_restart_and_keeps_up_with_running_time(tmp_path):
    mono = Mono()
    store = ClockStore(tmp_path, save_interval_ms=60_000, mono=mono)
    assert store.clock.floor_ms == 0 and not (tmp_path / "clock.json").exists()
    store.tick()
    assert not (tmp_path / "clock.json").exists()  # nothing to keep yet
    store.observed(store.clock.observe(NOW, mono(), "gnss"))
    assert json.loads((tmp_path / "clock.json").read_text()) == {"floor_ms": NOW, "source": "gnss"}
    assert os.stat(tmp_path / "clock.json").st_mode & 0o777 == 0o600
    mono.ms = 30_000
    store.tick()  # not yet an interval
    assert json.loads((tmp_path / "clock.json").read_text())["floor_ms"] == NOW
    mono.ms = 61_000
    store.tick()
    assert json.loads((tmp_path / "clock.json").read_text())["floor_ms"] == NOW + 61_000
    # A floor raised by the gate (no explicit call) is saved at the next tick.
    store.clock.observe(NOW + 100_000, mono(), "command")
    store.tick()
    assert json.loads((tmp_path / "clock.json").read_text()) == {"floor_ms": NOW + 100_000,
                                                                 "source": "command"}

    mono.ms = 5  # a new boot: monotonic time starts again
    again = ClockStore(tmp_path, mono=mono)
    assert again.clock.floor_ms == NOW + 100_000 and again.loaded_source == "command"
    assert again.clock.now_ms(BOOT_1970, 5) == NOW + 100_000 and again.clock.behind
    assert not list(tmp_path.glob(".clock.json.*"))  # no temp file left behind


def test_gnss_fixes_keeping_pace_are_not_written_each_second(tmp_path):
    """A fix a second, the monotonic clock a little slow (here 1 ms/s): nearly every fix
    raises the floor by a few ms. Stored once, then only every save interval or when the
    floor jumps by RAISE_MIN_MS or more."""
    mono = Mono()
    store = ClockStore(tmp_path, save_interval_ms=60_000, mono=mono)
    path = tmp_path / "clock.json"
    raised = writes = 0
    inode = None
    for second in range(59):
        mono.ms = second * 1000
        jitter = (3, -2, 1, 0)[second % 4]
        was = store.clock.bound_ms(mono.ms)
        store.observed(store.clock.gnss_fix(NOW + second * 1001 + jitter, NOW, mono.ms, 30_000))
        raised += store.clock.bound_ms(mono.ms) > was
        store.tick()
        if path.stat().st_ino != inode:
            writes, inode = writes + 1, path.stat().st_ino
    assert raised >= 10 and writes == 1  # the first fix only
    store.observed(store.clock.gnss_fix(NOW + 60_000, NOW, mono.ms, 30_000))  # a 2 s jump
    assert json.loads(path.read_text())["floor_ms"] == NOW + 60_000
    mono.ms = 58_000 + 60_000
    store.tick()  # the interval
    assert json.loads(path.read_text())["floor_ms"] == NOW + 120_000


@pytest.mark.parametrize("text", ["", "{", "[]", '{"floor_ms": "x", "source": "gnss"}',
                                  '{"floor_ms": -1, "source": "gnss"}',
                                  '{"floor_ms": 5, "source": "sundial"}'])
def test_a_corrupt_file_means_no_floor(tmp_path, caplog, text):
    (tmp_path / "clock.json").write_text(text)
    with caplog.at_level(logging.ERROR, logger="agent.clock"):
        store = ClockStore(tmp_path)
    assert store.clock.floor_ms == 0 and "unreadable" in caplog.text


# -- what the vehicle says -----------------------------------------------------------------------

def test_status_record_clock_field():
    assert "clock" not in status_record(VIN, 1, True)
    assert status_record(VIN, 1, True, clock="behind")["clock"] == "behind"
    with pytest.raises(ValueError):
        status_record(VIN, 1, True, clock="late")


def test_status_cli_shows_the_clock():
    clock = TrustedClock(NOW, "stored", mono_ms=0)
    clock.gnss_fix(NOW, BOOT_1970, 0, 30_000)
    clock.now_ms(BOOT_1970, 0)
    text = render({"pid": 1, "vin": VIN, "started_ms": 0, "clock": clock.status()})
    line = next(l for l in text.splitlines() if l.startswith("clock"))
    assert "behind" in line and "2026-01-01T00:00:00Z" in line and "checks use the floor" in line
    assert "OFF BY MORE THAN THE ALLOWED SKEW" in line
    ok = TrustedClock()
    ok.now_ms(NOW, 0)
    assert "clock     ok, floor none yet" in render({"clock": ok.status()})


@pytest.mark.mqtt
def test_agent_behind_its_floor_says_so_on_the_wire_and_in_status(tmp_path, test_dbc):
    from support.agentproc import AgentProcess, SlcanFeeder, Verifier, wait_for
    from support.mosquitto import Consumer, Mosquitto

    ahead = NOW + 10 * 365 * 86_400_000  # a floor ten years ahead: this machine is "behind"
    feeder = SlcanFeeder(tmp_path, test_dbc).start()
    try:
        with Mosquitto() as broker, Consumer(broker.host, broker.port, "vehicles/#") as c:
            agent = AgentProcess(tmp_path, test_dbc, feeder.link,
                                 {"host": broker.host, "port": broker.port})
            agent.storage.mkdir(parents=True, exist_ok=True)
            (agent.storage / "clock.json").write_text(json.dumps({"floor_ms": ahead,
                                                                   "source": "gnss"}))
            agent.start()
            try:
                v = Verifier(agent.public_key)
                wait_for(lambda: v.check(c.messages).get("status"), what="the online record")
                assert v.check(c.messages)["status"][0]["clock"] == "behind"
                wait_for(lambda: "behind" in agent.cli("status").stdout, what="status: behind")
                line = next(l for l in agent.cli("status").stdout.splitlines()
                            if l.startswith("clock"))
                assert "checks use the floor" in line and "(from stored)" in line
            finally:
                agent.close()
    finally:
        feeder.close()


def test_publisher_takes_gnss_time_into_the_floor(tmp_path, test_dbc, caplog):
    from agent.adapters.keys import generate_keypair
    from agent.app.publisher import Publisher
    from agent.config import config_from_dict

    generate_keypair(tmp_path / "keys")
    config = config_from_dict(
        {"vehicle": {"vin": VIN}, "storage": {"dir": str(tmp_path / "state")},
         "bus": [{"name": "a", "interface": "virtual", "channel": "x", "dbc": [str(test_dbc)]}],
         "signing": {"key_file": str(tmp_path / "keys" / "vehicle.key")},
         "mqtt": {"host": "127.0.0.1", "port": 1}}, base=tmp_path)
    pub = Publisher(config)
    try:
        assert pub._status_record(True)["clock"] == "ok"
        fix = location_values(parse_sentence(
            "$GPRMC,000000.00,A,5230.0000,N,01322.0000,E,0.0,0.0,010126,,,A*5C"))
        with caplog.at_level(logging.WARNING, logger="agent.app.publisher"):
            pub.gnss_values(fix, BOOT_1970)  # received when the system clock said 1970
        assert "off GNSS time" in caplog.text
        saved = json.loads((tmp_path / "state" / "clock.json").read_text())
        assert saved["source"] == "gnss" and saved["floor_ms"] >= NOW
        # The real system clock (2026 or later, as this test runs) is not behind 2026-01-01.
        assert pub._status_record(True)["clock"] == "ok"
        assert pub.status()["clock"]["gnss_skew_warning"] is True
    finally:
        pub.outbox.close()
