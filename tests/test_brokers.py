"""The broker tier: the agent end to end against every broker a fleet runs, Mosquitto (MQTT 5)
and RabbitMQ's MQTT plugin (3.1.1 only), each with the shipped per-vehicle permissions
(configs/brokers/) in force: every client logs in, vehicles by their VIN, the cloud as
tcu-cloud, by password on one listener and by certificate (mutual TLS, CN = user) on another.

One broker of each kind serves the whole module (RabbitMQ takes seconds to boot); each test
clears the retained topics it reads and signs with its own fresh vehicle key, so nothing
from an earlier test can pass for its own."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agent.adapters.keys import generate_keypair, load_private_key
from agent.core.cose import Signer
from conftest import ROOT
from support import certs
from support.agentproc import VIN, AgentProcess, SlcanFeeder, Verifier, wait_for
from support.mosquitto import (Consumer, Mosquitto, _free_port, make_password_file, publish,
                               try_connect, try_publish)
from support.rabbitmq import RabbitMQ

pytestmark = [pytest.mark.e2e, pytest.mark.mqtt]

VIN_B = "TESTVIN0000000002"
CLOUD = "tcu-cloud"
PASSWORDS = {VIN: "pw-" + uuid.uuid4().hex[:8], CLOUD: "pw-" + uuid.uuid4().hex[:8]}
CONFIGS = ROOT / "configs" / "brokers"
SOC = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"


# -- the fleet's PKI: one CA, a certificate per vehicle and for the cloud -------------------

class FleetPki:
    def __init__(self, d: Path):
        d.mkdir(parents=True, exist_ok=True)
        ca_key, ca = certs._make_ca("tcu-agent test CA")
        self.ca = certs._write_cert(d / "ca.pem", ca)
        key, cert = certs._make_leaf(ca_key, ca, "localhost", server=True)
        self.server_cert = certs._write_cert(d / "server.pem", cert)
        self.server_key = certs._write_key(d / "server.key", key)
        self.clients = {}
        for cn in (VIN, VIN_B, CLOUD):
            key, cert = certs._make_leaf(ca_key, ca, cn, server=False)
            self.clients[cn] = (certs._write_cert(d / f"{cn}.pem", cert),
                                certs._write_key(d / f"{cn}.key", key))
        rogue_key, rogue = certs._make_ca("tcu-agent test CA")  # same name, other key
        key, cert = certs._make_leaf(rogue_key, rogue, VIN, server=False)
        self.rogue = (certs._write_cert(d / "rogue.pem", cert),
                      certs._write_key(d / "rogue.key", key))


# -- the broker under test, with the shipped permissions ------------------------------------

class Fleet:
    """A broker with configs/brokers/ in force: ``port`` takes password logins, ``tls_port``
    client certificates. ``login(user)`` / ``cert(user)`` give the keyword arguments of the
    test clients (support.mosquitto's Consumer, publish, try_connect, try_publish)."""

    name: str
    protocol: str  # what the test clients speak: the broker's best
    host = "127.0.0.1"
    port: int
    tls_port: int
    broker: Mosquitto | RabbitMQ

    def __init__(self, pki: FleetPki):
        self.pki = pki

    def login(self, user: str, **kw) -> dict:
        return {"protocol": self.protocol, "username": user, "password": PASSWORDS[user], **kw}

    def cert(self, user: str, **kw) -> dict:
        cert, key = self.pki.clients[user]
        return {"protocol": self.protocol, "ca": self.pki.ca, "cert": cert, "key": key, **kw}

    def restart(self, *, kill: bool = False) -> None:
        self.broker.restart(kill=kill)

    def kill(self) -> None:
        self.broker.kill()

    def start(self) -> None:
        self.broker.start()

    def close(self) -> None:
        self.broker.close()


class MosquittoFleet(Fleet):
    name, protocol = "mosquitto", "5"

    def __init__(self, pki: FleetPki, workdir: Path):
        super().__init__(pki)
        self.port = _free_port()
        # one broker, two listeners: mutual TLS (the harness's), and logins on self.port
        self.broker = Mosquitto(
            cafile=pki.ca, certfile=pki.server_cert, keyfile=pki.server_key,
            require_certificate=True, use_identity_as_username=True,
            acl_file=CONFIGS / "mosquitto-vehicles.acl", allow_anonymous=False,
            password_file=make_password_file(workdir / "passwords", PASSWORDS),
            persistence=True, workdir=workdir, extra_config=[f"listener {self.port} {self.host}"])
        self.broker.start()
        self.tls_port = self.broker.port

    def version(self) -> str:
        out = subprocess.run([self.broker.binary, "-h"], capture_output=True, text=True)
        return out.stdout.splitlines()[0]


class RabbitFleet(Fleet):
    name, protocol = "rabbitmq", "3.1.1"

    def __init__(self, pki: FleetPki):
        super().__init__(pki)
        self.broker = RabbitMQ(cafile=pki.ca, certfile=pki.server_cert, keyfile=pki.server_key)
        self.broker.start()
        self.port, self.tls_port = self.broker.port, self.broker.tls_port
        env = {**os.environ, "RABBITMQCTL": str(self.broker.ctl_path)}
        script = CONFIGS / "rabbitmq-permissions.sh"

        def run(args, password):
            out = subprocess.run(["sh", str(script), *args], input=password + "\n", env=env,
                                 capture_output=True, text=True, timeout=180)
            assert out.returncode == 0, f"{script.name} {args}: {out.stdout}{out.stderr}"

        # VIN and the cloud log in by password or certificate; VIN_B by certificate only.
        # In parallel: each rabbitmqctl call boots an Erlang VM, a second or more.
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(run, (["vehicle", VIN], ["vehicle", VIN_B], ["cloud"]),
                          (PASSWORDS[VIN], "", PASSWORDS[CLOUD])))

    def version(self) -> str:
        return self.broker.version()

    def close(self) -> None:
        pids = [self.broker.pid, self.broker.epmd_pid]
        self.broker.close()
        assert not [p for p in pids if p and _alive(p)], f"RabbitMQ processes left: {pids}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> FleetPki:
    return FleetPki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module", params=["mosquitto", "rabbitmq"])
def fleet(request, pki, tmp_path_factory):
    t = time.monotonic()
    if request.param == "mosquitto":
        f = MosquittoFleet(pki, tmp_path_factory.mktemp("mosquitto"))
    else:
        f = RabbitFleet(pki)
    print(f"\n{f.version()}: up with its permissions in {time.monotonic() - t:.1f} s")
    yield f
    f.close()


@pytest.fixture
def clean(fleet):
    """No retained state/status/diagnostics of VIN left from an earlier test (an empty
    retained message deletes the retained one; only VIN itself may publish there)."""
    for kind in ("status", "state", "diagnostics"):
        publish(fleet.host, fleet.port, f"vehicles/{VIN}/{kind}", b"", retain=True,
                **fleet.login(VIN))
    return fleet


@pytest.fixture
def feeder(tmp_path, test_dbc):
    f = SlcanFeeder(tmp_path, test_dbc).start()
    yield f
    f.close()


class Agents:
    """Starts `tcu-agent run` processes logged in as VIN; closes them all at the end."""

    def __init__(self, tmp_path, test_dbc, feeder, fleet):
        self.tmp, self.dbc, self.feeder, self.fleet = tmp_path, test_dbc, feeder, fleet
        self.started: list[AgentProcess] = []

    def start(self, *, tls: bool = False, port: int | None = None, extra: str = "",
              topic_prefix: str = "", **kw) -> AgentProcess:
        f = self.fleet
        if tls:
            cert, key = f.pki.clients[VIN]
            mqtt_cfg = {"port": port or f.tls_port,
                        "tls": {"ca": str(f.pki.ca), "cert": str(cert), "key": str(key)}}
        else:
            pw = self.tmp / "mqtt-password"
            pw.write_text(PASSWORDS[VIN] + "\n")
            pw.chmod(0o600)
            mqtt_cfg = {"port": port or f.port, "username": VIN, "password_file": str(pw)}
        agent = AgentProcess(self.tmp, self.dbc, self.feeder.link,
                             {"host": f.host, **mqtt_cfg}, extra=extra, **kw)
        if topic_prefix:
            agent.config.write_text(agent.config.read_text().replace(
                f'vin = "{VIN}"', f'vin = "{VIN}"\ntopic_prefix = "{topic_prefix}"'))
        self.started.append(agent)
        return agent.start()

    def close(self):
        for a in self.started:
            a.close()


@pytest.fixture
def agents(tmp_path, test_dbc, feeder, clean):
    a = Agents(tmp_path, test_dbc, feeder, clean)
    yield a
    a.close()


def cloud(fleet, topic: str, **kw) -> Consumer:
    return Consumer(fleet.host, fleet.port, topic, **fleet.login(CLOUD, **kw)).start()


def seqs_of(messages, verifier) -> list[int]:
    return sorted({p["seq"] for p in verifier.check(messages).get("telemetry", [])})


def no_gaps(seqs) -> bool:
    return bool(seqs) and seqs == list(range(1, seqs[-1] + 1))


def status_json(agent) -> dict:
    out = agent.cli("status", "--json")
    return json.loads(out.stdout) if out.returncode == 0 else {}


def assert_protocol(agent, fleet):
    """The agent settled on the broker's protocol: MQTT 5, or 3.1.1 after RabbitMQ dropped
    its MQTT 5 CONNECT."""
    wait_for(lambda: status_json(agent).get("uplink", {}).get("state") == "connected",
             what="a connection")
    assert status_json(agent)["uplink"]["protocol"] == fleet.protocol
    if fleet.protocol == "3.1.1":
        assert "works with MQTT 3.1.1; using it from now on" in agent.log_text()


def test_every_client_logs_in(fleet):
    """No anonymous clients, no wrong passwords, no certificate-less TLS: the permissions below
    mean something only if every client is someone."""
    p = fleet.protocol
    assert not try_connect(fleet.host, fleet.port, protocol=p).ok
    assert not try_connect(fleet.host, fleet.port, **{**fleet.login(VIN), "password": "x"}).ok
    assert not try_connect(fleet.host, fleet.tls_port, protocol=p, ca=fleet.pki.ca).ok
    assert try_connect(fleet.host, fleet.port, **fleet.login(VIN, client_id=f"tcu-{VIN}")).ok
    assert try_connect(fleet.host, fleet.tls_port, **fleet.cert(VIN)).ok


# -- the end-to-end scenarios ----------------------------------------------------------------

def test_telemetry_has_no_seq_gap_across_a_broker_crash(agents):
    fleet = agents.fleet
    session = f"cloud-{uuid.uuid4().hex[:8]}"  # kept by the broker, its queue on disk
    c = cloud(fleet, f"vehicles/{VIN}/telemetry", session=True, client_id=session)
    try:
        agent = agents.start()
        v = Verifier(agent.public_key)
        wait_for(lambda: len(seqs_of(c.messages, v)) >= 3, what="telemetry before the crash")
        assert_protocol(agent, fleet)
        time.sleep(1.2)  # Mosquitto saves the cloud's session to its database (autosave 1 s)
        fleet.kill()  # SIGKILL: what it acknowledged must be on its disk
        try:
            time.sleep(3.0)  # batches queue in the agent's outbox meanwhile
        finally:
            fleet.start()  # (for the next tests too)
        last = max(seqs_of(c.messages, v))
        wait_for(lambda: max(seqs_of(c.messages, v)) >= last + 15, timeout=60,
                 what="the backlog and fresh data after the restart")
        assert no_gaps(seqs_of(c.messages, v)), seqs_of(c.messages, v)
    finally:
        c.stop()
        cloud(fleet, "vehicles/none", client_id=session).stop()  # a clean session ends it


def retained(fleet, *kinds: str) -> list:
    """What a late subscriber gets from the broker's retained store, one exact topic per kind
    (RabbitMQ 3.x sends retained messages only for subscriptions without wildcards)."""
    got = []
    for kind in kinds:
        with cloud(fleet, f"vehicles/{VIN}/{kind}") as late:
            got += late.wait_for(lambda ms: any(m.retain for m in ms), timeout=10,
                                 what=f"the retained {kind}")
    return [m for m in got if m.retain]


def test_retained_state_and_status_survive_a_broker_restart(agents):
    fleet = agents.fleet
    agent = agents.start()
    v = Verifier(agent.public_key)
    with cloud(fleet, f"vehicles/{VIN}/#") as live:
        wait_for(lambda: v.check(live.messages).get("state") and v.check(live.messages).get(
            "status"), what="state and status")
    kinds = v.check(retained(fleet, "state", "status"))
    assert kinds["status"][-1]["online"] is True and SOC in kinds["state"][-1]["values"]
    assert agent.terminate() == 0  # the offline record replaces the retained online one
    fleet.restart()  # graceful: RabbitMQ keeps retained messages in its node's own store
    kinds = v.check(retained(fleet, "state", "status"))
    assert [s["online"] for s in kinds["status"]] == [False]
    assert SOC in kinds["state"][-1]["values"]


def test_the_will_of_a_killed_agent_says_offline_and_is_retained(agents):
    fleet = agents.fleet
    with cloud(fleet, f"vehicles/{VIN}/status") as c:
        agent = agents.start()
        v = Verifier(agent.public_key)
        wait_for(lambda: v.check(c.messages).get("status"), what="the online record")
        assert v.check(c.messages)["status"][0]["online"] is True
        agent.kill()  # SIGKILL: no goodbye; the broker publishes the will
        wait_for(lambda: [p["online"] for p in v.check(c.messages)["status"]] == [True, False],
                 what="the will (offline record)")
    assert [p["online"] for p in v.check(retained(fleet, "status"))["status"]] == [False]


def test_a_signed_command_round_trip(agents, tmp_path):
    fleet = agents.fleet
    keys = tmp_path / "cloud-keys"
    generate_keypair(keys, stem="cloud")
    trust = tmp_path / "trust.toml"
    trust.write_text(f'[[key]]\nname = "fleet"\npublic_key = "{keys / "cloud.pub"}"\n'
                     'allow = ["state.*"]\n')
    agent = agents.start(extra=f'\n[commands]\ntrust_store = "{trust}"\n')
    v = Verifier(agent.public_key)
    wait_for(lambda: status_json(agent).get("uplink", {}).get("subscribed"),
             what="the agent's subscription to its commands")
    with cloud(fleet, f"vehicles/{VIN}/responses") as c:
        now = int(time.time() * 1000)
        cid = f"t-{uuid.uuid4().hex[:12]}"
        command = Signer(load_private_key(keys / "cloud.key")).sign(
            {"v": 1, "id": cid, "vin": VIN, "name": "state.snapshot", "params": {},
             "iat": now, "exp": now + 60_000})
        publish(fleet.host, fleet.port, f"vehicles/{VIN}/commands", command,
                **fleet.login(CLOUD))
        wait_for(lambda: any(r["id"] == cid and r["status"] == "SUCCEEDED"
                             for r in v.check(c.messages).get("responses", [])),
                 what="the signed SUCCEEDED status")
        final = [r for r in v.check(c.messages)["responses"] if r["id"] == cid][-1]
        assert SOC in final["result"]


class Link:
    """A TCP relay to the broker that can be cut (both directions, and no new connections)
    and restored: a network outage the agent cannot tell from a dead broker."""

    def __init__(self, target: int):
        self.target = target
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._conns: list[socket.socket] = []
        self._server: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(8)
        self._server = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def cut(self) -> None:
        if self._server:
            try:
                self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept(): close() would not
            except OSError:
                pass
            self._server.close()
            self._server = None
        for s in self._conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._conns.clear()

    def _accept(self, srv) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    close = cut


def test_the_outbox_drains_after_an_outage_beyond_the_window(agents):
    """More batches than the agent's in-flight window (Mosquitto's Receive Maximum, 20; on
    3.1.1, with none, the agent's own max_inflight, 32) pile up while the link is down; after
    it returns all are delivered, acknowledged and deleted, with no gap."""
    fleet = agents.fleet
    link = Link(fleet.port)
    try:
        with cloud(fleet, f"vehicles/{VIN}/telemetry") as c:
            agent = agents.start(port=link.port, batch_age_ms=100)
            v = Verifier(agent.public_key)
            wait_for(lambda: len(seqs_of(c.messages, v)) >= 3, what="telemetry before")
            link.cut()
            before = max(seqs_of(c.messages, v))
            wait_for(lambda: status_json(agent).get("outbox", {}).get("messages", 0) > 40,
                     timeout=30, what="a backlog beyond the window")
            link.restore()
            wait_for(lambda: status_json(agent).get("outbox", {}).get("messages") == 0,
                     timeout=60, what="the outbox drained")
            st = status_json(agent)
            wait_for(lambda: max(seqs_of(c.messages, v)) >= st["outbox"]["last_acked_seq"],
                     what="every acknowledged batch at the cloud")
            seqs = seqs_of(c.messages, v)
            assert no_gaps(seqs) and seqs[-1] - before > 40, (before, seqs)
    finally:
        link.close()


def test_mutual_tls_with_the_identity_from_the_certificate(agents):
    """The agent's certificate (CN = its VIN) is its login: the ACL lets it through to its own
    topics; a certificate from another CA with the same names is refused."""
    fleet = agents.fleet
    with Consumer(fleet.host, fleet.tls_port, f"vehicles/{VIN}/#", **fleet.cert(CLOUD)) as c:
        agent = agents.start(tls=True)
        v = Verifier(agent.public_key)
        wait_for(lambda: len(seqs_of(c.messages, v)) >= 3 and v.check(c.messages).get("state")
                 and v.check(c.messages).get("status"), what="telemetry, state and status")
        up = status_json(agent)["uplink"]
        assert up["tls"] is True and up["protocol"] == fleet.protocol, up
    rogue_cert, rogue_key = fleet.pki.rogue
    res = try_connect(fleet.host, fleet.tls_port, ca=fleet.pki.ca, cert=rogue_cert,
                      key=rogue_key, protocol=fleet.protocol, client_id=f"tcu-{VIN}")
    assert not res.ok, res


# -- per-vehicle permissions at the broker ---------------------------------------------------

def as_vehicle(fleet, vin: str, auth: str) -> tuple[int, dict]:
    """(port, client keyword arguments) for vehicle *vin* logging in by *auth*; the client id
    is the agent's default, tcu-<VIN> (RabbitMQ's permissions name its queues after it)."""
    if auth == "certificate":
        return fleet.tls_port, fleet.cert(vin, client_id=f"tcu-{vin}")
    return fleet.port, fleet.login(vin, client_id=f"tcu-{vin}")


@pytest.mark.parametrize("auth", ["password", "certificate"])
def test_a_vehicle_cannot_publish_on_another_vehicles_topics(fleet, auth):
    port, vehicle_a = as_vehicle(fleet, VIN, auth)
    with cloud(fleet, "vehicles/+/+") as c:
        forged = try_publish(fleet.host, port, f"vehicles/{VIN_B}/telemetry", b"forged",
                             **vehicle_a)
        also = try_publish(fleet.host, port, f"vehicles/{VIN}/commands", b"self-command",
                           **vehicle_a)
        own = try_publish(fleet.host, port, f"vehicles/{VIN}/telemetry", b"own", **vehicle_a)
        assert own == "acked"
        c.wait_for(lambda ms: any(m.payload == b"own" for m in ms))
        time.sleep(0.5)  # (the refused ones were handled before "own" was even sent)
        # (retained state/status of earlier tests come too: not what this test sent)
        assert [m.topic for m in c.messages if not m.retain] == [f"vehicles/{VIN}/telemetry"]
    # how each broker says no: Mosquitto (MQTT 5) answers with a PUBACK "Not authorized";
    # RabbitMQ closes the connection
    expected = "refused: Not authorized" if fleet.name == "mosquitto" else "closed"
    assert forged.startswith(expected) and also.startswith(expected), (forged, also)


@pytest.mark.parametrize("auth", ["password", "certificate"])
def test_a_vehicle_cannot_subscribe_to_another_vehicles_commands(fleet, auth):
    port, vehicle_a = as_vehicle(fleet, VIN, auth)
    b_port, vehicle_b = as_vehicle(fleet, VIN_B, "certificate")
    spy = Consumer(fleet.host, port, f"vehicles/{VIN_B}/commands", **vehicle_a)
    try:
        if fleet.name == "rabbitmq":
            # RabbitMQ refuses the subscription by closing the connection (no SUBACK)
            with pytest.raises(AssertionError, match="not subscribed"):
                spy.start(timeout=3)
        else:
            # Mosquitto's acl_file grants every SUBSCRIBE and filters what it delivers
            spy.start()
        with Consumer(fleet.host, b_port, f"vehicles/{VIN_B}/commands", **vehicle_b) as b:
            publish(fleet.host, fleet.port, f"vehicles/{VIN_B}/commands", b"for B only",
                    **fleet.login(CLOUD))
            b.wait_for(lambda ms: any(m.payload == b"for B only" for m in ms))
        time.sleep(0.5)
        assert spy.messages == []
    finally:
        spy.stop()


def test_an_agent_on_another_vehicles_topics_gets_nothing_through_and_says_so(agents, tmp_path):
    """A misconfigured vehicle: VIN's credentials, VIN_B's topic prefix. Nothing it sends
    reaches the cloud, its commands subscription is not granted, it keeps everything in
    its outbox (nothing is deleted without a PUBACK) and its status says what happens."""
    fleet = agents.fleet
    generate_keypair(tmp_path / "cloud-keys", stem="cloud")
    trust = tmp_path / "trust.toml"
    trust.write_text(f'[[key]]\nname = "fleet"\n'
                     f'public_key = "{tmp_path / "cloud-keys" / "cloud.pub"}"\n'
                     'allow = ["state.*"]\n')
    with cloud(fleet, f"vehicles/{VIN_B}/#") as c:
        agent = agents.start(extra=f'\n[commands]\ntrust_store = "{trust}"\n',
                             topic_prefix=f"vehicles/{VIN_B}")
        wait_for(lambda: status_json(agent).get("uplink", {}).get("errors", 0) >= 5,
                 timeout=30, what="refusals")
        up, outbox = status_json(agent)["uplink"], status_json(agent)["outbox"]
        assert c.messages == []
        assert up["acked"] == 0 and outbox["messages"] > 0, (up, outbox)
        if fleet.name == "mosquitto":
            # MQTT 5: the PUBACK says why, and the agent says it (its SUBSCRIBE is granted:
            # Mosquitto's acl_file filters deliveries, not subscriptions)
            assert "Not authorized" in up["last_error"], up
            assert "Not authorized" in agent.log_text()
        else:
            # RabbitMQ closes the connection on the first refused PUBLISH or SUBSCRIBE, with
            # no reason on 3.1.1: connections accepted, then lost, never a subscription
            assert up["subscribed"] is False and up["disconnects"] >= 3, up
