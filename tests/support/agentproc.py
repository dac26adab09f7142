"""The whole agent as a separate process, fed CAN frames through an slcan pseudo-terminal,
and a cloud-side consumer that verifies every message it receives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import cantools

from agent.adapters.keys import generate_keypair, load_public_key
from agent.core.cose import kid_of, verify
from agent.errors import VerificationError

ROOT = Path(__file__).resolve().parents[2]
VIN = "TESTVIN0000000001"


class SlcanFeeder:
    """A pseudo-terminal that looks like an slcan USB adapter; a thread writes frames to it."""

    def __init__(self, directory: Path, dbc: Path, rate_hz: float = 100.0):
        self.master, self.slave = os.openpty()
        self.link = directory / "ttyCAN0"
        if self.link.is_symlink():
            self.link.unlink()
        self.link.symlink_to(os.ttyname(self.slave))
        self.msg = cantools.database.load_file(str(dbc)).get_message_by_name("BMS_Status")
        self.rate_hz = rate_hz
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "SlcanFeeder":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(1.0 / self.rate_hz):
            i = self.sent
            data = self.msg.encode({"SOC": (i // 10) % 100, "PackVoltage": 400 + i % 7,
                                    "PackCurrent": 0, "Counter": i % 16, "Temp": 20})
            try:
                os.write(self.master, f"t1008{data.hex().upper()}\r".encode())
            except OSError:
                return
            self.sent += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


class AgentProcess:
    """`tcu-agent run` in a subprocess with a config written for the test."""

    def __init__(self, workdir: Path, dbc: Path, channel: Path, mqtt: dict, extra: str = "",
                 storage_max_bytes: int = 64 * 1024 * 1024, batch_age_ms: int = 200):
        self.workdir = workdir
        self.keydir = workdir / "keys"
        if not (self.keydir / "vehicle.key").exists():
            generate_keypair(self.keydir)
        self.public_key = load_public_key(str(self.keydir / "vehicle.pub"))
        self.storage = workdir / "state"
        mqtt_lines = "\n".join(f"{k} = {_toml(v)}" for k, v in mqtt.items() if k != "tls")
        tls = mqtt.get("tls") or {}
        tls_lines = "\n".join(f"{k} = {_toml(v)}" for k, v in tls.items())
        self.config = workdir / "agent.toml"
        # Its own control socket: never the default /run/tcu-agent one, which an agent of
        # another test (or one a failed test left running) may hold.
        self.control_socket = Path(f"/tmp/tcu-ctl-{uuid.uuid4().hex[:12]}.sock")
        self.config.write_text(f"""
[vehicle]
vin = "{VIN}"

[[bus]]
name = "pt"
interface = "slcan"
channel = "{channel}"
dbc = ["{dbc}"]
options = {{ sleep_after_open = 0 }}

[storage]
dir = "{self.storage}"
max_bytes = {storage_max_bytes}

[telemetry]
messages = ["BMS_Status"]
max_batch_age_ms = {batch_age_ms}

[[telemetry.signal]]
select = "BMS_Status.SOC"
name = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"
state = true

[control]
socket = "{self.control_socket}"

[signing]
key_file = "{self.keydir / 'vehicle.key'}"

[mqtt]
reconnect_min_s = 0.1
reconnect_max_s = 1.0
{mqtt_lines}

[mqtt.tls]
{tls_lines}
{extra}
""")
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "agent.log"

    def start(self) -> "AgentProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "--log-level", "debug", "run", "-c", str(self.config)],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def terminate(self, timeout: float = 15.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def cli(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "agent", *args, "-c", str(self.config)],
                              cwd=ROOT, capture_output=True, text=True, timeout=30)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Verifier:
    """Verifies every message a Consumer collected; keeps payloads per topic kind."""

    def __init__(self, public_key):
        self.keys = {kid_of(public_key): public_key}

    def check(self, messages) -> dict[str, list[dict]]:
        out: dict[str, list] = {}
        for m in messages:
            kind = m.topic.rsplit("/", 1)[-1]
            try:
                payload = verify(m.payload, self.keys).payload
            except VerificationError as e:
                raise AssertionError(f"bad message on {m.topic}: {e.reason}: {e}") from None
            assert payload["v"] == 1 and payload["vin"] == VIN
            out.setdefault(kind, []).append(payload)
        return out


def telemetry_seqs(messages, verifier: Verifier) -> list[int]:
    return [p["seq"] for p in verifier.check(messages).get("telemetry", [])]


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return f'"{value}"'


class SessionConsumer:
    """A subscriber with a persistent MQTT 5 session: on a broker with persistence, what is
    published while it is away (a broker restart included) is queued for it, not lost."""

    def __init__(self, host: str, port: int, topic: str):
        import uuid

        import paho.mqtt.client as mqtt

        from support.mosquitto import Message

        self._Message = Message
        self.messages: list = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                   client_id=f"session-{uuid.uuid4().hex[:8]}",
                                   protocol=mqtt.MQTTv5)
        self._client.reconnect_delay_set(0.05, 0.2)
        self._client.on_connect = lambda c, u, f, rc, p: (not rc.is_failure
                                                          and c.subscribe(topic, qos=1))
        self._client.on_subscribe = lambda *a: self._subscribed.set()
        self._client.on_message = self._on_message
        props = mqtt.Properties(mqtt.PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self._client.connect(host, port, keepalive=10, clean_start=False, properties=props)
        self._client.loop_start()
        assert self._subscribed.wait(5), "session consumer not subscribed"

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append(self._Message(msg.topic, bytes(msg.payload), bool(msg.retain),
                                               msg.qos))

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
