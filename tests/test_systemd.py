"""The systemd unit (checked by systemd-analyze) and the sd_notify client on a real socket."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from agent.adapters.sdnotify import Notifier, Watchdog, watchdog_interval_s

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "tcu-agent.service"
EXEC = "/opt/tcu-agent/venv/bin/tcu-agent"
MAX_EXPOSURE = 2.0


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if not found:
        pytest.skip("needs systemd-analyze: run .ci/install-system-deps (Debian package systemd)")
    return found


def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


# -- the unit ------------------------------------------------------------------------------

def test_unit_declares_the_service_contract():
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["ExecStart"] == [f"{EXEC} run -c /etc/tcu-agent/agent.toml"]
    assert s["Restart"] == ["on-failure"]
    assert s["WatchdogSec"] and s["StateDirectory"] == ["tcu-agent"]
    assert s["ConfigurationDirectory"] == ["tcu-agent"]
    # the control socket's folder: the config default lives there, group members may enter
    from agent.config import ControlConfig
    assert s["RuntimeDirectory"] == ["tcu-agent"] and s["RuntimeDirectoryMode"] == ["0750"]
    assert ControlConfig().socket.parent == Path("/run") / s["RuntimeDirectory"][0]
    assert s.get("User") == ["tcu-agent"] or s.get("DynamicUser") == ["yes"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "PrivateDevices": "yes",
                       "MemoryDenyWriteExecute": "yes", "CapabilityBoundingSet": ""}.items():
        assert s[key] == [value], key
    assert set(s["RestrictAddressFamilies"][0].split()) == {
        "AF_CAN", "AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}
    assert "@system-service" in s["SystemCallFilter"]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    analyze = systemd_analyze()
    # verify insists that ExecStart= is executable: point it at a stand-in in a temp dir
    # (everything else in the unit is checked as shipped).
    stand_in = tmp_path / "opt" / "tcu-agent" / "venv" / "bin" / "tcu-agent"
    stand_in.parent.mkdir(parents=True)
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    unit = tmp_path / "tcu-agent.service"
    text = UNIT.read_text()
    assert text.count(f"ExecStart={EXEC} ") == 1
    unit.write_text(text.replace(f"ExecStart={EXEC} ", f"ExecStart={stand_in} "))
    r = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "tcu-agent.service" not in r.stderr, r.stderr + r.stdout


def test_systemd_analyze_security_exposure_is_low():
    analyze = systemd_analyze()
    r = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", str(UNIT)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for tcu-agent\.service:\s*([0-9.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, r.stdout


def test_pkcs11_drop_in_keeps_the_exposure_low(tmp_path):
    """systemd/pkcs11.conf (a TPM device, SoftHSM2's config) merged into the unit: still <= 2.0,
    nothing it relies on for reaching the module is hidden, and the rest stays hardened."""
    analyze = systemd_analyze()
    drop_in = (ROOT / "systemd" / "pkcs11.conf").read_text()
    assert drop_in.count("[Service]") == 1
    lines = drop_in.split("[Service]", 1)[1].strip()
    merged = tmp_path / "tcu-agent.service"
    merged.write_text(UNIT.read_text().replace("[Install]", f"{lines}\n\n[Install]"))
    r = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", str(merged)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for tcu-agent\.service:\s*([0-9.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, r.stdout
    settings = {}
    for line in merged.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    # The module lives under /usr/lib: readable with ProtectSystem=strict, never made inaccessible.
    assert settings["ProtectSystem"] == ["strict"] and "InaccessiblePaths" not in settings
    assert settings["MemoryDenyWriteExecute"] == ["yes"] and settings["DevicePolicy"][-1] == "closed"
    assert "/dev/tpmrm0 rw" in settings["DeviceAllow"]


# -- sd_notify on a real datagram socket ----------------------------------------------------

class NotifySocket:
    """What systemd does: an AF_UNIX datagram socket whose address goes into NOTIFY_SOCKET."""

    def __init__(self, address: str | bytes):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(2.0)

    def recv(self) -> list[str]:
        return self.sock.recv(4096).decode().split("\n")

    def drain(self) -> list[list[str]]:
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096).decode().split("\n"))
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(2.0)
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_path(tmp_path):
    path = str(tmp_path / "notify.sock")
    s = NotifySocket(path)
    yield path, s
    s.close()


def test_ready_watchdog_stopping_reach_the_socket(notify_path):
    path, server = notify_path
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("2 buses open")
    assert server.recv() == ["READY=1", "STATUS=2 buses open"]
    assert n.watchdog()
    assert server.recv() == ["WATCHDOG=1"]
    assert n.status("outbox 3 messages")
    assert server.recv() == ["STATUS=outbox 3 messages"]
    assert n.stopping()
    assert server.recv() == ["STOPPING=1"]
    n.close()


def test_abstract_socket_address():
    name = f"tcu-agent-test-{os.getpid()}-{time.monotonic_ns()}"
    server = NotifySocket(b"\0" + name.encode())
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert server.recv() == ["READY=1"]
    finally:
        server.close()


def test_without_notify_socket_everything_is_a_no_op():
    n = Notifier({})
    assert not n.enabled
    assert n.ready() is False and n.watchdog() is False and n.stopping() is False
    w = Watchdog(n, 1.0)
    w.kick()
    assert w.ping() is False


def test_a_vanished_socket_is_not_an_error(tmp_path):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.enabled and n.watchdog() is False  # logged once, never raised


def test_watchdog_interval_from_environment():
    pid = str(os.getpid())
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval_s({}) is None


def test_a_stalled_loop_stops_the_watchdog_pings(notify_path):
    """A core loop that kicks, then stalls: pings flow, stop within the interval, resume."""
    path, server = notify_path
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid())}
    notifier = Notifier(env)
    watchdog = Watchdog.from_env(notifier, env)
    assert watchdog.enabled and watchdog.interval_s == pytest.approx(0.2)
    stalled = threading.Event()
    resumed = threading.Event()
    stop = threading.Event()

    def core_loop():  # kicks every 10 ms, except while "stalled"
        while not stop.is_set():
            if not stalled.is_set() or resumed.is_set():
                watchdog.kick()
            time.sleep(0.01)

    core = threading.Thread(target=core_loop, daemon=True)
    core.start()
    sent = []

    def main_thread_for(seconds):  # what run_forever does between signals
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            sent.append(watchdog.ping())
            time.sleep(watchdog.wait_s())

    try:
        main_thread_for(0.6)
        healthy = [m for m in server.drain()]
        assert len(healthy) >= 3 and all(m == ["WATCHDOG=1"] for m in healthy)

        stalled.set()
        time.sleep(watchdog.interval_s + 0.05)  # the loop has not kicked for a whole interval
        server.drain()
        sent.clear()
        main_thread_for(0.6)
        assert server.drain() == [] and not any(sent)
        assert watchdog.missed >= 4

        resumed.set()
        time.sleep(0.05)
        main_thread_for(0.3)
        assert server.drain() and watchdog.missed == 0
    finally:
        stop.set()
        core.join(1)
        notifier.close()


def test_watchdog_with_a_fake_clock():
    clock = [100.0]
    pings = []

    class Recorder(Notifier):
        def notify(self, *fields):
            pings.append(fields)
            return True

    w = Watchdog(Recorder({"NOTIFY_SOCKET": "/unused"}), 5.0, clock=lambda: clock[0])
    w.kick()
    clock[0] += 4.9
    assert w.ping() and pings == [("WATCHDOG=1",)]
    clock[0] += 0.2  # 5.1 s since the last kick
    assert not w.ping() and w.missed == 1
    w.kick()
    assert w.ping() and len(pings) == 2
