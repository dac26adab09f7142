"""The real SocketCAN path on vcan0/vcan1: kernel receive filters, two buses, the standalone
simulator in another process, can-utils, commands as CAN frames, a bus that goes down and up,
Mosquitto on loopback.

Needs vcan interfaces (created here when running as root on a kernel with the vcan module).
Anywhere else these tests skip; run them in the VM, which has all of it: `tests/vm/run`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from support.wait import wait_until
from conftest import ROOT

pytestmark = pytest.mark.vcan

CHANNELS = ("vcan0", "vcan1")
VM_HINT = "run this tier in the VM: tests/vm/run"
CAN_EFF_FLAG = 0x80000000
CAN_EFF_MASK = 0x1FFFFFFF


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


def _link_up(name: str) -> bool:
    try:
        flags = int(Path(f"/sys/class/net/{name}/flags").read_text(), 16)
    except (OSError, ValueError):
        return False
    return bool(flags & 0x1)  # IFF_UP


def _prepare_vcan() -> str | None:
    """None when vcan0 and vcan1 are up (creating them if we can), else why not."""
    if not hasattr(socket, "AF_CAN"):
        return "this Python has no AF_CAN"
    problems = []
    for name in CHANNELS:
        if _link_up(name):
            continue
        can_admin = os.geteuid() == 0 and shutil.which("ip")
        if not Path(f"/sys/class/net/{name}").exists():
            if not can_admin:
                problems.append(f"no {name} (and not root to create it)")
                continue
            r = _ip("link", "add", "dev", name, "type", "vcan")
            if r.returncode != 0:
                problems.append(f"cannot create {name}: {r.stderr.strip() or r.stdout.strip()} "
                                "(this kernel has no vcan module?)")
                continue
        if can_admin:
            _ip("link", "set", "up", name)
        if not _link_up(name):
            problems.append(f"{name} is down")
    return "; ".join(problems) or None


@pytest.fixture(scope="module", autouse=True)
def vcan():
    why = _prepare_vcan()
    if why:
        if os.environ.get("TCU_VCAN_REQUIRED"):  # set inside the VM: a skip there is a failure
            pytest.fail(f"vcan tier: {why}")
        pytest.skip(f"needs SocketCAN vcan0/vcan1: {why}; {VM_HINT}")
    yield CHANNELS


def can_utils(tool: str) -> str:
    found = shutil.which(tool)
    if not found:
        why = f"needs {tool} from can-utils (.ci/install-system-deps)"
        if os.environ.get("TCU_VCAN_REQUIRED"):  # inside the VM a skip is a failure
            pytest.fail(why)
        pytest.skip(why)
    return found


def kernel_filters(bus) -> set[tuple[int, int]]:
    """(can_id, can_mask) pairs installed on a python-can socketcan bus's raw socket,
    read back from the kernel (CAN_RAW_FILTER)."""
    raw = bus.socket.getsockopt(socket.SOL_CAN_RAW, socket.CAN_RAW_FILTER, 1024)  # 128 max
    return {struct.unpack_from("=II", raw, i) for i in range(0, len(raw), 8)}


class Simulator:
    """`python -m agent simulate --interface socketcan --channel vcanN` as its own process."""

    def __init__(self, channel: str, log: Path):
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "simulate", "--interface", "socketcan",
             "--channel", channel], cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # the CLI stops on Ctrl-C and logs a summary
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


class Wire:
    """Every frame seen on a vcan interface, from an independent socket (like candump)."""

    def __init__(self, channel: str):
        import can

        self.bus = can.Bus(interface="socketcan", channel=channel)
        self.frames: list[tuple[float, int, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            msg = self.bus.recv(0.05)
            if msg is not None:
                self.frames.append((time.monotonic(), msg.arbitration_id, bytes(msg.data)))

    def ids_since(self, t: float) -> set[int]:
        return {cid for ts, cid, _ in list(self.frames) if ts >= t}

    def close(self):
        self._stop.set()
        self._thread.join(1)
        self.bus.shutdown()


# -- two buses, kernel filters, can-utils ----------------------------------------------------

def test_two_buses_with_kernel_receive_filters(test_dbc, tmp_path):
    import can
    import cantools

    from agent.config import config_from_dict
    from agent.app.runtime import Agent

    cansend, cangen = can_utils("cansend"), can_utils("cangen")
    raw = {"vehicle": {"vin": "VIN0001"}, "storage": {"dir": str(tmp_path / "state")},
           "bus": [{"name": "pt", "interface": "socketcan", "channel": "vcan0",
                    "dbc": [str(test_dbc)]},
                   {"name": "body", "interface": "socketcan", "channel": "vcan1",
                    "dbc": [str(test_dbc)]}],
           "telemetry": {"messages": ["pt:VCU_Drive", "body:BMS_Status"],
                         "max_batch_age_ms": 200}}
    cfg = config_from_dict(raw, base=tmp_path)
    batches = []
    agent = Agent(cfg, on_batch=batches.append)
    db = cantools.database.load_file(str(test_dbc))
    drive, bms = db.get_message_by_name("VCU_Drive"), db.get_message_by_name("BMS_Status")
    agent.start()
    try:
        assert all(r.wait_open(10) for r in agent.readers), agent.bus_status()
        # the filters are the kernel's: read them back from each reader's raw socket
        pt_filters = kernel_filters(agent.readers[0]._bus)
        body_filters = kernel_filters(agent.readers[1]._bus)
        assert {cid & CAN_EFF_MASK for cid, _ in pt_filters} == {drive.frame_id}
        assert {cid & CAN_EFF_MASK for cid, _ in body_filters} == {bms.frame_id}
        assert all(mask & 0x7FF == 0x7FF and not cid & CAN_EFF_FLAG for cid, mask in pt_filters)

        # noise the kernel must drop: another ECU's frames and BMS_Status on the wrong bus
        subprocess.run([cangen, "vcan0", "-I", "7FF", "-L", "8", "-n", "50", "-g", "0"],
                       check=True, timeout=30)
        subprocess.run([cangen, "vcan1", "-e", "-n", "50", "-g", "0"], check=True, timeout=30)
        with can.Bus(interface="socketcan", channel="vcan0") as feeder:
            feeder.send(can.Message(arbitration_id=bms.frame_id, is_extended_id=False,
                                    data=bms.encode({"SOC": 99, "PackVoltage": 400,
                                                     "PackCurrent": 0, "Counter": 1,
                                                     "Temp": 20})))
            for speed in (10.0, 20.0, 30.0):
                feeder.send(can.Message(arbitration_id=drive.frame_id, is_extended_id=False,
                                        data=drive.encode({"Speed": speed, "Gear": 3,
                                                           "Ready": 1})))
                time.sleep(0.02)
        # SOC 10.00 % (0x03E8 x 0.01), 400.0 V, 0 A, counter 5, 20 degC
        subprocess.run([cansend, "vcan1", "100#E803A00F00000514"], check=True, timeout=30)
        wait_until(lambda: agent.snapshot().get("BMS_Status.SOC", (0, None))[1] == 10.0
                   and agent.snapshot().get("VCU_Drive.Speed", (0, None))[1] == 30.0,
                   what="both buses decoded")
        time.sleep(0.3)  # anything the filters let through would have arrived by now
        pt, body = agent.bus_status()
        snap = agent.snapshot()  # before stop: with the bus quiet, values time out to null
    finally:
        agent.stop()
    assert (pt["frames"], pt["unknown_ids"], pt["state"]) == (3, 0, "open")
    assert (body["frames"], body["unknown_ids"]) == (1, 0)
    assert "BMS_Status.Temp" in snap and snap["BMS_Status.Temp"][1] == 20
    speeds = [v for b in batches for _, v in b.sig.get("VCU_Drive.Speed", [])]
    assert speeds[:3] == [10.0, 20.0, 30.0]
    assert speeds[3:] in ([], [None])  # a quiet 20 ms message times out to null (500 ms)


# -- a bus that goes down and comes back ------------------------------------------------------

def test_bus_down_and_up_recovers_without_restart(test_dbc, tmp_path):
    import can
    import cantools

    from agent.config import config_from_dict
    from agent.app.runtime import Agent

    if os.geteuid() != 0:
        pytest.skip(f"needs root for `ip link set vcan1 down/up`; {VM_HINT}")
    raw = {"vehicle": {"vin": "VIN0001"}, "storage": {"dir": str(tmp_path / "state")},
           "bus": [{"name": "body", "interface": "socketcan", "channel": "vcan1",
                    "dbc": [str(test_dbc)]}],
           "telemetry": {"messages": ["BMS_Status"]}}
    agent = Agent(config_from_dict(raw, base=tmp_path))
    agent.readers[0].backoff_s = 0.05
    bms = cantools.database.load_file(str(test_dbc)).get_message_by_name("BMS_Status")

    def frame(soc):
        return can.Message(arbitration_id=bms.frame_id, is_extended_id=False,
                           data=bms.encode({"SOC": soc, "PackVoltage": 400, "PackCurrent": 0,
                                            "Counter": 0, "Temp": 20}))

    agent.start()
    try:
        assert agent.readers[0].wait_open(10)
        with can.Bus(interface="socketcan", channel="vcan1") as feeder:
            feeder.send(frame(30))
        wait_until(lambda: agent.bus_status()[0]["decoded"] == 1, what="first frame")

        assert _ip("link", "set", "vcan1", "down").returncode == 0
        wait_until(lambda: agent.bus_status()[0]["bus_errors"] >= 1, what="the read error")
        with can.Bus(interface="socketcan", channel="vcan1") as feeder:
            with pytest.raises(can.CanError):  # nothing can be written to a down interface
                feeder.send(frame(35), timeout=0.2)
        time.sleep(1.0)  # stays down a while: the reader retries with backoff meanwhile
        errors_while_down = agent.bus_status()[0]["bus_errors"]

        assert _ip("link", "set", "vcan1", "up").returncode == 0
        # the same agent, no restart: once reopened it hears the bus again
        with can.Bus(interface="socketcan", channel="vcan1") as feeder:
            def sent_and_decoded():
                feeder.send(frame(40))
                return agent.snapshot().get("BMS_Status.SOC", (0, None))[1] == 40.0

            wait_until(sent_and_decoded, what="frames after the bus came back")
        status = agent.bus_status()[0]
        assert status["state"] == "open" and status["reopens"] >= 1, status
        assert status["last_error"], status  # the fault was recorded (ENETDOWN)
        # a down interface opens fine and fails on the first read: without a backoff on read
        # faults the reader would reopen it hundreds of times a second
        assert errors_while_down < 50, f"{errors_while_down} bus errors in 1 s: a busy retry loop"
    finally:
        _ip("link", "set", "vcan1", "up")
        agent.stop()


# -- the simulator process, commands as CAN frames, Mosquitto on loopback ---------------------

@pytest.mark.mqtt
def test_commands_over_socketcan_with_the_simulator_process(tmp_path):
    """charge.start and doors.unlock: signed over Mosquitto, written to vcan0 as CAN frames,
    answered by the simulated EV in its own process, confirmed from its status frames."""
    from agent.adapters.keys import generate_keypair
    from agent.config import load_config
    from agent.app.runtime import Agent
    from support.mosquitto import Mosquitto
    from test_commands_e2e import Cloud, wait_ready

    keys = tmp_path / "keys"
    for stem in ("vehicle", "cloud"):
        generate_keypair(keys, stem=stem)
    trust = tmp_path / "trust.toml"
    trust.write_text(f'[[key]]\nname = "fleet-backend"\npublic_key = "{keys / "cloud.pub"}"\n'
                     'allow = ["charge.*", "doors.*", "state.*"]\n')
    sim = Simulator("vcan0", tmp_path / "simulator.log")
    wire = Wire("vcan0")
    broker = Mosquitto().start()
    agent = cloud = None
    try:
        config = load_config(ROOT / "configs" / "demo.toml", [
            "bus.0.interface='socketcan'", "bus.0.channel='vcan0'", "simulator.enabled=false",
            f"storage.dir={str(tmp_path / 'state')!r}",
            f"signing.key_file={str(keys / 'vehicle.key')!r}", f"mqtt.port={broker.port}",
            f"commands.trust_store={str(trust)!r}", "mqtt.reconnect_min_s=0.1"])
        agent = Agent(config)
        assert agent.simulator is None  # the EV is the other process
        agent.start()
        cloud = Cloud(broker, keys / "cloud.key", keys / "vehicle.pub")
        wait_ready(agent, timeout=60)  # the simulator process imports slowly in the VM
        assert agent.core.lookup("OBC_Status.ChargeState")[0] != "CHARGING"

        for name, confirm in (("charge.start", ("OBC_Status.ChargeState", "CHARGING")),
                              ("doors.unlock", ("BCM_Status.DoorsLocked", "UNLOCKED"))):
            t = time.monotonic()
            cid, _ = cloud.command(name)
            final = cloud.wait_terminal(cid, timeout=30)
            assert final["status"] == "SUCCEEDED", final
            assert [s["status"] for s in cloud.statuses(cid)][0] == "ACCEPTED"
            assert agent.core.lookup(confirm[0])[0] == confirm[1]
            request_id = 0x5A0 if name.startswith("charge") else 0x5A1
            assert request_id in wire.ids_since(t), f"no request frame on vcan0 for {name}"
        assert agent.bus_status()[0]["bus_errors"] == 0
    finally:
        if cloud:
            cloud.close()
        if agent:
            agent.stop()
        wire.close()
        broker.close()
        status = sim.stop()
    assert status == 0, sim.log_text()
    assert "frames sent" in sim.log_text() and "charging" in sim.log_text()


@pytest.mark.mqtt
def test_agent_process_publishes_signed_telemetry_from_vcan(tmp_path):
    """`tcu-agent run` and `tcu-agent simulate` as two processes on vcan0, Mosquitto on
    loopback: signed telemetry arrives, and SIGTERM stops the agent cleanly."""
    from agent.adapters.keys import generate_keypair, load_public_key
    from agent.core.cose import kid_of, verify
    from support.mosquitto import Consumer, Mosquitto

    keys = tmp_path / "keys"
    generate_keypair(keys, stem="vehicle")
    public = load_public_key(str(keys / "vehicle.pub"))
    vin = f"VCAN{uuid.uuid4().hex[:13].upper()}"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[vehicle]
vin = "{vin}"

[[bus]]
name = "pt"
interface = "socketcan"
channel = "vcan0"
dbc = ["{ROOT / 'dbc' / 'demo_ev.dbc'}"]

[storage]
dir = "{tmp_path / 'state'}"

[signing]
key_file = "{keys / 'vehicle.key'}"

[mqtt]
host = "127.0.0.1"
port = PORT
reconnect_min_s = 0.1

[telemetry]
messages = ["BMS_Status", "VCU_Status"]
max_batch_age_ms = 300
""")
    sim = Simulator("vcan0", tmp_path / "simulator.log")
    broker = Mosquitto().start()
    cfg.write_text(cfg.read_text().replace("PORT", str(broker.port)))
    log = open(tmp_path / "agent.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(cfg)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        with Consumer(broker.host, broker.port, f"vehicles/{vin}/telemetry") as consumer:
            def soc_received(messages):
                for m in messages:
                    body = verify(m.payload, {kid_of(public): public}).payload
                    if any(k.startswith("BMS_Status.SOC") for k in body.get("sig", {})):
                        return True
                return False

            consumer.wait_for(soc_received, timeout=90, what="signed telemetry with the SOC")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "agent.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
        broker.close()
        sim.stop()
    text = (tmp_path / "agent.log").read_text(errors="replace")
    assert "failed on socketcan" not in text, text  # the bus never faulted


def test_frames_the_kernel_drops_on_a_full_socket_are_counted():
    """SO_RXQ_OVFL on a real CAN_RAW socket: the reader's kernel_drops is the kernel's count."""
    import can

    from agent.adapters.canbus import BusReader
    from agent.config import BusConfig

    got: list = []
    cfg = BusConfig("v", "socketcan", "vcan0", (Path("unused.dbc"),), filters=False)
    r = BusReader(0, cfg, got.extend)
    r._open()
    try:
        assert r._raw is not None  # the raw SocketCAN path
        r._raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # most of a burst drops
        with can.Bus(interface="socketcan", channel="vcan0") as tx:
            for i in range(2000):  # nothing reads meanwhile
                tx.send(can.Message(arbitration_id=0x321, data=i.to_bytes(2, "little"),
                                    is_extended_id=False))
            while True:
                before = len(got)
                r._read_raw(got)
                if len(got) == before:
                    break
            # The count rides on the frames queued after a drop: one more, read, carries it.
            tx.send(can.Message(arbitration_id=0x322, data=b"\x01", is_extended_id=False))
            r._read_raw(got)
        assert got[-1][2] == 0x322
        assert r.kernel_drops and r.kernel_drops > 1000
        assert len(got) + r.kernel_drops == 2001
        assert r.status()["kernel_drops"] == r.kernel_drops
    finally:
        r._close()
