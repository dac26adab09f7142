"""The MQTT uplink (agent/adapters/mqtt.py) against a real mosquitto: the end-to-end proof.

The decisions (order, window, fallback, backoff, the will at stop) are unit-tested on the state
machine in test_uplink_core.py; these tests show the adapter carries them out on the wire.

Payloads are opaque bytes carrying the outbox seq (``b"seq:<n>|<padding>"``). A small MQTT-aware
TCP proxy (``MqttProxy``) sits between uplink and broker where a test needs to see or shape the
traffic: which protocol level each CONNECT asks for, refusing MQTT 5, counting unacknowledged
PUBLISHes, dropping the connection without a DISCONNECT.
"""

from __future__ import annotations

import json
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

try:  # rootdir on sys.path (tests/ is a package, or python -m pytest)
    from tests.support.certs import Pki, generate_pki
    from tests.support.mosquitto import Consumer, Mosquitto, publish
except ImportError:  # pytest put tests/ itself on sys.path
    from support.certs import Pki, generate_pki  # type: ignore[no-redef]
    from support.mosquitto import Consumer, Mosquitto, publish  # type: ignore[no-redef]

from support.wait import wait_until
from agent.adapters.mqtt import Uplink
from agent.adapters.outbox import Outbox
from agent.config import MqttConfig, TlsConfig
from agent.errors import UplinkError

pytestmark = [pytest.mark.mqtt, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parent.parent
VIN = "TESTVIN0000000001"
PREFIX = f"vehicles/{VIN}"
TELEMETRY, STATE, STATUS, RESPONSES, COMMANDS = (
    f"{PREFIX}/{t}" for t in ("telemetry", "state", "status", "responses", "commands"))
CLIENT_ID = "tcu-test-uplink"


# --------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return generate_pki(tmp_path_factory.mktemp("pki"), client_id=CLIENT_ID)


@pytest.fixture
def make_broker(tmp_path: Path):
    """Brokers that are always closed; their logs are printed (shown when a test fails)."""
    brokers: list[Mosquitto] = []

    def make(start: bool = True, **kw) -> Mosquitto:
        kw.setdefault("workdir", tmp_path / f"broker{len(brokers)}")
        b = Mosquitto(**kw)
        brokers.append(b)
        return b.start() if start else b

    yield make
    for b in brokers:
        b.close()
        print(f"----- log of {b!r} -----\n{b.log_text()[-6000:]}")


@pytest.fixture
def outbox(tmp_path: Path):
    ob = Outbox(tmp_path / "outbox")
    yield ob
    ob.close()


class Will:
    """A will() callback that counts its calls and makes each payload unique."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> tuple[str, bytes]:
        self.calls += 1
        return STATUS, b"offline:%d" % self.calls


@pytest.fixture
def make_uplink():
    uplinks: list[Uplink] = []

    def make(cfg: MqttConfig, ob: Outbox, subscribe: dict | None = None, **kw) -> Uplink:
        kw.setdefault("will", Will())
        up = Uplink(cfg, ob, kw.pop("client_id", CLIENT_ID), **kw)
        uplinks.append(up)
        for topic, callback in (subscribe or {}).items():
            up.subscribe(topic, callback)
        up.start()
        return up

    yield make
    for up in uplinks:
        up.stop(0.5)


def config(port: int, **kw) -> MqttConfig:
    kw.setdefault("reconnect_min_s", 0.05)
    kw.setdefault("reconnect_max_s", 0.5)
    kw.setdefault("keepalive", 10)
    return MqttConfig(host="127.0.0.1", port=port, **kw)


def add(ob: Outbox, up: Uplink | None, n: int, pad: int = 0) -> list[int]:
    """Append ``n`` telemetry rows whose payload carries their seq; wake the uplink."""
    seqs = []
    for _ in range(n):
        seqs.append(ob.append_telemetry(lambda seq, drop: b"seq:%d|" % seq + b"x" * pad, 1,
                                        0, TELEMETRY))
        if up is not None:
            up.wake()
    return seqs


def seq_of(payload: bytes) -> int:
    assert payload.startswith(b"seq:"), payload[:40]
    return int(payload[4:].split(b"|", 1)[0])


def seqs_in(msgs) -> list[int]:
    return [seq_of(m.payload) for m in msgs if m.topic == TELEMETRY]


def left(ob: Outbox) -> int:
    return ob.stats()["messages"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SessionConsumer:
    """A subscriber with a persistent MQTT 5 session (for a broker with persistence): what is
    published while it is away - broker restarts included - is queued for it, not lost."""

    def __init__(self, port: int, topic: str) -> None:
        self.seqs: list[int] = []
        self._cond = threading.Condition()
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
        self._client.connect("127.0.0.1", port, keepalive=10, clean_start=False,
                             properties=props)
        self._client.loop_start()
        assert self._subscribed.wait(5), "session consumer not subscribed"

    def _on_message(self, client, userdata, msg) -> None:
        with self._cond:
            self.seqs.append(seq_of(msg.payload))
            self._cond.notify_all()

    def distinct(self) -> set[int]:
        with self._cond:
            return set(self.seqs)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def persistent_broker(make_broker, **kw) -> Mosquitto:
    # Saved every second and on a clean exit (the harness default, after every change, would
    # rewrite the whole database per message); no cap on what is queued for offline sessions.
    return make_broker(persistence=True, extra_config=[
        "autosave_on_changes false", "autosave_interval 1", "max_queued_messages 0"], **kw)


# --------------------------------------------------------------------------
# an MQTT-aware TCP proxy
# --------------------------------------------------------------------------


def read_packet(f) -> tuple[int, bytes] | None:
    """(packet type, raw bytes) of the next MQTT packet from a buffered reader; None at EOF."""
    first = f.read(1)
    if not first:
        return None
    raw, length, mult = bytearray(first), 0, 1
    while True:
        b = f.read(1)
        if not b:
            return None
        raw += b
        length += (b[0] & 0x7F) * mult
        mult *= 128
        if not b[0] & 0x80:
            break
    body = f.read(length) if length else b""
    if len(body) < length:
        return None
    return first[0] >> 4, bytes(raw + body)


class MqttProxy:
    """127.0.0.1 proxy to a broker. Records the protocol level of every CONNECT; can refuse
    MQTT 5 (``refuse_v5="connack"``: a 3.1.1-style CONNACK "unacceptable protocol version";
    ``"close"``: hang up before any CONNACK); forwards everything else byte for byte.

    While forwarding it counts QoS 1 PUBLISHes client->broker minus PUBACKs broker->client
    (decremented *before* the PUBACK is passed on, so the count never exceeds what the client
    itself considers unacknowledged); ``ack_batch_s`` holds broker->client traffic back and
    releases it in batches, so the client's window fills up between batches. ``lose_pubacks``
    swallows the broker's PUBACKs.
    """

    def __init__(self, upstream_port: int, refuse_v5: str | None = None,
                 ack_batch_s: float = 0.0) -> None:
        self.upstream_port = upstream_port
        self.refuse_v5 = refuse_v5
        self.ack_batch_s = ack_batch_s
        self.lose_pubacks = False  # True: PUBACKs never reach the client
        self.levels: list[int] = []
        self.outstanding = 0
        self.peak = 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._closed = False
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        cfile = conn.makefile("rb")
        pkt = read_packet(cfile)
        if pkt is None or pkt[0] != 1:
            conn.close()
            return
        raw = pkt[1]
        start = 2 + next(i for i, b in enumerate(raw[1:5]) if not b & 0x80)  # after the length
        level = raw[start + 6]  # protocol name (2 + 4 bytes), then the level: 4 or 5
        with self._lock:
            self.levels.append(level)
            self.outstanding = 0
        if level == 5 and self.refuse_v5 == "connack":
            conn.sendall(b"\x20\x02\x00\x01")
        if level == 5 and self.refuse_v5:
            conn.close()
            return
        up = socket.create_connection(("127.0.0.1", self.upstream_port))
        for s in (conn, up):  # forward each packet at once, like the endpoints do
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._socks += [conn, up]
        up.sendall(raw)
        back: queue.Queue = queue.Queue()
        threading.Thread(target=self._client_to_broker, args=(cfile, up), daemon=True).start()
        threading.Thread(target=self._read_all, args=(up.makefile("rb"), back),
                         daemon=True).start()
        threading.Thread(target=self._broker_to_client, args=(back, conn), daemon=True).start()

    def _client_to_broker(self, cfile, up: socket.socket) -> None:
        try:
            while (pkt := read_packet(cfile)) is not None:
                kind, raw = pkt
                if kind == 3 and (raw[0] >> 1) & 3 == 1:  # PUBLISH, QoS 1
                    with self._lock:
                        self.outstanding += 1
                        self.peak = max(self.peak, self.outstanding)
                up.sendall(raw)
        except OSError:
            pass
        self._shut(up)

    @staticmethod
    def _read_all(f, out: queue.Queue) -> None:
        try:
            while (pkt := read_packet(f)) is not None:
                out.put(pkt)
        except OSError:
            pass
        out.put(None)

    def _broker_to_client(self, back: queue.Queue, conn: socket.socket) -> None:
        while True:
            batch = [back.get()]
            if self.ack_batch_s:
                time.sleep(self.ack_batch_s)
            while True:
                try:
                    batch.append(back.get_nowait())
                except queue.Empty:
                    break
            end = None in batch
            pkts = [p for p in batch if p is not None and not (self.lose_pubacks and p[0] == 4)]
            with self._lock:
                self.outstanding -= sum(1 for kind, _ in pkts if kind == 4)  # PUBACK
            try:
                conn.sendall(b"".join(raw for _, raw in pkts))
            except OSError:
                end = True
            if end:
                self._shut(conn)
                return

    @staticmethod
    def _shut(s: socket.socket) -> None:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def drop_all(self) -> None:
        """Cut every forwarded connection (no DISCONNECT: the broker publishes the will)."""
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            self._shut(s)
            s.close()

    def close(self) -> None:
        self._server.close()
        self.drop_all()


@pytest.fixture
def make_proxy():
    proxies: list[MqttProxy] = []

    def make(*a, **kw) -> MqttProxy:
        p = MqttProxy(*a, **kw)
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        p.close()


# --------------------------------------------------------------------------
# delivery
# --------------------------------------------------------------------------


def test_order_kept_rows_acked_retained_kinds_retained(make_broker, outbox, make_uplink) -> None:
    b = make_broker()
    with Consumer(b.host, b.port, f"{PREFIX}/#") as c:
        telemetry, urgent = [], []
        for i in range(300):  # telemetry with a response and a state record here and there
            telemetry += [(TELEMETRY, b"seq:%d|" % s) for s in add(outbox, None, 1)]
            if i % 50 == 7:
                payload = b"response-%d" % i
                outbox.append("response", RESPONSES, payload, 0)
                urgent.append((RESPONSES, payload))
        outbox.append("state", STATE, b"state-final", 0)
        urgent.append((STATE, b"state-final"))
        expected = urgent + telemetry
        up = make_uplink(config(b.port), outbox)
        msgs = c.wait_for_count(len(expected), timeout=15)
        wait_until(lambda: left(outbox) == 0, what="the outbox to empty")
    # Exactly once; responses and state go ahead of the telemetry backlog, each kind in order.
    assert [(m.topic, m.payload) for m in msgs] == expected
    st = up.status()
    assert st["state"] == "connected" and st["protocol"] == "5" and st["tls"] is False
    assert st["broker"] == f"127.0.0.1:{b.port}"
    assert st["published"] == st["acked"] == len(expected) and st["inflight"] == 0
    assert st["connects"] == 1 and st["disconnects"] == 0 and st["last_error"] is None
    assert abs(st["last_connect_ms"] - time.time() * 1000) < 60_000
    # state and status are retained, telemetry and responses are not (PROTOCOL.md §1)
    with Consumer(b.host, b.port, f"{PREFIX}/#") as late:
        got = late.wait_for(lambda ms: any(m.topic == STATE for m in ms), timeout=5)
        time.sleep(0.2)
        got = late.messages
    assert [(m.topic, m.payload, m.retain) for m in got] == [(STATE, b"state-final", True)]


def test_plain_tcp_with_username_and_password(make_broker, outbox, make_uplink,
                                              tmp_path: Path, caplog) -> None:
    passwd = shutil.which("mosquitto_passwd")
    if passwd is None:
        pytest.skip("mosquitto_passwd not installed")
    subprocess.run([passwd, "-b", "-c", str(tmp_path / "passwd"), "vehicle", "s3cret"],
                   check=True, capture_output=True)
    b = make_broker(extra_config=["allow_anonymous false",
                                  f"password_file {tmp_path / 'passwd'}"])
    (tmp_path / "good").write_text("s3cret\nthe first line only\n")
    (tmp_path / "bad").write_text("wrong\n")
    add(outbox, None, 5)

    caplog.set_level("WARNING", logger="agent.mqtt")
    bad = make_uplink(config(b.port, username="vehicle", password_file=tmp_path / "bad"),
                      outbox, client_id="tcu-bad")
    wait_until(lambda: bad.status()["errors"] >= 3, what="repeated refusals")
    st = bad.status()
    assert st["state"] in ("connecting", "disconnected") and st["connects"] == 0
    assert "refused" in st["last_error"] and "authoriz" in st["last_error"].lower()
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1, "each distinct error is logged once"
    assert bad.stop(1.0) == 5

    with AuthedConsumer(b.port) as c:
        good = make_uplink(config(b.port, username="vehicle", password_file=tmp_path / "good"),
                           outbox)
        assert seqs_in(c.wait_for_count(5)) == [1, 2, 3, 4, 5]
    wait_until(lambda: left(outbox) == 0)
    assert good.status()["connects"] == 1


class AuthedConsumer(Consumer):
    def __init__(self, port: int) -> None:
        super().__init__("127.0.0.1", port, f"{PREFIX}/#")
        self._client.username_pw_set("vehicle", "s3cret")


# --------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------


def tls_broker(make_broker, pki: Pki, mutual: bool) -> Mosquitto:
    return make_broker(cafile=pki.ca, certfile=pki.server_cert, keyfile=pki.server_key,
                       require_certificate=mutual)


def test_tls_server_authentication(make_broker, pki: Pki, outbox, make_uplink) -> None:
    b = tls_broker(make_broker, pki, mutual=False)
    add(outbox, None, 20)
    with Consumer(b.host, b.port, f"{PREFIX}/#", ca=pki.ca) as c:
        up = make_uplink(config(b.port, tls=TlsConfig(ca=pki.ca)), outbox)
        assert seqs_in(c.wait_for_count(20)) == list(range(1, 21))
    wait_until(lambda: left(outbox) == 0)
    assert up.status()["tls"] is True and up.status()["state"] == "connected"


def test_tls_with_an_untrusted_server_is_refused_and_retried(make_broker, pki: Pki, outbox,
                                                             make_uplink) -> None:
    b = tls_broker(make_broker, pki, mutual=False)
    add(outbox, None, 3)
    up = make_uplink(config(b.port, tls=TlsConfig(ca=pki.rogue_ca)), outbox)
    wait_until(lambda: up.status()["errors"] >= 3, what="repeated failed handshakes")
    st = up.status()
    assert st["connects"] == 0 and st["state"] != "connected"
    assert "CERTIFICATE_VERIFY_FAILED" in st["last_error"]
    assert left(outbox) == 3


def test_mutual_tls(make_broker, pki: Pki, outbox, make_uplink) -> None:
    b = tls_broker(make_broker, pki, mutual=True)
    add(outbox, None, 20)
    tls = TlsConfig(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
    with Consumer(b.host, b.port, f"{PREFIX}/#", ca=pki.ca, cert=pki.client_cert,
                  key=pki.client_key) as c:
        up = make_uplink(config(b.port, tls=tls), outbox)
        assert seqs_in(c.wait_for_count(20)) == list(range(1, 21))
    wait_until(lambda: left(outbox) == 0)
    assert up.status()["state"] == "connected" and up.status()["tls"] is True


def test_mutual_tls_without_a_client_certificate_is_refused(make_broker, pki: Pki, outbox,
                                                            make_uplink) -> None:
    b = tls_broker(make_broker, pki, mutual=True)
    add(outbox, None, 4)
    up = make_uplink(config(b.port, tls=TlsConfig(ca=pki.ca)), outbox)
    wait_until(lambda: up.status()["errors"] >= 4, what="repeated refusals",
               diag=up.status)
    st = up.status()
    assert st["connects"] == 0 and st["state"] != "connected"
    assert f"127.0.0.1:{b.port} closed the connection before CONNACK" in st["last_error"]
    assert left(outbox) == 4
    time.sleep(0.3)
    assert up.status()["errors"] > st["errors"], "keeps retrying"
    assert up.stop(1.0) == 4  # its thread did not die: stop() still works and reports


def test_unusable_tls_settings_raise_uplink_error(pki: Pki, outbox) -> None:
    tls = TlsConfig(ca=pki.ca, cert=pki.client_cert, key=pki.rogue_key)  # key of another cert
    with pytest.raises(UplinkError, match="mqtt.tls"):
        Uplink(config(1883, tls=tls), outbox, CLIENT_ID, will=Will())


# --------------------------------------------------------------------------
# broker failures, backlog, flow control
# --------------------------------------------------------------------------


def test_broker_killed_and_restarted_loses_nothing(make_broker, outbox, make_uplink) -> None:
    b = persistent_broker(make_broker)
    consumer = SessionConsumer(b.port, TELEMETRY)
    time.sleep(1.5)  # the session is in the broker's database (saved every second)
    connected = []
    will = Will()
    up = make_uplink(config(b.port), outbox, will=will,
                     on_connected=lambda: connected.append(threading.current_thread().name))
    appended: list[int] = []
    running = threading.Event()
    running.set()

    def appender() -> None:
        while running.is_set():
            appended.extend(add(outbox, up, 1, pad=200))
            time.sleep(0.002)

    t = threading.Thread(target=appender)
    t.start()
    try:
        wait_until(lambda: len(consumer.distinct()) >= 200, what="traffic before the kill")
        b.kill()  # SIGKILL: no goodbye to anyone
        wait_until(lambda: up.status()["state"] != "connected", what="the uplink to notice")
        time.sleep(0.3)
        during_outage = len(appended)
        b.start()  # same port
        wait_until(lambda: up.status()["connects"] >= 2, what="a reconnect")
        wait_until(lambda: len(consumer.distinct()) >= during_outage + 200,
                   what="traffic after the restart")
    finally:
        running.clear()
        t.join()
    try:
        wait_until(lambda: left(outbox) == 0, timeout=20, what="the outbox to drain",
                   diag=up.status)
        want = set(range(1, len(appended) + 1))
        wait_until(lambda: consumer.distinct() >= want, what="every seq at the consumer",
                   diag=lambda: f"missing {sorted(want - consumer.distinct())[:20]}")
    finally:
        consumer.close()
    assert appended == sorted(want)
    first_seen = list(dict.fromkeys(consumer.seqs))
    assert first_seen == sorted(first_seen), "order kept (duplicates aside)"
    st = up.status()
    assert st["disconnects"] >= 1 and st["connects"] >= 2 and st["acked"] >= len(appended)
    assert connected and all(name == "tcu-uplink" for name in connected), \
        "on_connected runs once per connect, on the uplink's thread"
    assert len(connected) == st["connects"]
    assert will.calls >= st["connects"], "will() before every connection attempt"


def test_backlog_queued_while_broker_down_drains_after_it_comes_up(make_broker, outbox,
                                                                  make_uplink) -> None:
    n, size = 3600, 2048
    b = persistent_broker(make_broker)
    consumer = SessionConsumer(b.port, TELEMETRY)
    b.stop()  # clean exit: the consumer's session is saved
    try:
        up = make_uplink(config(b.port, reconnect_max_s=0.2), outbox)
        wait_until(lambda: up.status()["errors"] >= 2, what="failed attempts")
        add(outbox, up, n, pad=size - 12)
        assert up.status()["state"] != "connected" and left(outbox) == n
        assert "Connection refused" in up.status()["last_error"]
        b.start()
        wait_until(lambda: left(outbox) == 0, timeout=60, what="the backlog to drain",
                   diag=up.status)
        t_empty = time.time()
        wait_until(lambda: consumer.distinct() == set(range(1, n + 1)), timeout=30,
                   what="all of the backlog at the consumer")
    finally:
        consumer.close()
    st = up.status()
    secs = t_empty - st["last_connect_ms"] / 1000
    print(f"\nbacklog of {n} x {size} B drained in {secs:.2f} s after connecting: "
          f"{n / secs:.0f} msgs/s ({n * size / secs / 1e6:.1f} MB/s), "
          f"published {st['published']}, connects {st['connects']}")
    assert st["acked"] == n and st["connects"] == 1


def test_rows_are_acked_only_on_puback_and_resent_after_reconnect(make_broker, make_proxy,
                                                                 outbox, make_uplink) -> None:
    b = make_broker()
    proxy = make_proxy(b.port)
    with Consumer(b.host, b.port, TELEMETRY) as c:
        up = make_uplink(config(proxy.port), outbox)
        wait_until(lambda: up.status()["state"] == "connected")
        proxy.lose_pubacks = True
        add(outbox, up, 5)
        assert seqs_in(c.wait_for_count(5)) == [1, 2, 3, 4, 5]  # the broker has them...
        time.sleep(0.3)
        st = up.status()
        assert left(outbox) == 5, "...but without a PUBACK nothing leaves the outbox"
        assert (st["inflight"], st["published"], st["acked"]) == (5, 5, 0)
        proxy.lose_pubacks = False
        proxy.drop_all()
        wait_until(lambda: left(outbox) == 0, what="the rows to be resent and acked")
        assert seqs_in(c.wait_for_count(10)) == [1, 2, 3, 4, 5] * 2  # again, oldest first
    st = up.status()
    assert (st["connects"], st["published"], st["acked"], st["inflight"]) == (2, 10, 5, 0)


@pytest.mark.parametrize("max_inflight, window", [(64, 20)])
def test_max_inflight_respected(make_broker, make_proxy, outbox, make_uplink,
                                max_inflight: int, window: int) -> None:
    """window: max_inflight, capped by mosquitto's Receive Maximum (20)."""
    b = make_broker()
    proxy = make_proxy(b.port, ack_batch_s=0.02)
    add(outbox, None, 600, pad=100)
    samples: list[int] = []
    up = make_uplink(config(proxy.port, max_inflight=max_inflight), outbox)
    while left(outbox):
        samples.append(up.status()["inflight"])
        time.sleep(0.001)
        assert len(samples) < 30_000, "no progress"
    assert proxy.levels == [5]
    assert proxy.peak == window, "the window is filled, and never overfilled"
    assert max(samples) <= window
    assert up.status()["acked"] == 600


# --------------------------------------------------------------------------
# the will, stop()
# --------------------------------------------------------------------------


def test_will_is_published_retained_when_the_agent_is_killed(make_broker, tmp_path: Path) -> None:
    b = make_broker()
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from agent.adapters.mqtt import Uplink
        from agent.adapters.outbox import Outbox
        from agent.config import MqttConfig
        ob = Outbox({str(tmp_path / "child-outbox")!r})
        def connected():
            ob.append("status", {STATUS!r}, b"online", 0)
            up.wake()
        up = Uplink(MqttConfig(host="127.0.0.1", port={b.port}), ob, "tcu-will-test",
                    will=lambda: ({STATUS!r}, b"offline, signed at connect"),
                    on_connected=connected)
        up.start()
        time.sleep(60)
    """)
    with Consumer(b.host, b.port, STATUS) as c:
        child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
        try:
            c.wait_for(lambda ms: any(m.payload == b"online" for m in ms), timeout=10,
                       what="the online status")
            assert not any(m.payload.startswith(b"offline") for m in c.messages)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        msgs = c.wait_for(lambda ms: len(ms) >= 2, timeout=10, what="the will")
    assert [m.payload for m in msgs] == [b"online", b"offline, signed at connect"]
    with Consumer(b.host, b.port, STATUS) as late:  # and it is retained
        got = late.wait_for_count(1)
    assert (got[0].payload, got[0].retain, got[0].qos) == (b"offline, signed at connect",
                                                           True, 1)


def test_will_is_fresh_for_each_connection(make_broker, make_proxy, outbox,
                                           make_uplink) -> None:
    b = make_broker()
    proxy = make_proxy(b.port)
    with Consumer(b.host, b.port, STATUS) as c:
        up = make_uplink(config(proxy.port), outbox)
        wait_until(lambda: up.status()["connects"] == 1)
        proxy.drop_all()  # the broker sees the vehicle vanish: it publishes the will
        c.wait_for(lambda ms: [m.payload for m in ms] == [b"offline:1"], what="first will")
        wait_until(lambda: up.status()["connects"] == 2, what="a reconnect")
        proxy.drop_all()
        c.wait_for(lambda ms: [m.payload for m in ms] == [b"offline:1", b"offline:2"],
                   what="the second connection's will")


def test_stop_drains_and_disconnects_cleanly(make_broker, outbox, make_uplink) -> None:
    b = make_broker()
    with Consumer(b.host, b.port, f"{PREFIX}/#") as c:
        up = make_uplink(config(b.port), outbox)
        wait_until(lambda: up.status()["state"] == "connected")
        add(outbox, None, 500)  # no wake(): stop() must publish them anyway
        outbox.append("status", STATUS, b"offline (clean shutdown)", 0)
        t0 = time.monotonic()
        assert up.stop(3.0) == 0
        assert time.monotonic() - t0 < 3.0
        msgs = c.wait_for_count(501)
        time.sleep(0.3)  # a will would arrive now
        msgs = c.messages
    assert seqs_in(msgs) == list(range(1, 501))
    assert [m.payload for m in msgs if m.topic == STATUS] == [b"offline (clean shutdown)"]
    st = up.status()
    assert st["state"] == "stopped" and st["acked"] == 501
    with pytest.raises(UplinkError):
        up.start()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_stop_with_a_backlog_lets_the_broker_publish_the_will(make_broker, make_proxy, outbox,
                                                              make_uplink, protocol) -> None:
    """The offline record queued at stop is not acknowledged in time (PUBACKs held back for
    1 s): a clean DISCONNECT would discard the will and leave the retained status "online";
    the will is published instead."""
    b = make_broker()
    proxy = make_proxy(b.port, ack_batch_s=1.0)
    with Consumer(b.host, b.port, STATUS) as c:
        up = make_uplink(config(proxy.port, protocol=protocol), outbox)
        wait_until(lambda: up.status()["state"] == "connected")
        add(outbox, None, 300)
        outbox.append("status", STATUS, b"offline (clean shutdown)", 0)
        assert up.stop(0.3) > 0
        assert outbox.stats()["by_kind"]["status"] == 1, "the offline record was not acked"
        wait_until(lambda: any(m.payload.startswith(b"offline:") for m in c.messages),
                   timeout=5, what="the will on the status topic")
    assert up.status()["protocol"] == protocol
    with Consumer(b.host, b.port, STATUS) as late:
        assert late.wait_for_count(1)[0].payload.startswith(b"offline:")


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_stop_with_a_backlog_but_the_offline_record_delivered_sends_no_will(
        make_broker, make_proxy, outbox, make_uplink, protocol) -> None:
    """Rows are left at stop, but the offline record (urgent: ahead of the backlog) got
    through: the older will must not replace it."""
    b = make_broker()
    proxy = make_proxy(b.port, ack_batch_s=0.1)  # slow: the backlog cannot drain in time
    with Consumer(b.host, b.port, STATUS) as c:
        up = make_uplink(config(proxy.port, protocol=protocol), outbox)
        wait_until(lambda: up.status()["state"] == "connected")
        add(outbox, None, 3000)
        outbox.append("status", STATUS, b"offline (clean shutdown)", 0)
        assert up.stop(1.0) > 0
        assert outbox.stats()["by_kind"]["status"] == 0, "the offline record was acked"
        c.wait_for_count(1)
        time.sleep(0.5)  # a will would arrive now
        assert [m.payload for m in c.messages] == [b"offline (clean shutdown)"]
    with Consumer(b.host, b.port, STATUS) as late:
        got = late.wait_for_count(1)
    assert (got[0].payload, got[0].retain) == (b"offline (clean shutdown)", True)


@pytest.mark.parametrize("broker", ["refusing", "silent"])
def test_stop_returns_in_time_when_broker_unreachable(outbox, make_uplink, broker: str) -> None:
    if broker == "silent":  # accepts TCP (kernel backlog), never answers: CONNACK never comes
        silent = socket.create_server(("127.0.0.1", 0), backlog=8)
        port = silent.getsockname()[1]
    else:
        port = free_port()
    try:
        up = make_uplink(config(port), outbox)
        add(outbox, up, 25)
        time.sleep(0.3)
        assert up.status()["state"] != "connected"
        t0 = time.monotonic()
        assert up.stop(1.0) == 25
        took = time.monotonic() - t0
        assert took <= 1.1, f"stop() took {took:.2f} s"
        assert up.status()["state"] == "stopped"
        if broker == "refusing":
            assert "Connection refused" in up.status()["last_error"]
        assert left(outbox) == 25
    finally:
        if broker == "silent":
            silent.close()


def test_stop_without_start(outbox) -> None:
    add(outbox, None, 2)
    up = Uplink(config(free_port()), outbox, CLIENT_ID, will=Will())
    assert up.status()["state"] == "stopped"
    assert up.stop(0.2) == 2


# --------------------------------------------------------------------------
# MQTT 3.1.1 fallback
# --------------------------------------------------------------------------


@pytest.mark.parametrize("refusal", ["connack", "close"])
def test_falls_back_to_mqtt311_and_remembers(make_broker, make_proxy, outbox, make_uplink,
                                             refusal: str) -> None:
    b = make_broker()
    proxy = make_proxy(b.port, refuse_v5=refusal)
    add(outbox, None, 10)
    with Consumer(b.host, b.port, TELEMETRY) as c:
        up = make_uplink(config(proxy.port), outbox)
        assert seqs_in(c.wait_for_count(10)) == list(range(1, 11))
        st = up.status()
        assert st["state"] == "connected" and st["protocol"] == "3.1.1"
        assert proxy.levels == [5, 4]
        wait_until(lambda: left(outbox) == 0, what="the PUBACKs")
        proxy.drop_all()  # later reconnects go straight to 3.1.1
        wait_until(lambda: up.status()["connects"] == 2, what="a reconnect")
        add(outbox, up, 5)
        assert seqs_in(c.wait_for_count(15)) == list(range(1, 16))
    assert proxy.levels == [5, 4, 4]
    assert up.status()["protocol"] == "3.1.1"
    wait_until(lambda: left(outbox) == 0)


def test_mqtt311_when_configured(make_broker, make_proxy, outbox, make_uplink) -> None:
    b = make_broker()
    proxy = make_proxy(b.port)
    add(outbox, None, 3)
    with Consumer(b.host, b.port, TELEMETRY) as c:
        up = make_uplink(config(proxy.port, protocol="3.1.1"), outbox)
        assert seqs_in(c.wait_for_count(3)) == [1, 2, 3]
    assert proxy.levels == [4] and up.status()["protocol"] == "3.1.1"


# --------------------------------------------------------------------------
# subscriptions (cloud -> vehicle)
# --------------------------------------------------------------------------


def test_subscriptions_are_delivered_and_renewed_on_every_connection(make_broker, make_proxy,
                                                                     outbox,
                                                                     make_uplink) -> None:
    b = make_broker()
    proxy = make_proxy(b.port)
    commands: queue.Queue = queue.Queue()
    extra: queue.Queue = queue.Queue()
    threads = set()

    def on_command(topic: str, payload: bytes) -> None:
        threads.add(threading.current_thread().name)
        if payload == b"boom":
            raise RuntimeError("a broken handler must not break the uplink")
        commands.put((topic, payload))

    up = make_uplink(config(proxy.port), outbox, subscribe={COMMANDS: on_command})
    wait_until(lambda: up.status()["subscribed"], what="the SUBACK")
    publish(b.host, b.port, COMMANDS, b"boom")
    publish(b.host, b.port, COMMANDS, b"cmd-1")
    assert commands.get(timeout=5) == (COMMANDS, b"cmd-1")
    assert "tcu-uplink" not in threads  # paho's network thread: the worker may be busy

    up.subscribe(f"{PREFIX}/extra/#", lambda t, p: extra.put((t, p)))  # while connected
    wait_until(lambda: up.status()["subscribed"], what="the second SUBACK")
    publish(b.host, b.port, f"{PREFIX}/extra/x", b"x-1")
    assert extra.get(timeout=5) == (f"{PREFIX}/extra/x", b"x-1")

    proxy.drop_all()
    wait_until(lambda: up.status()["connects"] == 2 and up.status()["subscribed"],
               what="a reconnect with both subscriptions")
    publish(b.host, b.port, COMMANDS, b"cmd-2")
    publish(b.host, b.port, f"{PREFIX}/extra/y", b"y-2")
    assert commands.get(timeout=5) == (COMMANDS, b"cmd-2")
    assert extra.get(timeout=5) == (f"{PREFIX}/extra/y", b"y-2")
    time.sleep(0.2)
    assert commands.empty() and extra.empty(), "each message once, to its own subscriber"
    assert up.status()["last_error"].startswith(f"connection to 127.0.0.1:{proxy.port} lost")


# --------------------------------------------------------------------------
# latency
# --------------------------------------------------------------------------


def test_wake_latency(make_broker, outbox, make_uplink) -> None:
    b = make_broker(log_type=("error", "warning", "notice", "information"))
    with Consumer(b.host, b.port, TELEMETRY) as c:
        up = make_uplink(config(b.port), outbox)
        wait_until(lambda: up.status()["state"] == "connected")
        latencies = []
        for i in range(1, 201):
            t0 = time.perf_counter()
            add(outbox, up, 1)
            c.wait_for_count(i, timeout=5)
            latencies.append((time.perf_counter() - t0) * 1000)
            if i == 20:  # fail fast if wake() does nothing (see below)
                assert statistics.median(latencies) < 250, latencies
            time.sleep(0.002)  # idle between messages, like command statuses
        msgs = c.messages
    assert seqs_in(msgs) == list(range(1, 201))
    q = statistics.quantiles(latencies, n=100)
    print(f"\nappend+wake -> consumer: p50 {statistics.median(latencies):.2f} ms, "
          f"p99 {q[98]:.2f} ms, max {max(latencies):.2f} ms (message "
          f"{latencies.index(max(latencies)) + 1}) over {len(latencies)} messages")
    # Not a performance check (that is the benchmark's job): without a working wake() only the
    # uplink's 1 s idle safety net would publish, and the median would be ~500 ms.
    assert statistics.median(latencies) < 250


# --------------------------------------------------------------------------
# commands are never retained; oversized packets are refused unread
# --------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_retained_command_is_not_delivered(make_broker, outbox, make_uplink,
                                             protocol: str) -> None:
    b = make_broker()
    publish(b.host, b.port, COMMANDS, b"retained-old", retain=True)
    got: queue.Queue = queue.Queue()
    up = make_uplink(config(b.port, protocol=protocol), outbox,
                     subscribe={COMMANDS: lambda t, p: got.put(p)})
    wait_until(lambda: up.status()["subscribed"], what="the SUBACK")
    publish(b.host, b.port, COMMANDS, b"live", retain=True)  # live: forwarded unretained
    publish(b.host, b.port, COMMANDS, b"plain")
    assert got.get(timeout=5) == b"live" and got.get(timeout=5) == b"plain"
    time.sleep(0.2)
    assert got.empty()
    # MQTT 5: retain handling 2, the broker sends nothing retained; 3.1.1: dropped, counted
    assert up.status()["retained_ignored"] == (0 if protocol == "5" else 1)
    assert up.status()["protocol"] == protocol


def publish_big(port: int, topic: str, payload: bytes) -> None:
    """QoS 1, waiting for the PUBACK by polling (paho's wait_for_publish can raise ValueError
    on a slow machine when its own timeout runs out mid-wait)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1)
        wait_until(info.is_published, timeout=120, what="the broker to take 200 MB")
    finally:
        client.disconnect()
        client.loop_stop()


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_200_mb_command_is_refused_and_rss_stays_bounded(make_broker, tmp_path: Path,
                                                           protocol: str) -> None:
    """The agent process subscribes to commands with the agent's limit (64 KiB + header room):
    on MQTT 5 the broker is told (Maximum Packet Size) and drops the message; on 3.1.1 the
    uplink ends the connection when the packet's length is read, before its body."""
    b = make_broker()  # mosquitto takes packets up to 256 MB by default
    code = textwrap.dedent(f"""
        import json, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from agent.adapters.mqtt import Uplink
        from agent.adapters.outbox import Outbox
        from agent.config import MqttConfig
        from agent.core.uplink import HEADER_ROOM
        ob = Outbox({str(tmp_path / "child-outbox")!r})
        up = Uplink(MqttConfig(host="127.0.0.1", port={b.port}, protocol={protocol!r},
                               reconnect_min_s=0.05, reconnect_max_s=0.2), ob, "tcu-big",
                    will=lambda: ({STATUS!r}, b"offline"), max_packet_size=65536 + HEADER_ROOM)
        import threading
        out = threading.Lock()  # paho's thread and this one print: whole lines, never mixed
        def say(text):
            with out:
                sys.stdout.write(text + "\\n")
                sys.stdout.flush()
        up.subscribe({COMMANDS!r}, lambda t, p: say(f"got {{len(p)}}"))
        up.start()
        for line in sys.stdin:
            say(json.dumps(up.status()))
    """)
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in child.stdout], daemon=True).start()
    got: list[str] = []

    def status() -> dict:
        child.stdin.write("\n")
        child.stdin.flush()
        while not (line := lines.get(timeout=30)).startswith("{"):  # a loaded machine
            got.append(line)
        return json.loads(line)

    try:
        wait_until(lambda: status()["subscribed"], what="the SUBACK")
        before = peak_rss_kb(child.pid)
        publish_big(b.port, COMMANDS, b"x" * (200 * 1024 * 1024))
        connects = 1 if protocol == "5" else 2  # 3.1.1: the connection ended at the packet
        wait_until(lambda: (s := status())["subscribed"] and s["connects"] == connects,
                   timeout=30, what="the uplink subscribed again")
        publish(b.host, b.port, COMMANDS, b"small")  # commands still get through
        wait_until(lambda: status() and "got 5\n" in got, timeout=20, what="the small command")
        st = status()
        peak = peak_rss_kb(child.pid)
    finally:
        child.kill()
        child.wait()
    print(f"\nMQTT {protocol}: peak RSS {before / 1024:.1f} MB before, {peak / 1024:.1f} MB "
          f"after a 200 MB publish on commands; status {st}")
    assert got == ["got 5\n"], "only the small message got in"
    assert peak - before < 20 * 1024, "RSS stays bounded"
    if protocol == "3.1.1":
        assert st["oversized_refused"] == 1 and st["connects"] == 2
        assert "over the limit" in st["last_error"]
    else:  # the broker knows our Maximum Packet Size: it never sends the message
        assert st["oversized_refused"] == 0 and st["connects"] == 1
