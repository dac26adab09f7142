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


@pytest.mark.mqtt
def test_demo_and_tcu_cloud_against_rabbitmq(tmp_path):
    """RabbitMQ's MQTT plugin speaks 3.1.1 only and drops a version-5 CONNECT: the demo's
    agent and its cloud view, and tcu-cloud, fall back and say so."""
    from support.rabbitmq import RabbitMQ

    with RabbitMQ(anonymous=True) as broker:
        broker.start()
        broker.open_to_anonymous()
        proc, out = run_demo("--broker", f"{broker.host}:{broker.port}")
        check(proc, out)
        line = f"broker {broker.host}:{broker.port} works with MQTT 3.1.1; using it from now on"
        assert line in proc.stderr + out
        from agent.adapters.keys import generate_keypair
        generate_keypair(tmp_path, stem="vehicle")
        listen = subprocess.run(
            [sys.executable, "-c", "from agent.cloud.main import main; raise SystemExit(main())",
             "listen", "--broker", f"{broker.host}:{broker.port}", "--vin", "DEMO0000000000001",
             "--pub", str(tmp_path / "vehicle.pub"), "--duration", "1"],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert listen.returncode == 0, listen.stderr
        assert f"tcu-cloud: {line}\n" in listen.stderr
