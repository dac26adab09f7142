"""The running agent's control socket, as a field engineer meets it: an agent on a virtual bus,
values changed on that bus, and `tcu-agent monitor --once` / `status --json` (subprocesses)
showing the agent's own values; who may connect; no agent running."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import can
import cantools
import pytest

from agent.app.runtime import Agent
from agent.config import load_config
from conftest import ROOT
from test_commands_e2e import rig as cmd_rig  # noqa: F401  (a fixture)

SOC = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"


def cli(*args, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, **kw)


@pytest.fixture
def sockdir():
    # Not under pytest's 0700 tmp_path: other users' clients must reach the socket's folder.
    path = Path(tempfile.mkdtemp(prefix="tcu-ctl-"))
    path.chmod(0o755)
    yield path
    for p in path.iterdir():
        p.unlink()
    path.rmdir()


@pytest.fixture
def config_file(tmp_path, test_dbc, sockdir):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[vehicle]
vin = "CTLVIN00000000001"

[[bus]]
name = "pt"
interface = "virtual"
channel = "ctl-{uuid.uuid4().hex}"
dbc = ["{test_dbc}"]

[storage]
dir = "{tmp_path / 'state'}"

[control]
socket = "{sockdir / 'control.sock'}"
group = "nogroup"

[telemetry]
messages = ["BMS_Status"]

[telemetry.defaults]
timeout_ms = 0  # the test sends single frames: no null after the cycle time

[[telemetry.signal]]
select = "BMS_Status.SOC"
name = "{SOC}"
""")
    return cfg


class Rig:
    def __init__(self, config_file: Path, dbc: Path):
        self.config = load_config(config_file)
        self.agent = Agent(self.config)
        self.agent.start()
        bus = self.config.bus[0]
        self.bus = can.Bus(interface="virtual", channel=bus.channel)
        self.msg = cantools.database.load_file(str(dbc)).get_message_by_name("BMS_Status")

    def send_soc(self, soc: float, counter: int = 3) -> None:
        data = self.msg.encode({"SOC": soc, "PackVoltage": 400, "PackCurrent": 0,
                                "Counter": counter, "Temp": 20})
        self.bus.send(can.Message(arbitration_id=0x100, data=data, is_extended_id=False))
        deadline = time.monotonic() + 5
        while self.agent.snapshot().get(SOC, [0, None])[1] != soc:
            assert time.monotonic() < deadline, self.agent.snapshot()
            time.sleep(0.02)

    def close(self) -> None:
        self.bus.shutdown()
        self.agent.stop()


@pytest.fixture
def rig(config_file, test_dbc):
    r = Rig(config_file, test_dbc)
    yield r
    r.close()


def _row(out: str, name: str) -> str:
    rows = [line for line in out.splitlines() if line.startswith(name)]
    assert len(rows) == 1, out
    return rows[0]


def test_monitor_and_status_show_the_running_agents_values(rig, config_file):
    sock = rig.config.control.socket
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
    rig.send_soc(42.5)
    out = cli("monitor", "-c", config_file, "--once", env={"COLUMNS": "120"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].endswith(f"the running agent, via {sock}")
    assert "DIRECT" not in out.stdout
    assert _row(out.stdout, SOC).split()[1:3] == ["42.5", "%"]
    # the rolling counter is hidden unless --all
    assert "BMS_Status.Counter" not in out.stdout
    assert "(1 counter/checksum signal hidden; --all shows them)" in out.stdout
    assert "BMS_Status.Counter" in cli("monitor", "-c", config_file, "--once", "--all").stdout

    rig.send_soc(77.25)
    out = cli("monitor", "-c", config_file, "--once")
    assert _row(out.stdout, SOC).split()[1:3] == ["77.25", "%"]
    status = cli("status", "-c", config_file, "--json")
    assert status.returncode == 0, status.stderr
    body = json.loads(status.stdout)
    assert body["source"] == f"the agent, via its control socket {sock}"
    assert body["signals"][SOC]["value"] == 77.25
    assert body["signals"][SOC]["unit"] == "%"
    assert body["vin"] == "CTLVIN00000000001" and body["buses"][0]["name"] == "pt"
    text = cli("status", "-c", config_file)
    assert text.returncode == 0 and f"source    the agent, via its control socket {sock}" \
        in text.stdout, text.stdout


def test_topics_and_versioned_messages(rig):
    rig.send_soc(10.0)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(rig.config.control.socket))
        f = s.makefile("rwb")

        def ask(obj) -> dict:
            f.write(json.dumps(obj).encode() + b"\n")
            f.flush()
            return json.loads(f.readline())

        sig = ask({"v": 1, "topic": "signals", "id": 7})
        assert sig["v"] == 1 and sig["topic"] == "signals" and sig["id"] == 7
        assert sig["data"]["signals"][SOC]["value"] == 10.0
        assert sig["data"]["signals"][SOC]["age_s"] >= 0
        for topic in ("buses", "uplink", "outbox", "commands", "status"):
            assert "data" in ask({"v": 1, "topic": topic}), topic
        assert ask({"v": 2, "topic": "signals"})["error"] == \
            "unsupported version 2 (this agent speaks 1)"
        assert ask({"v": 1, "topic": "nope"})["error"].startswith(
            "unknown topic 'nope' (topics: buses, commands, diag, outbox, signals, status, uplink, "
            "watch")
        f.write(b"not json\n")
        f.flush()
        assert json.loads(f.readline())["error"] == "not a JSON line"
        # watch: the first line has every value, later lines only what changed
        f.write(json.dumps({"v": 1, "topic": "watch", "interval_s": 0.1}).encode() + b"\n")
        f.flush()
        first = json.loads(f.readline())["data"]
        assert first["signals"][SOC]["value"] == 10.0
        rig.send_soc(11.0)
        deadline = time.monotonic() + 5
        while True:
            changed = json.loads(f.readline())["data"]["signals"]
            if SOC in changed:
                assert changed[SOC]["value"] == 11.0
                break
            assert time.monotonic() < deadline


def _as_user(path: Path, uid: int, gid: int) -> str:
    """Connect as `uid` with only group `gid` and ask for `buses`: the answer line, or
    `connect: <error>`. A forked child (the interpreter's folder may be closed to others)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            try:
                s.connect(str(path))
                s.sendall(b'{"v":1,"topic":"buses"}\n')
                out = s.makefile().readline()
            except OSError as e:
                out = f"connect: {e.strerror}"
        except BaseException as e:
            out = f"child: {e!r}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return out


def test_who_may_connect(rig):
    import grp
    sock = rig.config.control.socket
    nogroup = grp.getgrnam("nogroup").gr_gid
    assert os.stat(sock).st_gid == nogroup  # the configured group owns the socket
    # a process running with the group is answered
    out = _as_user(sock, 54321, nogroup)
    assert json.loads(out)["data"]["buses"][0]["name"] == "pt", out
    # anyone else: the file mode keeps them out ...
    assert _as_user(sock, 54321, 12345) == "connect: Permission denied"
    # ... and were it opened up, the peer check still refuses, in one JSON line
    os.chmod(sock, 0o666)
    answer = json.loads(_as_user(sock, 54321, 12345))
    assert answer == {"v": 1, "error": f"permission denied: uid 54321 is not root, the agent's "
                                       f"user (uid {os.getuid()}) or a member of group nogroup"}
    # a user whose account is in the group (nobody: nogroup is its primary group) is answered
    out = _as_user(sock, 65534, 12345)
    assert json.loads(out)["data"]["buses"][0]["name"] == "pt", out


def test_no_agent_running(config_file, sockdir):
    sock = sockdir / "control.sock"
    status = cli("status", "-c", config_file, "--json")
    assert status.returncode == 1
    assert json.loads(status.stdout) == {"error": (
        f"no agent has run with storage.dir {config_file.parent / 'state'} (no status.json); "
        f"no agent is running: no control socket at {sock}")}
    monitor = cli("monitor", "-c", config_file, "--once")
    assert monitor.returncode == 2 and monitor.stdout == ""
    assert monitor.stderr == (f"tcu-agent: error: no agent is running: no control socket at "
                              f"{sock} (`tcu-agent monitor --direct` opens the buses itself)\n")
    # a config error under --json is JSON too, with the exit status it always had
    bad = cli("status", "-c", config_file, "--json", "--set", "vehicle.nope=1")
    assert bad.returncode == 2
    assert json.loads(bad.stdout) == {"error": "--set 'vehicle.nope=1': vehicle.nope: unknown "
                                               "key (known: vin, topic_prefix)"}


def test_monitor_direct_is_labelled(config_file):
    out = cli("monitor", "-c", config_file, "--once", "--direct", "--interval", "0.2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1] == ("DIRECT: this monitor opened the buses itself, not "
                                          "the running agent's view")


def test_a_stale_socket_is_replaced_and_a_live_one_left_alone(config_file, test_dbc, sockdir):
    sock = sockdir / "control.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))  # bound, never listening: what a killed agent leaves behind
    stale.close()
    first = Rig(config_file, test_dbc)
    try:
        assert first.agent.control is not None
        second = Agent(first.config)
        second.start()
        try:
            assert second.control is None  # the first agent keeps its socket
        finally:
            second.stop()
        assert sock.exists()
        first.send_soc(5.0)
        assert json.loads(cli("status", "-c", config_file, "--json").stdout)["signals"][SOC][
            "value"] == 5.0
    finally:
        first.close()
    assert not sock.exists()


@pytest.mark.mqtt
def test_commands_topic_lists_recent_commands_and_statuses(cmd_rig):
    r = cmd_rig  # broker, agent with commands, cloud (tests/test_commands_e2e.py)
    assert r.agent.control is not None, "the agent could not open its control socket"
    cid, _ = r.cloud.command("charge.turbo")  # not configured: REJECTED
    deadline = time.monotonic() + 10
    while True:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(r.agent.config.control.socket))
            s.sendall(b'{"v":1,"topic":"commands"}\n')
            data = json.loads(s.makefile().readline())["data"]
        recent = [c for c in data["recent"] if c["id"] == cid]
        if recent and recent[0].get("status") == "REJECTED":
            break
        assert time.monotonic() < deadline, data
        time.sleep(0.1)
    assert recent[0]["reason"] == "UNKNOWN_COMMAND" and recent[0]["received_ms"] > 0
