"""Tests of the real-broker harness (tests/support/mosquitto.py, certs.py).

Each test runs a real mosquitto on a free 127.0.0.1 port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

try:  # rootdir on sys.path (tests/ is a package, or python -m pytest)
    from tests.support import mosquitto as harness
    from tests.support.certs import Pki, generate_pki
except ImportError:  # pytest put tests/ itself on sys.path
    from support import mosquitto as harness  # type: ignore[no-redef]
    from support.certs import Pki, generate_pki  # type: ignore[no-redef]

from cryptography import x509
from support.wait import wait_until

Consumer = harness.Consumer
Mosquitto = harness.Mosquitto
publish = harness.publish
try_connect = harness.try_connect

pytestmark = pytest.mark.mqtt

CLIENT_ID = "tcu-test-vehicle"


# --------------------------------------------------------------------------
# fixtures / helpers
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return generate_pki(tmp_path_factory.mktemp("pki"), client_id=CLIENT_ID)


@pytest.fixture
def make_broker(tmp_path: Path):
    """Factory for brokers that are always closed; their logs are printed on
    teardown (pytest shows them only when the test failed)."""
    brokers: list[Mosquitto] = []

    def make(**kw) -> Mosquitto:
        kw.setdefault("workdir", tmp_path / f"broker{len(brokers)}")
        b = Mosquitto(**kw)
        brokers.append(b)
        return b.start()

    yield make
    for b in brokers:
        b.close()
        print(f"----- log of {b!r} -----\n{b.log_text()[-8000:]}")


def tls_kw(pki: Pki, *, mutual: bool) -> dict:
    return dict(
        cafile=pki.ca,
        certfile=pki.server_cert,
        keyfile=pki.server_key,
        require_certificate=mutual,
    )


def pid_alive(pid: int) -> bool:
    """True if *pid* runs (zombies count as dead: PID 1 may not reap here)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def port_open(port: int) -> bool:
    return harness._port_accepts("127.0.0.1", port)


# --------------------------------------------------------------------------
# certificates
# --------------------------------------------------------------------------


def test_pki_files(pki: Pki) -> None:
    for key in (pki.server_key, pki.client_key, pki.rogue_key):
        assert (os.stat(key).st_mode & 0o777) == 0o600, key
    ca = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    client = x509.load_pem_x509_certificate(pki.client_cert.read_bytes())
    cn = client.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
    assert cn == CLIENT_ID
    client.verify_directly_issued_by(ca)
    rogue = x509.load_pem_x509_certificate(pki.rogue_cert.read_bytes())
    with pytest.raises(Exception):
        rogue.verify_directly_issued_by(ca)


# --------------------------------------------------------------------------
# plain TCP
# --------------------------------------------------------------------------


def test_plain_round_trip(make_broker) -> None:
    b = make_broker()
    assert b.host == "127.0.0.1" and 1024 <= b.port <= 65535 and b.running
    assert "persistence false" in b.config_path.read_text()
    with Consumer(b.host, b.port, "tcu/+/telemetry") as c:
        publish(b.host, b.port, "other/topic", b"not for us")
        payloads = [b"one", b"\x00\x01\xfe\xff binary", "unicode \u00e9".encode()]
        for i, p in enumerate(payloads):
            publish(b.host, b.port, f"tcu/veh{i}/telemetry", p)
        msgs = c.wait_for_count(3)
    assert [(m.topic, m.payload, m.retain, m.qos) for m in msgs] == [
        (f"tcu/veh{i}/telemetry", p, False, 1) for i, p in enumerate(payloads)
    ]
    assert "New client connected" in b.log_text()


def test_wait_for_timeout_is_a_helpful_assertion(make_broker) -> None:
    b = make_broker()
    with Consumer(b.host, b.port, "t/#") as c:
        publish(b.host, b.port, "t/seen", b"payload-xyz")
        c.wait_for_count(1)
        t0 = time.monotonic()
        with pytest.raises(AssertionError) as ei:
            c.wait_for(lambda ms: len(ms) >= 2, timeout=0.3, what="a second message")
        assert 0.25 <= time.monotonic() - t0 < 3
    text = str(ei.value)
    assert "a second message" in text and "t/seen" in text and "payload-xyz" in text


def test_stop_frees_port_and_leaves_no_process(make_broker) -> None:
    b = make_broker()
    pid, port = b.pid, b.port
    assert pid_alive(pid) and port_open(port)
    b.stop()
    assert not b.running and not pid_alive(pid) and not port_open(port)
    b.stop()  # idempotent
    b.kill()


def test_context_manager_cleans_up_process_and_tempdir() -> None:
    with Mosquitto() as b:
        pid, workdir = b.pid, b.workdir
        assert pid_alive(pid) and workdir.is_dir()
        assert try_connect(b.host, b.port).ok
    assert not pid_alive(pid)
    assert not workdir.exists()


def test_broker_dies_with_its_parent_process(tmp_path: Path) -> None:
    if not harness._setpriv_pdeathsig():
        pytest.skip("setpriv --pdeathsig not available")
    support_dir = Path(harness.__file__).resolve().parent
    code = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(support_dir.parent)!r})
        from support.mosquitto import Mosquitto
        b = Mosquitto(workdir={str(tmp_path / "b")!r}).start()
        print(b.pid, b.port, flush=True)
        time.sleep(60)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        pid, port = map(int, line.split())
        assert pid_alive(pid) and port_open(port)
    finally:
        child.send_signal(signal.SIGKILL)  # no atexit, no finalizers
        child.wait()
        child.stdout.close()
    wait_until(lambda: not pid_alive(pid), what=f"orphaned broker {pid} to exit")


def test_missing_binary_gives_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(harness.shutil, "which", lambda name: None)
    monkeypatch.setattr(harness.os, "access", lambda *a, **k: False)
    with pytest.raises(RuntimeError, match=r"\.ci/install-system-deps"):
        Mosquitto()


def test_start_failure_raises_with_log(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        b = Mosquitto(port=port, workdir=tmp_path / "b", start_timeout=1.0)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError) as ei:
            b.start()
        assert time.monotonic() - t0 < 4
        assert not b.running
    assert "Address already in use" in str(ei.value)
    assert f"listener {port} 127.0.0.1" in str(ei.value)


def test_auto_port_picks_another_when_taken(tmp_path: Path, monkeypatch) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        picks = iter([taken])
        real_free_port = harness._free_port
        monkeypatch.setattr(harness, "_free_port", lambda: next(picks, None) or real_free_port())
        with Mosquitto(workdir=tmp_path / "b") as b:
            assert b.port != taken and try_connect(b.host, b.port).ok
            assert "Address already in use" in b.log_text()


# --------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------


def test_tls_server_authentication(make_broker, pki: Pki) -> None:
    b = make_broker(**tls_kw(pki, mutual=False))
    assert b.tls
    # The client verifies the broker against our CA, by IP and by DNS name.
    assert try_connect(b.host, b.port, ca=pki.ca).ok
    res = try_connect("localhost", b.port, ca=pki.ca)
    assert res.ok, res.detail
    # A client trusting another CA (same DN, other key) must reject the broker.
    res = try_connect(b.host, b.port, ca=pki.rogue_ca)
    assert not res.ok and "CERTIFICATE_VERIFY_FAILED" in res.detail, res.detail
    # No TLS on a TLS port: no MQTT session.
    assert not try_connect(b.host, b.port, timeout=2).ok

    with Consumer(b.host, b.port, "secure/#", ca=pki.ca) as c:
        publish(b.host, b.port, "secure/x", b"over tls", ca=pki.ca)
        [m] = c.wait_for_count(1)
    assert (m.topic, m.payload) == ("secure/x", b"over tls")


def test_mutual_tls(make_broker, pki: Pki) -> None:
    b = make_broker(**tls_kw(pki, mutual=True))
    good = dict(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)

    res = try_connect(b.host, b.port, client_id="good-client", **good)
    assert res.ok, res.detail

    res = try_connect(b.host, b.port, ca=pki.ca, client_id="nocert-client", timeout=3)
    assert not res.ok, res.detail

    res = try_connect(
        b.host, b.port, ca=pki.ca, cert=pki.rogue_cert, key=pki.rogue_key,
        client_id="rogue-client", timeout=3,
    )
    assert not res.ok, res.detail

    # the broker logs its two TLS rejections (asynchronously to our client)
    wait_until(lambda: b.log_text().count("certificate") >= 2, what="rejections in log")
    log = b.log_text()
    assert "as good-client" in log
    assert "as nocert-client" not in log and "as rogue-client" not in log

    with Consumer(b.host, b.port, "cmd/#", **good) as c:
        publish(b.host, b.port, "cmd/unlock", b"\x01", **good)
        [m] = c.wait_for_count(1)
    assert m.topic == "cmd/unlock" and m.payload == b"\x01"
    # publishing without a certificate is impossible too
    with pytest.raises(AssertionError, match="could not connect"):
        publish(b.host, b.port, "cmd/evil", b"x", ca=pki.ca)


def test_consumer_with_rejected_cert_fails_fast(make_broker, pki: Pki) -> None:
    b = make_broker(**tls_kw(pki, mutual=True))
    c = Consumer(b.host, b.port, "#", ca=pki.ca, cert=pki.rogue_cert, key=pki.rogue_key)
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="before CONNACK|connect\\(\\) failed"):
        with c:
            pass
    assert time.monotonic() - t0 < 3  # fails fast, not at the 5 s timeout
    assert not c.connected


# --------------------------------------------------------------------------
# kill / restart
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kill", [True, False], ids=["kill", "stop"])
def test_restart_same_port_and_consumer_reconnects(make_broker, kill: bool) -> None:
    b = make_broker()
    port, pid = b.port, b.pid
    with Consumer(b.host, b.port, "r/#") as c:
        publish(b.host, b.port, "r/before", b"1")
        c.wait_for_count(1)

        if kill:
            b.kill()
        else:
            b.stop()
        assert not b.running and not pid_alive(pid)
        c.wait_disconnected()
        assert not port_open(port)

        b.start()
        assert b.port == port and b.pid != pid and port_open(port)
        c.wait_subscribed(timeout=10)
        assert c.connects == 2

        publish(b.host, b.port, "r/after", b"2")
        msgs = c.wait_for(lambda ms: any(m.topic == "r/after" for m in ms))
    assert [m.payload for m in msgs] == [b"1", b"2"]
    assert b.log_text().count("===== harness: start #") == 2


def test_restart_method_keeps_port(make_broker) -> None:
    b = make_broker()
    port = b.port
    for kill in (False, True, True):
        old = b.pid
        b.restart(kill=kill)
        assert b.port == port and b.pid != old and not pid_alive(old)
        assert try_connect(b.host, b.port).ok


def test_restart_waits_for_its_port_to_be_free_again(make_broker) -> None:
    b = make_broker()
    port = b.port
    b.stop()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    threading.Timer(0.5, squatter.close).start()
    t0 = time.monotonic()
    b.start()  # retries on the same port instead of moving elsewhere
    assert b.port == port and time.monotonic() - t0 >= 0.4
    assert try_connect(b.host, port).ok


# --------------------------------------------------------------------------
# persistence
# --------------------------------------------------------------------------


def _retained_after_restart(b: Mosquitto, kill: bool) -> list:
    publish(b.host, b.port, "state/door", b"locked", retain=True)
    if kill:
        # autosave-on-change writes the DB soon after the PUBACK; wait for it
        # so that a SIGKILL right after is a fair test.
        db = b.persistence_dir / "mosquitto.db"
        wait_until(lambda: db.exists() and b"locked" in db.read_bytes(), what="db write")
    b.restart(kill=kill)
    with Consumer(b.host, b.port, "#") as c:
        # Retained messages are sent right after SUBACK, so once this
        # sentinel arrives any retained message would have been seen.
        publish(b.host, b.port, "sync/sentinel", b"s")
        msgs = c.wait_for(lambda ms: any(m.topic == "sync/sentinel" for m in ms))
    return [(m.topic, m.payload, m.retain) for m in msgs if m.topic != "sync/sentinel"]


@pytest.mark.parametrize("kill", [False, True], ids=["stop", "kill"])
def test_retained_message_survives_restart_with_persistence(make_broker, kill: bool) -> None:
    b = make_broker(persistence=True)
    assert "persistence true" in b.config_path.read_text()
    assert _retained_after_restart(b, kill) == [("state/door", b"locked", True)]


def test_retained_message_lost_without_persistence(make_broker) -> None:
    b = make_broker()
    assert _retained_after_restart(b, kill=False) == []
