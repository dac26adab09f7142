"""The whole agent as a process: CAN frames in through an slcan pty, signed messages out
through a real Mosquitto, every one verified by the test's consumer."""

from __future__ import annotations

import json
import time

import pytest

from support.agentproc import VIN, AgentProcess, SessionConsumer, SlcanFeeder, Verifier, wait_for
from support.certs import generate_pki
from support.mosquitto import Consumer, Mosquitto

pytestmark = pytest.mark.mqtt


@pytest.fixture
def feeder(tmp_path, test_dbc):
    f = SlcanFeeder(tmp_path, test_dbc).start()
    yield f
    f.close()


def start_agent(tmp_path, test_dbc, feeder, broker, **kw):
    mqtt = {"host": broker.host, "port": broker.port, **kw.pop("mqtt", {})}
    return AgentProcess(tmp_path, test_dbc, feeder.link, mqtt, **kw).start()


def seqs_of(consumer, verifier):
    return sorted({p["seq"] for p in verifier.check(consumer.messages).get("telemetry", [])})


def no_gaps(seqs):
    return seqs and seqs == list(range(1, seqs[-1] + 1))


def test_plain_tcp_signed_telemetry_state_status_and_clean_stop(tmp_path, test_dbc, feeder):
    with Mosquitto() as broker, Consumer(broker.host, broker.port, f"vehicles/{VIN}/#") as c:
        agent = start_agent(tmp_path, test_dbc, feeder, broker)
        try:
            v = Verifier(agent.public_key)
            wait_for(lambda: len(seqs_of(c, v)) >= 5, what="5 telemetry batches")
            kinds = v.check(c.messages)
            assert kinds["status"][0]["online"] is True
            assert kinds["state"], "no state record after connecting"
            soc = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"
            assert soc in kinds["state"][-1]["values"]
            status = agent.cli("status")
            assert status.returncode == 0, status.stdout + status.stderr
            assert "uplink    connected" in status.stdout and "bus pt" in status.stdout
            raw = json.loads(agent.cli("status", "--json").stdout)
            assert raw["outbox"]["last_acked_seq"] >= 1
            assert agent.terminate() == 0  # SIGTERM: clean exit
        finally:
            agent.close()
        final = v.check(c.messages)
        assert final["status"][-1]["online"] is False  # the explicit offline record
        assert no_gaps(seqs_of(c, v))
        out = agent.cli("status")
        assert out.returncode == 1 and "no agent is running" in out.stdout


def test_mutual_tls_and_a_client_without_certificate(tmp_path, test_dbc, feeder):
    pki = generate_pki(tmp_path / "pki", client_id="tcu-" + VIN)
    with Mosquitto(cafile=pki.ca, certfile=pki.server_cert, keyfile=pki.server_key,
                   require_certificate=True) as broker, \
            Consumer(broker.host, broker.port, f"vehicles/{VIN}/#", ca=pki.ca,
                     cert=pki.client_cert, key=pki.client_key) as c:
        agent = start_agent(tmp_path, test_dbc, feeder, broker, mqtt={"tls": {
            "ca": str(pki.ca), "cert": str(pki.client_cert), "key": str(pki.client_key)}})
        try:
            v = Verifier(agent.public_key)
            wait_for(lambda: len(seqs_of(c, v)) >= 3, what="telemetry over mutual TLS")
            assert json.loads(agent.cli("status", "--json").stdout)["uplink"]["tls"] is True
        finally:
            agent.close()
        # the same agent without a client certificate is refused, keeps running, says why
        (tmp_path / "nocert").mkdir()
        agent2 = start_agent(tmp_path / "nocert", test_dbc, feeder, broker,
                             mqtt={"tls": {"ca": str(pki.ca)}})
        try:
            def refused():
                out = agent2.cli("status", "--json")
                if out.returncode != 0:
                    return False
                up = json.loads(out.stdout)["uplink"]
                return up["state"] != "connected" and up["last_error"] and up["errors"] >= 2
            wait_for(refused, what="the uplink to report the refusal")
            assert agent2.proc.poll() is None  # still running, queueing telemetry
            ob = json.loads(agent2.cli("status", "--json").stdout)["outbox"]
            assert ob["messages"] > 0
        finally:
            agent2.close()


def test_tls_server_authentication(tmp_path, test_dbc, feeder):
    pki = generate_pki(tmp_path / "pki")
    with Mosquitto(cafile=pki.ca, certfile=pki.server_cert, keyfile=pki.server_key) as broker, \
            Consumer(broker.host, broker.port, f"vehicles/{VIN}/#", ca=pki.ca) as c:
        agent = start_agent(tmp_path, test_dbc, feeder, broker,
                            mqtt={"tls": {"ca": str(pki.ca)}})
        try:
            v = Verifier(agent.public_key)
            wait_for(lambda: len(seqs_of(c, v)) >= 3, what="telemetry over TLS")
        finally:
            agent.close()


def test_broker_killed_and_restarted_no_gap(tmp_path, test_dbc, feeder):
    with Mosquitto(persistence=True) as broker:
        c = SessionConsumer(broker.host, broker.port, f"vehicles/{VIN}/#")
        agent = start_agent(tmp_path, test_dbc, feeder, broker)
        try:
            v = Verifier(agent.public_key)
            wait_for(lambda: len(seqs_of(c, v)) >= 3, what="telemetry before the outage")
            time.sleep(1.2)  # the consumer's session is in the broker's database
            broker.kill()
            time.sleep(3.0)  # batches queue in the agent's outbox meanwhile
            broker.start()
            last = max(seqs_of(c, v))
            wait_for(lambda: max(seqs_of(c, v)) >= last + 15, timeout=30,
                     what="the backlog and fresh data after the restart")
            assert no_gaps(seqs_of(c, v)), seqs_of(c, v)
        finally:
            agent.close()
            c.close()


def test_agent_killed_mid_stream_and_restarted(tmp_path, test_dbc, feeder):
    with Mosquitto() as broker, Consumer(broker.host, broker.port, f"vehicles/{VIN}/#") as c:
        agent = start_agent(tmp_path, test_dbc, feeder, broker)
        v = Verifier(agent.public_key)
        try:
            wait_for(lambda: len(seqs_of(c, v)) >= 4, what="telemetry before the kill")
            agent.kill()  # SIGKILL: no goodbye, the will says offline
            wait_for(lambda: any(p["online"] is False
                                 for p in v.check(c.messages).get("status", [])),
                     what="the MQTT will (offline record)")
            before = max(seqs_of(c, v))
            agent.start()
            wait_for(lambda: max(seqs_of(c, v)) >= before + 5, what="telemetry after restart")
            assert no_gaps(seqs_of(c, v)), seqs_of(c, v)  # every seq 1..last at least once
        finally:
            agent.close()


def test_outbox_full_evicts_telemetry_reports_drop_keeps_statuses(tmp_path, test_dbc, feeder):
    from agent.adapters.keys import generate_keypair, load_private_key
    from agent.adapters.outbox import Outbox
    from agent.core.cose import Signer

    generate_keypair(tmp_path / "keys")
    signer = Signer(load_private_key(tmp_path / "keys" / "vehicle.key"))
    with Outbox(tmp_path / "state", 64 * 1024) as ob:  # a command status waiting from before
        ob.append("response", f"vehicles/{VIN}/responses", signer.sign(
            {"v": 1, "vin": VIN, "id": "c-1", "t": 1, "status": "SUCCEEDED"}), 1)
    gate = Gate()  # no coverage until the gate opens: everything stays in the 64 KiB outbox
    with Mosquitto() as broker, Consumer(broker.host, broker.port, f"vehicles/{VIN}/#") as c:
        agent = AgentProcess(tmp_path, test_dbc, feeder.link,
                             {"host": "127.0.0.1", "port": gate.port},
                             storage_max_bytes=64 * 1024, batch_age_ms=100).start()
        try:
            def evicted():
                out = agent.cli("status", "--json")
                return out.returncode == 0 and json.loads(out.stdout)["outbox"]["evicted_batches"] > 3
            wait_for(evicted, timeout=60, what="telemetry evicted from the full outbox")
            gate.open_to(broker.port)
            v = Verifier(agent.public_key)
            wait_for(lambda: any(p.get("drop") for p in
                                 v.check(c.messages).get("telemetry", [])),
                     timeout=30, what="a batch reporting drop")
            responses = v.check(c.messages).get("responses", [])
            assert [r["id"] for r in responses] == ["c-1"]  # the status was never evicted
            seqs = seqs_of(c, v)
            assert seqs[0] > 1  # the oldest batches were evicted: a truthful gap before them
        finally:
            agent.close()
            gate.close()


def test_stop_on_a_full_disk_still_stops_the_uplink_and_leaves_with_the_will(tmp_path, test_dbc):
    """The outbox's filesystem is full at stop: the offline record cannot be queued, yet stop()
    returns, the uplink is stopped, the outbox closed, and the broker publishes the will."""
    import uuid

    from agent.adapters.keys import generate_keypair, load_private_key
    from agent.config import config_from_dict
    from agent.errors import StorageError
    from agent.app.publisher import Publisher
    from support.tmpfs import fill, tmpfs

    with tmpfs(tmp_path / "tiny", "1m") as tiny:
        generate_keypair(tmp_path / "keys", stem="vehicle")
        key = load_private_key(tmp_path / "keys" / "vehicle.key")
        with Mosquitto() as broker, \
                Consumer(broker.host, broker.port, f"vehicles/{VIN}/status") as c:
            pub = Publisher(config_from_dict({
                "vehicle": {"vin": VIN}, "storage": {"dir": str(tiny / "state")},
                "bus": [{"name": "pt", "interface": "virtual",
                         "channel": f"t-{uuid.uuid4().hex}", "dbc": [str(test_dbc)]}],
                "signing": {"key_file": str(tmp_path / "keys" / "vehicle.key")},
                "mqtt": {"host": broker.host, "port": broker.port}}, base=tmp_path))
            pub.start()
            wait_for(pub.take_connected, what="a connection")
            pub.online()
            v = Verifier(key.public_key())
            wait_for(lambda: pub.outbox.stats()["messages"] == 0
                     and v.check(c.messages).get("status"), what="the online record")
            # An emptied WAL first: with small pages a record may fit in the unused rest of
            # the WAL's last allocated page, and then the disk would not be full for the outbox.
            pub.outbox.flush()  # the held ack of the online record
            pub.outbox._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            fill(tiny / "filler")  # the disk fills up
            with pytest.raises(StorageError):  # the disk really is full
                pub.outbox.append("status", f"vehicles/{VIN}/status", b"x", 0)
            assert pub.stop(2.0) == 0  # returns normally
            assert pub.uplink.status()["state"] == "stopped"
            with pytest.raises(StorageError, match="closed"):
                pub.outbox.stats()
            wait_for(lambda: [p["online"] for p in v.check(c.messages).get("status", [])]
                     == [True, False], what="the will")


class Gate:
    """A TCP port that refuses connections until open_to(port) forwards it to a broker."""

    def __init__(self):
        import socket
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._server = None

    def open_to(self, target: int) -> None:
        import socket
        import threading

        self._server = srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(8)

        def pump(a, b):
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        def accept():
            while True:
                try:
                    client, _ = srv.accept()
                except OSError:
                    return
                upstream = socket.create_connection(("127.0.0.1", target))
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=pump, args=(a, b), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()

    def close(self) -> None:
        if self._server:
            self._server.close()
