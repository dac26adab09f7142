"""`tcu-agent demo` run to completion, as a user would run it."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT
from support.mosquitto import Mosquitto


def run_demo(*args):
    proc = subprocess.run([sys.executable, "-m", "agent", "demo", "--duration", "9", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=90)
    return proc, proc.stdout


def check(proc, out):
    assert proc.returncode == 0, out + proc.stderr
    assert "demo OK" in out
    m = re.search(r"summary: (\d+) messages verified .*?, (\d+) failed verification", out)
    assert m and int(m.group(1)) >= 8 and m.group(2) == "0", out
    assert re.search(r"charge.start: SUCCEEDED in \d+ ms", out)
    assert re.search(r"charge.stop: SUCCEEDED in \d+ ms", out)
    soc = re.search(r"state of charge ([\d.]+) % -> ([\d.]+) %", out)
    assert soc and float(soc.group(2)) > float(soc.group(1))  # it charged in between
    assert "<- ACCEPTED" in out and "telemetry seq 1.." in out  # every batch seen, from 1
    assert re.search(r"LTE -\d+ dBm, at 48\.\d+,11\.\d+", out)  # modem and GNSS emulators


def test_demo_with_the_embedded_broker():
    check(*run_demo())


@pytest.mark.mqtt
def test_demo_with_mosquitto_and_mqtt5():
    with Mosquitto() as broker:
        proc, out = run_demo("--broker", f"{broker.host}:{broker.port}")
    check(proc, out)
    assert "with MQTT 5" in out
