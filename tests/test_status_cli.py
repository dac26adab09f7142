"""`tcu-agent status`: the rendering of a real agent's status, and the command end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from agent.cli.status import render
from conftest import ROOT
from test_commands_e2e import rig  # noqa: F401  (the fixture: an agent, Mosquitto, the EV)

COUNTER = re.compile(r"^\s+(commands\.[\w.]+)\s+(\d+)$")


def real_status(r) -> dict:
    """What `tcu-agent status` reads: the agent's status through JSON."""
    r.cloud.command("charge.turbo")  # one rejection, so some counters are non-zero
    deadline = time.monotonic() + 5
    while r.agent.status()["counters"].get("commands.rejected") != 1:
        assert time.monotonic() < deadline, r.agent.status()["counters"]
        time.sleep(0.05)
    return json.loads(json.dumps({**r.agent.status(), "pid": 4242}, default=str))


@pytest.mark.mqtt
def test_render_separates_counter_names_and_values(rig):  # noqa: F811
    status = real_status(rig)
    status["update"] = {"state": "STAGED", "command_id": "c-1", "target": "tcu-2.1.0.raucb",
                        "version": "2.1.0", "installed_version": "2.0.0", "reason": None,
                        "detail": None}
    status.setdefault("modem", {"state": "up", "port": "/dev/ttyUSB2", "last_error": ""})
    status["modem"].setdefault("values", {
        "Vehicle.Connectivity.Cellular.Operator": "Telekom.de",
        "Vehicle.Connectivity.Cellular.SignalStrength": -71})
    status.setdefault("gnss", {"state": "up", "port": "/dev/ttyACM0"})
    status["gnss"].setdefault("values", {"Vehicle.CurrentLocation.Latitude": 48.137154})

    text = render(status)
    counters = dict(m.groups() for m in map(COUNTER.match, text.splitlines()) if m)
    assert counters["commands.received"] == "1"
    assert counters["commands.rejected"] == "1"
    assert counters["commands.rejected.UNKNOWN_COMMAND"] == "1"
    assert counters["commands.accepted"] == "0"  # zero, still shown
    assert set(status["counters"]) <= set(counters)
    # the values line up: one column, after the longest name
    columns = {line.index(value, len(name) + 2)
               for line in text.splitlines() if (m := COUNTER.match(line))
               for name, value in [m.groups()]}
    assert len(columns) == 1, text
    assert "trusted keys 2" in text and f"replay ids {status['replay_ids']}" in text
    assert re.search(r"^update\s+STAGED, installed 2\.0\.0, target tcu-2\.1\.0\.raucb "
                     r"version 2\.1\.0$", text, re.M), text
    for section in ("modem", "gnss"):
        assert re.search(rf"^{section}\s+state up", text, re.M), text
        for name, value in status[section]["values"].items():
            assert re.search(rf"^\s+{re.escape(name)}\s+{re.escape(str(value))}$", text,
                             re.M), text
    assert re.search(r"^uplink\s+connected to 127\.0\.0\.1:\d+", text, re.M), text
    assert re.search(r"^bus pt\s+open virtual:", text, re.M), text


def test_render_minimal_status():
    """An agent without commands, updates, modem or GNSS: nothing invented, nothing fails."""
    text = render({"vin": "V1", "pid": 7, "started_ms": int(time.time() * 1000),
                   "buses": [], "modem": {"state": "down", "port": "/dev/ttyUSB2"}})
    assert text.splitlines()[0].startswith("agent     pid 7, vin V1")
    assert "commands" not in text and "update" not in text
    assert re.search(r"^modem\s+state down, port /dev/ttyUSB2$", text, re.M), text


@pytest.mark.mqtt
def test_status_command_against_running_agent(rig):  # noqa: F811
    rig.cloud.command("charge.turbo")
    status_file = rig.config.storage.dir / "status.json"
    deadline = time.monotonic() + 10
    while not (status_file.exists() and '"commands.received"' in status_file.read_text()):
        assert time.monotonic() < deadline, "the agent wrote no status with the command"
        time.sleep(0.1)
    sets = [a for o in rig.overrides for a in ("--set", o)]
    run = subprocess.run([sys.executable, "-m", "agent", "status", "-c",
                          str(ROOT / "configs" / "demo.toml"), *sets],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert re.search(rf"^uplink\s+connected to {rig.broker.host}:{rig.broker.port}", out,
                     re.M), out
    assert re.search(r"^\s+commands\.received\s+1$", out, re.M), out
    assert re.search(r"^\s+commands\.accepted\s+0$", out, re.M), out


def test_render_shows_core_loop_failures():
    status = {"pid": 1, "vin": "V", "started_ms": 0, "core_failures": 7,
              "failures_by_step": {"records": 7}}
    text = render(status)
    assert "FAILURES" in text and "7 in the core loop" in text and "records 7" in text
    assert "FAILURES" not in render({**status, "core_failures": 0})


def test_render_power_link_and_listen_only():
    now = time.time() * 1000
    status = {"pid": 1, "vin": "V", "started_ms": now - 5000,
              "power": {"state": "asleep", "reason": "every bus silent for 60 s",
                        "since_ms": now - 125_000, "volts": 12.41, "entered": {},
                        "heartbeats": 2, "dropped_samples": 0},
              "modem": {"state": "open", "port": "/dev/ttyUSB2",
                        "recovery": {"steps": {"reread": 1}, "last": "reread: x"}},
              "link_recovery": {"state": "escalating", "steps": {"reread": 1, "radio": 1,
                                                                 "reset": 0},
                                "capped": 0, "recoveries": 3, "last_step": "radio"},
              "buses": [{"name": "pt", "state": "open", "interface": "socketcan",
                         "channel": "can0", "frames": 0, "fps": 0.0, "unknown_ids": 0,
                         "decode_errors": 0, "bad_length": 0, "bus_errors": 0, "reopens": 0,
                         "listen_only": True, "refused_sends": 4}]}
    text = render(status)
    assert re.search(r"^power\s+asleep for 2m0[45]s \(every bus silent for 60 s\), 12 V battery "
                     r"12\.41 V, heartbeats 2, dropped samples 0$", text, re.M), text
    assert re.search(r"^link\s+recovery escalating: steps reread 1, radio 1, reset 0; capped 0, "
                     r"recoveries 3, last radio$", text, re.M), text
    assert "recovery" not in next(line for line in text.splitlines() if line.startswith("modem"))
    assert "listen-only (sends refused 4)" in text
    status["link_recovery"] = {"state": "ModemManager owns the modem: observing only"}
    assert re.search(r"^link\s+ModemManager owns the modem: observing only$", render(status),
                     re.M)
