"""Floods and storage faults on the commands topic (issue: one command replayed fast, garbage
floods, failed status writes, a full disk).

The service-level tests drive a real, unstarted Agent (its CommandService, replay store and
outbox on disk) through the same entry points the MQTT thread uses (`Agent._on_command`,
`CommandService.screen`), with time passed in. The end-to-end tests run the agent with
Mosquitto and the simulated EV on a virtual bus, and watch the bus."""

from __future__ import annotations

import contextlib
import functools

import random
import time
import uuid

import cbor2
import pytest

from agent.adapters.keys import generate_keypair, load_private_key, load_public_key
from agent.app.runtime import FRAME_LANE, Agent
from agent.config import load_config
from agent.core.cose import Signer, kid_of, verify
from conftest import ROOT
from support.mosquitto import Consumer, Mosquitto, _free_port, publish
import support.wait
from support.buswatch import BusWatch

VIN = "DEMO0EV0000000001"


def _keys_and_trust(tmp_path):
    keys = tmp_path / "keys"
    for stem in ("vehicle", "cloud", "other", "rogue"):
        generate_keypair(keys, stem=stem)
    trust = tmp_path / "trust.toml"
    trust.write_text(f"""
[[key]]
name = "fleet-backend"
public_key = "{keys / 'cloud.pub'}"
allow = ["charge.*", "doors.*", "state.*"]

[[key]]
name = "other-service"
public_key = "{keys / 'other.pub'}"
allow = ["state.*"]
""")
    return keys, trust


def _overrides(tmp_path, keys, trust, port, channel, extra=()):
    return [f"bus.0.channel={channel!r}", f"storage.dir={str(tmp_path / 'state')!r}",
            f"signing.key_file={str(keys / 'vehicle.key')!r}", f"mqtt.port={port}",
            f"commands.trust_store={str(trust)!r}", "mqtt.reconnect_min_s=0.1", *extra]


@pytest.fixture
def svc(tmp_path):
    """An Agent built but not started (no broker: every status stays in the outbox)."""
    keys, trust = _keys_and_trust(tmp_path)
    config = load_config(ROOT / "configs" / "demo.toml", _overrides(
        tmp_path, keys, trust, _free_port(), f"fl-{uuid.uuid4().hex}", ["simulator.enabled=false"]))
    agent = Agent(config)
    agent.commands.admission._rng = random.Random(7).random  # reproducible sampling

    class S:
        pass

    s = S()
    s.agent, s.commands, s.keys = agent, agent.commands, keys
    s.signer = lambda stem="cloud": Signer(load_private_key(keys / f"{stem}.key"))
    s.vehicle = {kid_of(k): k for k in [load_public_key(str(keys / "vehicle.pub"))]}
    yield s
    agent.commands.close()
    agent.publisher.outbox.close()


def command(signer, now_ms, cid=None, name="state.snapshot", ttl_ms=60_000, params=None):
    cid = cid or f"f-{uuid.uuid4().hex[:12]}"
    payload = {"v": 1, "id": cid, "vin": VIN, "name": name, "params": params or {},
               "iat": now_ms, "exp": now_ms + ttl_ms}
    return cid, signer.sign(payload)


def padded(message: bytes, size: int) -> bytes:
    """The same COSE_Sign1 with `size` bytes in its unprotected (unsigned) header."""
    tag = cbor2.loads(message)
    protected, _, payload, signature = tag.value
    return cbor2.dumps(cbor2.CBORTag(18, [protected, {99: b"\0" * size}, payload, signature]))


def responses(s) -> list[dict]:
    rows = s.agent.publisher.outbox.peek(100_000)
    return [verify(r.payload, s.vehicle).payload for r in rows if r.kind == "response"]


# -- item 1: one captured command replayed fast -------------------------------------------

def test_identical_copies_are_answered_once_per_interval_without_a_signature_check(svc):
    s, t0 = svc, int(time.time() * 1000)
    cid, message = command(s.signer(), t0)
    s.commands.receive(message, t0)
    assert [r["status"] for r in responses(s) if r["id"] == cid] == ["SUCCEEDED"]
    copies = [message] * 1000 + [padded(message, 63_000)] * 1000  # padding is not signed
    for i, copy in enumerate(copies):
        s.commands.receive(copy, t0 + i)  # 2,000 copies within 2 s
    counters = s.commands.status()["counters"]
    assert counters["commands.verified"] == 1  # only the first copy cost a signature check
    assert counters["commands.redelivery_dropped"] == 2000
    assert [r["status"] for r in responses(s) if r["id"] == cid] == ["SUCCEEDED"]
    # After the interval (5 s by default) a copy is answered again, once.
    s.commands.receive(padded(message, 1000), t0 + 5_100)
    s.commands.receive(message, t0 + 5_200)
    assert [r["status"] for r in responses(s) if r["id"] == cid] == ["SUCCEEDED", "SUCCEEDED"]


def test_lanes_are_bounded_and_a_command_passes_a_full_frame_lane(svc):
    s, t0 = svc, int(time.time() * 1000)
    a = s.agent
    for i in range(FRAME_LANE + 500):  # the core thread is not running: nothing is taken
        a._enqueue([(0, 0.0, 0x123, b"\0" * 8)])  # one burst of one frame
    cid, message = command(s.signer(), t0)
    a._on_command("commands", message)
    junk = [b"junk %d" % i for i in range(3 * a._command_lane_size)]
    for j in junk:
        a._on_command("commands", j)
    lanes = a.status()["lanes"]
    assert lanes["frames"]["depth"] <= FRAME_LANE and lanes["frames"]["dropped"] >= 500
    assert lanes["commands"]["depth"] <= a._command_lane_size
    # refused by the screen (reject budget) or by the full lane: dropped, never queued unbounded
    assert lanes["commands"]["dropped"] + s.commands.screen_counters["flood_dropped"] >= \
        len(junk) - a._command_lane_size
    a._drain()  # one core-loop pass: a share of the frames and the genuine command
    assert [r["status"] for r in responses(s) if r["id"] == cid] == ["SUCCEEDED"]
    assert a._frames.qsize() > 0  # the frames did not all have to go first


def test_expired_ids_are_purged_by_the_core_loop_pass(svc):
    s, t0 = svc, int(time.time() * 1000)
    cid, message = command(s.signer(), t0, ttl_ms=200)
    s.commands.receive(message, t0)
    assert s.commands.replay.count() == 1
    time.sleep(0.3)  # the lifetime also passes on the monotonic clock
    s.commands.tick(t0 + 61_000)  # no command arrives: the pass purges anyway
    assert s.commands.replay.count() == 0


# -- item 3: garbage and forgeries do not block a genuine command -------------------------

def _forged(message: bytes, i: int) -> bytes:
    tag = cbor2.loads(message)
    protected, unprotected, payload, signature = tag.value
    sig = bytearray(signature)
    sig[i % 32] ^= 1 + (i >> 5) % 255
    sig[32 + i % 32] ^= 1 + i % 251
    return cbor2.dumps(cbor2.CBORTag(18, [protected, unprotected, payload, bytes(sig)]))


def test_a_garbage_flood_costs_no_signature_check_and_a_genuine_command_gets_through(svc):
    s, t0 = svc, int(time.time() * 1000)
    rogue = s.signer("rogue")
    _, stranger = command(rogue, t0)
    garbage = [b"\xa1\x01\x02", b"not cbor at all", stranger, b"\xd2\x84" + b"\0" * 60]
    cid, genuine = command(s.signer(), t0, ttl_ms=120_000)
    answered_at = None
    for i in range(100_000):  # 10,000 garbage messages/s for 10 s
        now = t0 + i // 10
        s.commands.receive(garbage[i % 4], now)
        if i % 20_000 == 0:  # re-sent every 2 s
            s.commands.receive(genuine, now)
            if answered_at is None and any(r["id"] == cid for r in responses(s)):
                answered_at = now - t0
    assert answered_at == 0  # garbage never spent the trusted key's budget
    counters = s.commands.status()["counters"]
    assert counters["commands.verified"] <= 5  # the genuine one (and its re-sends)
    answers = sum(1 for r in responses(s) if r["id"] is None)
    assert answers <= 5 + 10 * 1 + 1  # the garbage budget: 5 saved up plus 1/s
    assert counters["commands.flood_dropped"] >= 99_000


def test_a_forged_flood_under_a_trusted_kid_leaves_a_resent_genuine_command_a_chance(svc):
    s, t0 = svc, int(time.time() * 1000)
    _, template = command(s.signer(), t0)
    cid, genuine = command(s.signer(), t0, ttl_ms=120_000)
    answered_at = None
    for i in range(50_000):  # 5,000 forged messages/s with the trusted kid, for 10 s
        now = t0 + i // 5
        s.commands.receive(_forged(template, i), now)
        if i % 10_000 == 5_000:  # re-sent every 2 s, the flood's budget long spent
            s.commands.receive(genuine, now)
            if answered_at is None and any(r["id"] == cid for r in responses(s)):
                answered_at = now - t0
    assert answered_at is not None and answered_at <= 10_000, answered_at
    counters = s.commands.status()["counters"]
    # the key's budget (20/s, 40 burst) plus a 5 % sample: bounded, never all 50,000
    assert counters["commands.verified"] <= 40 + 10 * 25 + 0.08 * 50_000
    assert counters["commands.budget_dropped"] >= 40_000
    anonymous = [r for r in responses(s) if r["id"] is None]  # BAD_SIGNATURE, id null
    assert len(anonymous) <= 5 + 10 * 1 + 1  # the garbage budget, not 20/s of the reject one
    # another trusted key's budget is its own
    cid2, other = command(s.signer("other"), t0 + 10_000)
    s.commands.receive(other, t0 + 10_000)
    assert any(r["id"] == cid2 for r in responses(s))


# -- items 4 and 8: storage failures -------------------------------------------------------

wait_until = functools.partial(support.wait.wait_until, timeout=10.0)


@pytest.fixture
def live(tmp_path):
    broker = Mosquitto().start()
    keys, trust = _keys_and_trust(tmp_path)
    channel = f"fl-{uuid.uuid4().hex}"
    overrides = _overrides(tmp_path, keys, trust, broker.port, channel,
                           ["commands.redelivery_interval_ms=0"])
    watch = BusWatch(channel)
    config = load_config(ROOT / "configs" / "demo.toml", overrides)
    agent = Agent(config)
    agent.start()
    consumer = Consumer(broker.host, broker.port, f"vehicles/{VIN}/responses").start()
    vehicle = {kid_of(k): k for k in [load_public_key(str(keys / "vehicle.pub"))]}

    class L:
        pass

    r = L()
    r.agent, r.broker, r.watch, r.consumer, r.keys = agent, broker, watch, consumer, keys
    r.config = config
    r.signer = Signer(load_private_key(keys / "cloud.key"))
    r.statuses = lambda cid: [verify(m.payload, vehicle).payload for m in consumer.messages
                              if verify(m.payload, vehicle).payload.get("id") == cid]
    assert wait_until(lambda: agent.publisher.uplink.status()["state"] == "connected"
                      and agent.core.lookup("VCU_Status.Gear") is not None)
    time.sleep(0.3)
    yield r
    consumer.stop()
    r.agent.stop()
    watch.close()
    broker.close()


def _outbox_read_only(agent, on: bool) -> None:
    """The outbox's database refuses writes (SQLITE_READONLY), the replay store still works."""
    outbox = agent.publisher.outbox
    with outbox._lock:
        outbox._conn.execute(f"PRAGMA query_only = {1 if on else 0}")


def test_a_failed_accepted_write_sends_nothing_and_is_answered_truthfully(live):
    r = live
    r.agent.simulator.vehicle.state.locked = True
    time.sleep(0.2)
    _outbox_read_only(r.agent, True)
    t = time.monotonic()
    cid, message = command(r.signer, int(time.time() * 1000), name="doors.unlock")
    publish(r.broker.host, r.broker.port, f"vehicles/{VIN}/commands", message)
    assert wait_until(lambda: r.watch.requests_since(t)
                      or r.agent.status()["counters"].get("commands.aborted", 0) == 1)
    time.sleep(0.5)  # the repeats would be due by now
    assert r.watch.requests_since(t) == [], "a frame reached the bus without a durable ACCEPTED"
    assert r.agent.simulator.vehicle.state.locked
    _outbox_read_only(r.agent, False)  # room again: the answer kept in memory goes out
    assert wait_until(lambda: r.statuses(cid))
    assert [(x["status"], x.get("reason")) for x in r.statuses(cid)] == \
        [("REJECTED", "INTERNAL_ERROR")]
    publish(r.broker.host, r.broker.port, f"vehicles/{VIN}/commands", message)  # a re-send
    assert wait_until(lambda: len(r.statuses(cid)) == 2)
    again = r.statuses(cid)[1]
    assert (again["status"], again["reason"]) == ("REJECTED", "INTERNAL_ERROR")
    assert "restart" not in again.get("detail", "")
    assert r.watch.requests_since(t) == [] and r.agent.simulator.vehicle.state.locked
    r.agent.stop()  # a restart does not contradict the answer
    r.agent = Agent(r.config)
    r.agent.start()
    assert wait_until(lambda: r.agent.publisher.uplink.status()["state"] == "connected")
    time.sleep(1.0)
    assert len(r.statuses(cid)) == 2 and r.watch.requests_since(t) == []


@contextlib.contextmanager
def _tiny_disk_agent(tmp_path):
    """An agent whose storage.dir is a 2 MB tmpfs, connected to a fresh Mosquitto; yields
    (agent, the tmpfs, send(): the id of a genuine command published, answers(id))."""
    from support.tmpfs import tmpfs

    broker = Mosquitto().start()
    keys, trust = _keys_and_trust(tmp_path)
    vehicle = {kid_of(k): k for k in [load_public_key(str(keys / "vehicle.pub"))]}
    with tmpfs(tmp_path / "tiny", "2m") as tiny:
        overrides = _overrides(tmp_path, keys, trust, broker.port, f"fl-{uuid.uuid4().hex}",
                               [f"storage.dir={str(tiny / 'state')!r}"])
        agent = Agent(load_config(ROOT / "configs" / "demo.toml", overrides))
        agent.start()
        consumer = Consumer(broker.host, broker.port, f"vehicles/{VIN}/responses").start()

        def send() -> str:
            cid, message = command(Signer(load_private_key(keys / "cloud.key")),
                                   int(time.time() * 1000))
            publish(broker.host, broker.port, f"vehicles/{VIN}/commands", message)
            return cid

        def answers(cid: str) -> list:
            return [p for p in (verify(m.payload, vehicle).payload for m in consumer.messages)
                    if p.get("id") == cid]
        try:
            assert wait_until(lambda: agent.publisher.uplink.status()["state"] == "connected")
            time.sleep(0.3)
            yield agent, tiny, send, answers
        finally:
            consumer.stop()
            agent.stop()
    broker.close()


def _terminal(answers: list) -> list:
    return [p for p in answers if p["status"] in ("SUCCEEDED", "FAILED", "REJECTED")]


def test_a_full_disk_still_answers_a_command(tmp_path):
    from support.tmpfs import fill

    with _tiny_disk_agent(tmp_path) as (agent, tiny, send, answers):
        filler = fill(tiny / "filler")
        cid = send()
        assert wait_until(lambda: agent.status()["counters"].get("commands.received"))
        time.sleep(1.0)  # the command is handled while the disk is full
        filler.unlink()  # room again: what was kept in memory is stored and sent
        assert wait_until(lambda: answers(cid))
        assert len(_terminal(answers(cid))) == 1, answers(cid)


def test_a_disk_that_stays_full_answers_from_memory(tmp_path):
    """No room comes back: the status the outbox cannot store goes out from memory (the
    uplink's publish_volatile), so the cloud still gets exactly one terminal answer."""
    from support.tmpfs import fill

    with _tiny_disk_agent(tmp_path) as (agent, tiny, send, answers):
        fill(tiny / "filler")  # and it stays full
        cid = send()
        assert wait_until(lambda: _terminal(answers(cid)), timeout=20.0)
        time.sleep(1.5)  # no second, different answer follows
        assert len(_terminal(answers(cid))) == 1, answers(cid)
        assert agent.publisher.status()["volatile"]["pending"] == 0


# -- the vehicle's clock -------------------------------------------------------------------

def test_a_vehicle_clock_in_1970_refuses_every_command_as_issued_in_the_future(svc):
    """An RTC that lost its battery boots at the epoch: the window check trusts it, so every
    genuine command is refused (README "Reliability"); nothing reaches a family."""
    s, t0 = svc, int(time.time() * 1000)
    boot_1970 = 42_000  # 42 s after the epoch
    for name in ("state.snapshot", "doors.unlock", "charge.start"):
        cid, message = command(s.signer(), t0, name=name)
        s.commands.receive(message, boot_1970)
        (answer,) = [r for r in responses(s) if r["id"] == cid]
        assert (answer["status"], answer["reason"], answer["detail"]) == \
            ("REJECTED", "EXPIRED", "issued in the future")
        assert answer["t"] == boot_1970  # the status carries the vehicle's (wrong) time
    assert s.commands.status()["counters"].get("commands.accepted", 0) == 0
