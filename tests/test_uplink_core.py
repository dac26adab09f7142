"""The uplink's state machine (agent/core/uplink.py): events in, actions out, time passed in.

A real outbox (SQLite in tmp_path) answers the machine's Peek/Ack/Inspect; the broker's side
(CONNACK, PUBACK, SUBACK, a lost connection) is fed as events. Payloads carry their seq.
"""

from __future__ import annotations

import collections
import random
from pathlib import Path

import pytest

from agent.adapters.outbox import Outbox
from agent.core import uplink as u

VIN = "TESTVIN0000000001"
PREFIX = f"vehicles/{VIN}"
TELEMETRY, STATE, STATUS, RESPONSES, COMMANDS = (
    f"{PREFIX}/{t}" for t in ("telemetry", "state", "status", "responses", "commands"))
WHERE = "127.0.0.1:1883"


def params(**kw) -> u.UplinkParams:
    kw.setdefault("reconnect_min_s", 0.05)
    kw.setdefault("reconnect_max_s", 0.5)
    return u.UplinkParams(WHERE, **kw)


class Driver:
    """Runs the machine like the adapter does, against a real outbox; records the actions."""

    def __init__(self, ob: Outbox, p: u.UplinkParams | None = None, seed: int = 1) -> None:
        self.ob = ob
        self.m = u.UplinkMachine(p or params(), random.Random(seed))
        self.now = 100.0
        self.actions: list = []
        self.inflight: dict[int, u.Publish] = collections.OrderedDict()  # mid -> Publish
        self.published: list[u.Publish] = []
        self._mid = 0
        self.on_peek = None  # called after each Peek (racing appends)
        self.feed(u.Start(self.now))

    def feed(self, ev) -> list:
        todo = collections.deque(self.m.send(ev, self.now))
        done = []
        while todo:
            a = todo.popleft()
            done.append(a)
            self.actions.append(a)
            if (ev := self.execute(a)) is not None:
                todo.extend(self.m.send(ev, self.now))
        return done

    def execute(self, a):
        if isinstance(a, u.Peek):
            rows = self.ob.peek(a.limit, a.after_id, a.urgent)
            if self.on_peek:
                self.on_peek(a)
            return u.Rows(rows)
        if isinstance(a, u.Ack):
            self.ob.ack_many(a.row_ids)
        elif isinstance(a, u.Inspect):
            return u.OutboxInfo(not self.ob.peek(1), self.ob.stats()["by_kind"]["status"] > 0)
        elif isinstance(a, u.Publish):
            self._mid += 1
            self.inflight[self._mid] = a
            self.published.append(a)
            return u.Sent(a.row_id, mid=self._mid)
        elif isinstance(a, u.Subscribe):
            self._mid += 1
            return u.Subscribed(self._mid, a.filters)
        elif isinstance(a, u.Close):
            self.inflight.clear()
        return None

    def tick(self, dt: float = 0.0) -> list:
        self.now += dt
        return self.feed(u.Tick(self.now))

    def until_connect(self, limit: float = 120.0) -> u.Connect:
        """Tick (following the machine's Wait) until it sends a Connect."""
        end = self.now + limit
        while self.now < end:
            for a in self.tick():
                if isinstance(a, u.Connect):
                    return a
            self.now = max(self.now, self.m.wait(self.now).until)
        raise AssertionError("no Connect")

    def connect(self, receive_maximum: int | None = None) -> u.Connect:
        c = self.until_connect()
        self.feed(u.Connected(1_700_000_000_000, receive_maximum))
        self.tick()  # the adapter ticks after every batch of events
        return c

    def ack(self, n: int | None = None) -> None:
        for mid in list(self.inflight)[:n]:
            self.inflight.pop(mid)
            self.feed(u.Puback(mid))
        self.tick()

    def lose(self, detail: str = "Connection lost") -> None:
        self.feed(u.Closed(detail))
        self.tick()

    def of(self, kind):
        return [a for a in self.actions if isinstance(a, kind)]


@pytest.fixture
def ob(tmp_path: Path):
    o = Outbox(tmp_path / "outbox")
    yield o
    o.close()


def add(ob: Outbox, n: int) -> list[int]:
    return [ob.append_telemetry(lambda seq, drop: b"seq:%d|" % seq, 1, 0, TELEMETRY)
            for _ in range(n)]


def seqs(pubs) -> list[int]:
    return [int(p.payload[4:].split(b"|")[0]) for p in pubs if p.topic == TELEMETRY]


def drain(d: Driver, rounds: int = 10_000) -> None:
    for _ in range(rounds):
        if not d.inflight and not d.ob.peek(1):
            return
        d.ack()
    raise AssertionError("no progress")


# ---- delivery ---------------------------------------------------------------------------------

def test_urgent_rows_first_each_kind_in_order_exactly_once_retained_kinds(ob) -> None:
    telemetry, urgent = [], []
    for i in range(300):
        telemetry += [(TELEMETRY, b"seq:%d|" % s, False) for s in add(ob, 1)]
        if i % 50 == 7:
            ob.append("response", RESPONSES, b"response-%d" % i, 0)
            urgent.append((RESPONSES, b"response-%d" % i, False))
    ob.append("state", STATE, b"state-final", 0)
    urgent.append((STATE, b"state-final", True))
    d = Driver(ob)
    d.connect()
    drain(d)
    # Exactly once; responses and state go ahead of the telemetry backlog, each kind in order;
    # state and status are retained, telemetry and responses are not (PROTOCOL.md §1).
    assert [(p.topic, p.payload, p.retain) for p in d.published] == urgent + telemetry
    st = d.m.status()
    assert st["state"] == "connected" and st["protocol"] == "5" and st["tls"] is False
    assert st["broker"] == WHERE and st["last_connect_ms"] == 1_700_000_000_000
    assert st["published"] == st["acked"] == len(urgent + telemetry) and st["inflight"] == 0
    assert st["connects"] == 1 and st["disconnects"] == 0 and st["last_error"] is None
    assert ob.stats()["messages"] == 0


def test_an_urgent_row_appended_during_a_fill_is_sent_once(ob) -> None:
    """A response appended right after each urgent peek (between the urgent and the in-order
    peek of one fill): each is sent exactly once, in order."""
    responses = [b"response-%d" % i for i in range(40)]
    todo = list(responses)
    add(ob, 300)
    d = Driver(ob)

    def race(peek: u.Peek) -> None:
        if peek.urgent and todo:
            ob.append("response", RESPONSES, todo.pop(0), 0)

    d.on_peek = race
    d.connect()
    drain(d)
    assert not todo
    assert [p.payload for p in d.published if p.topic == RESPONSES] == responses
    assert seqs(d.published) == list(range(1, 301))
    st = d.m.status()
    assert st["connects"] == 1 and st["published"] == st["acked"] == 340


def test_rows_sent_early_are_forgotten(ob) -> None:
    """Urgent rows sent ahead of the backlog and acked before the in-order pass gets to them
    do not stay in the connection's cursor."""
    for i in range(200):
        add(ob, 1)
        if i % 4 == 0:
            ob.append("response", RESPONSES, b"r-%d" % i, 0)
    d = Driver(ob, params(max_inflight=10))
    d.connect()
    peak = 0
    while d.inflight or ob.peek(1):
        d.ack()
        peak = max(peak, len(d.m._conn.cursor.early))
    assert peak >= 10  # responses went early, were acked...
    assert len(d.m._conn.cursor.early) == 0  # ...and nothing is kept after the drain
    assert d.m.status()["connects"] == 1


def test_rows_are_acked_only_on_puback_and_resent_after_reconnect(ob) -> None:
    d = Driver(ob)
    d.connect()
    add(ob, 5)
    d.tick()
    assert seqs(d.published) == [1, 2, 3, 4, 5]
    d.tick(0.3)
    st = d.m.status()
    assert ob.stats()["messages"] == 5, "without a PUBACK nothing leaves the outbox"
    assert (st["inflight"], st["published"], st["acked"]) == (5, 5, 0)
    d.lose()
    assert d.m.status()["state"] == "disconnected"
    d.connect()
    drain(d)
    assert seqs(d.published) == [1, 2, 3, 4, 5] * 2  # again, oldest first
    st = d.m.status()
    assert (st["connects"], st["published"], st["acked"], st["inflight"]) == (2, 10, 5, 0)
    assert st["disconnects"] == 1
    assert st["last_error"] == f"connection to {WHERE} lost: Connection lost"


@pytest.mark.parametrize("max_inflight, receive_maximum, window",
                         [(8, None, 8), (64, 20, 20), (8, 20, 8)])
def test_window_is_max_inflight_capped_by_receive_maximum(ob, max_inflight, receive_maximum,
                                                          window) -> None:
    add(ob, 600)
    d = Driver(ob, params(max_inflight=max_inflight))
    d.connect(receive_maximum)
    peak = 0
    while d.inflight or ob.peek(1):
        peak = max(peak, len(d.inflight))
        assert d.m.status()["inflight"] == len(d.inflight)
        d.ack(3)  # acks come in small batches: the window refills in between
    assert peak == window, "the window is filled, and never overfilled"
    assert d.m.status()["acked"] == 600 and seqs(d.published) == list(range(1, 601))


def test_a_refused_puback_drops_the_connection_and_the_row_is_retried(ob) -> None:
    add(ob, 3)
    d = Driver(ob)
    d.connect()
    mids = list(d.inflight)
    d.feed(u.Puback(mids[0]))
    d.feed(u.Puback(mids[1], ok=False, reason="Quota exceeded"))
    d.tick()
    st = d.m.status()
    assert st["state"] == "disconnected" and st["acked"] == 1
    assert st["last_error"] == f"broker {WHERE} refused a message: Quota exceeded"
    assert d.of(u.Close)[-1] == u.Close(False, "5")
    assert ob.stats()["messages"] == 2  # not an ack
    d.connect()
    assert seqs(d.published) == [1, 2, 3, 2, 3]


def test_an_outbox_failure_ends_the_connection(ob) -> None:
    add(ob, 2)
    d = Driver(ob)
    d.connect()
    d.feed(u.OutboxFailed("StorageError: disk I/O error"))
    d.tick()
    st = d.m.status()
    assert st["state"] == "disconnected" and st["disconnects"] == 1
    assert st["last_error"] == "uplink failed while publishing: StorageError: disk I/O error"


def test_a_row_that_can_never_be_sent_is_dropped(ob) -> None:
    add(ob, 1)
    d = Driver(ob)
    c = d.until_connect()
    assert c.protocol == "5"
    d.feed(u.Connected(0))
    d.tick()
    pub = d.published[-1]
    acts = d.m.send(u.Sent(pub.row_id, error="bad topic"), d.now)
    assert u.Log("error", f"dropping outbox row {pub.row_id}: bad topic") in acts


# ---- connecting: backoff, errors, fallback ---------------------------------------------------

def attempts(d: Driver, n: int, fail) -> list[float]:
    """Times of n attempts, each failed by feeding fail()."""
    times = []
    for _ in range(n):
        d.until_connect()
        times.append(d.now)
        d.feed(fail())
    return times


def test_backoff_doubles_with_jitter_and_resets_after_a_connect(ob) -> None:
    p = params(reconnect_min_s=0.5, reconnect_max_s=8.0)
    d = Driver(ob, p, seed=7)
    t = attempts(d, 9, lambda: u.ConnectFailed("ConnectionRefusedError: refused"))
    gaps = [b - a for a, b in zip(t, t[1:])]
    assert t[0] == 100.0, "the first attempt at once"
    delay = 0.5
    for gap in gaps:
        assert max(0.5, delay / 2) <= gap <= delay + 1e-9
        delay = min(delay * 2, 8.0)
    assert len({round(g, 6) for g in gaps[4:]}) > 1, "jittered"
    assert max(gaps) <= 8.0 and gaps[-1] >= 4.0
    st = d.m.status()
    assert st["errors"] == 9 and st["state"] == "disconnected" and st["reconnect_delay_s"] > 0
    assert st["last_error"] == f"cannot connect to {WHERE}: ConnectionRefusedError: refused"
    d.connect()
    assert d.m.status()["reconnect_delay_s"] == 0.0
    d.tick(u.HEALTHY_S)  # a connection that stayed up: the next outage starts afresh
    lost = d.now
    d.lose()
    t = attempts(d, 2, lambda: u.ConnectFailed("x"))
    assert t[0] - lost <= 0.5 and 0.5 <= t[1] - t[0] <= 1.0, "the delay was reset"


def test_a_broker_that_connects_then_drops_every_session_is_backed_off(ob) -> None:
    """An ACL that accepts the CONNECT and closes on the first publish: CONNACK alone does
    not reset the backoff, so the agent does not reconnect at reconnect_min_s forever."""
    p = params(reconnect_min_s=0.5, reconnect_max_s=8.0)
    d = Driver(ob, p, seed=3)
    starts = []
    for _ in range(6):
        d.connect()
        starts.append(d.now)
        d.lose()
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps[-1] >= 4.0, gaps  # 0.5, 1, 2, 4, 8 (jittered down to half at most)


def test_each_distinct_error_is_logged_once_and_again_after_a_connect(ob) -> None:
    d = Driver(ob)
    attempts(d, 4, lambda: u.Refused("Not authorized"))
    logged = [a for a in d.of(u.Log) if a.level == "warning"]
    msg = f"{WHERE} refused the connection (MQTT 5): Not authorized"
    assert logged == [u.Log("warning", msg)]
    st = d.m.status()
    assert st["errors"] == 4 and st["connects"] == 0 and st["last_error"] == msg
    d.connect()
    d.lose()
    attempts(d, 1, lambda: u.Refused("Not authorized"))
    assert [a for a in d.of(u.Log) if a.message == msg] == [u.Log("warning", msg)] * 2


def test_no_connack_in_time(ob) -> None:
    d = Driver(ob, params(protocol="5"))
    d.until_connect()
    d.tick(u.CONNECT_TIMEOUT_S + u.CONNACK_TIMEOUT_S - 0.1)
    assert d.m.status()["errors"] == 0
    d.tick(0.2)
    assert d.m.status()["last_error"] == f"no CONNACK from {WHERE} within 5 s (MQTT 5)"
    assert d.of(u.Close)[-1] == u.Close(False, "5")


@pytest.mark.parametrize("refusal", ["connack", "close", "silent"])
def test_falls_back_to_mqtt311_and_remembers(ob, refusal) -> None:
    d = Driver(ob)
    assert d.until_connect().protocol == "5"
    if refusal == "connack":
        d.feed(u.Refused("Unsupported protocol version", unsupported_version=True))
    elif refusal == "close":
        d.feed(u.Closed("Connection reset by peer"))
    else:
        d.tick(u.CONNECT_TIMEOUT_S + u.CONNACK_TIMEOUT_S)
    t = d.now
    c = d.connect()
    assert c == u.Connect("3.1.1") and d.now == t, "retried at once with 3.1.1"
    assert u.Log("info", u.works_with_311(WHERE)) in d.of(u.Log)
    assert u.works_with_311(WHERE) == \
        f"broker {WHERE} works with MQTT 3.1.1; using it from now on"
    st = d.m.status()
    assert st["state"] == "connected" and st["protocol"] == "3.1.1"
    d.lose()
    assert d.connect().protocol == "3.1.1"  # later reconnects go straight to 3.1.1
    assert [c.protocol for c in d.of(u.Connect)] == ["5", "3.1.1", "3.1.1"]
    assert len([a for a in d.of(u.Log) if "works with" in a.message]) == 1


def test_a_closed_v5_attempt_pins_311_only_if_311_works(ob) -> None:
    """A TLS rejection also closes before CONNACK: a failing 3.1.1 retry goes back to 5."""
    d = Driver(ob)
    attempts(d, 4, lambda: u.Closed("TLS: certificate required"))
    assert [c.protocol for c in d.of(u.Connect)] == ["5", "3.1.1", "5", "3.1.1"]
    assert not [a for a in d.of(u.Log) if "works with" in a.message]


def test_a_refused_version_pins_311_for_good(ob) -> None:
    d = Driver(ob)
    attempts(d, 1, lambda: u.Refused("Unsupported protocol version", True))
    attempts(d, 3, lambda: u.ConnectFailed("refused"))
    assert [c.protocol for c in d.of(u.Connect)] == ["5", "3.1.1", "3.1.1", "3.1.1"]


def test_no_fallback_when_mqtt5_is_required(ob) -> None:
    d = Driver(ob, params(protocol="5"))
    attempts(d, 3, lambda: u.Refused("Unsupported protocol version", True))
    assert {c.protocol for c in d.of(u.Connect)} == {"5"}
    assert "Unsupported protocol version" in d.m.status()["last_error"]
    assert d.m.status()["connects"] == 0


def test_mqtt311_when_configured(ob) -> None:
    d = Driver(ob, params(protocol="3.1.1", max_packet_size=70_000))
    assert d.connect() == u.Connect("3.1.1", None)  # no Maximum Packet Size on 3.1.1
    assert d.m.status()["protocol"] == "3.1.1"


def test_protocol_choice() -> None:
    with pytest.raises(ValueError, match="auto, 5 or 3.1.1"):
        u.ProtocolChoice("4")
    c = u.ProtocolChoice("auto")
    assert c.next() == "5" and c.failed("closed") and c.next() == "3.1.1"
    assert not c.failed("failed") and c.next() == "5"
    assert c.failed("no-connack") and c.connected() and c.next() == "3.1.1"
    assert not c.failed("refused-version") and c.next() == "3.1.1"
    c = u.ProtocolChoice("5")
    assert not c.failed("refused-version") and c.next() == "5"
    assert u.ProtocolChoice("3.1.1").next() == "3.1.1"


def test_connect_announces_maximum_packet_size_on_v5(ob) -> None:
    d = Driver(ob, params(max_packet_size=66_560))
    assert d.until_connect() == u.Connect("5", 66_560)
    assert not d.m.oversized(66_560) and d.m.oversized(66_561)
    assert d.m.status()["oversized_refused"] == 1
    assert not u.UplinkMachine(params()).oversized(10**9)


# ---- connection lifecycle ------------------------------------------------------------------

def test_on_connected_once_per_connect(ob) -> None:
    d = Driver(ob)
    d.connect()
    d.lose()
    d.connect()
    assert len(d.of(u.NotifyConnected)) == 2 == d.m.status()["connects"]
    assert d.m.status()["disconnects"] == 1


def test_subscriptions_on_every_connection_retain_handling_2_on_v5(ob) -> None:
    d = Driver(ob)
    d.feed(u.SubscriptionAdded(COMMANDS))
    d.connect()
    sub = d.of(u.Subscribe)[-1]
    assert sub == u.Subscribe((COMMANDS,), 2)
    assert not d.m.status()["subscribed"]
    d.feed(u.Suback(d._mid, (False,)))
    assert d.m.status()["subscribed"]
    d.feed(u.SubscriptionAdded(f"{PREFIX}/extra/#"))  # while connected
    assert not d.m.status()["subscribed"]
    d.tick()
    assert d.of(u.Subscribe)[-1] == u.Subscribe((f"{PREFIX}/extra/#",), 2)
    d.feed(u.Suback(d._mid, (True,), ("Not authorized",)))
    st = d.m.status()
    assert not st["subscribed"]
    assert st["last_error"] == (f"broker {WHERE} refused the subscription to "
                                f"{PREFIX}/extra/# (Not authorized)")
    d.lose()
    d.connect()
    assert d.of(u.Subscribe)[-1] == u.Subscribe((COMMANDS, f"{PREFIX}/extra/#"), 2)
    d.feed(u.Suback(d._mid, (False, False)))
    assert d.m.status()["subscribed"]


def test_subscriptions_on_311_and_retained_messages_are_not_delivered(ob) -> None:
    d = Driver(ob, params(protocol="3.1.1"))
    d.feed(u.SubscriptionAdded(COMMANDS))
    d.connect()
    assert d.of(u.Subscribe)[-1] == u.Subscribe((COMMANDS,), None)
    assert d.m.deliver(retain=False) and not d.m.deliver(retain=True)
    assert d.m.status()["retained_ignored"] == 1


# ---- stop --------------------------------------------------------------------------------------

def stop(d: Driver, drain_s: float, will: bool = False) -> None:
    d.feed(u.StopRequested(d.now, drain_s, will))


def run_until_stopped(d: Driver, step: float = 0.01, ack: bool = True) -> None:
    for _ in range(100_000):
        d.ack() if ack else d.tick()
        for _ in range(10):  # the adapter ticks again at once when the machine is due now
            if d.m.state == "stopped":
                return
            if d.m.wait(d.now).until > d.now:
                break
            d.tick()
        d.now += step
    raise AssertionError("never stopped")


def test_stop_drains_and_disconnects_cleanly(ob) -> None:
    d = Driver(ob)
    d.connect()
    add(ob, 500)
    ob.append("status", STATUS, b"offline (clean shutdown)", 0)
    stop(d, 3.0)
    t0 = d.now
    run_until_stopped(d, step=0.001)
    assert d.now - t0 < 3.0 and ob.stats()["messages"] == 0
    assert seqs(d.published) == list(range(1, 501))
    assert d.of(u.Close) == [u.Close(False, "5")]
    st = d.m.status()
    assert st["state"] == "stopped" and st["acked"] == 501


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_stop_with_the_offline_record_unacked_leaves_with_the_will(ob, protocol) -> None:
    d = Driver(ob, params(protocol=protocol))
    d.connect()
    add(ob, 300)
    ob.append("status", STATUS, b"offline (clean shutdown)", 0)
    stop(d, 0.3)
    run_until_stopped(d, ack=False)  # no PUBACK comes back
    assert d.of(u.Close) == [u.Close(True, protocol)]
    assert ob.stats()["by_kind"]["status"] == 1


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_stop_with_a_backlog_but_the_offline_record_delivered_sends_no_will(ob,
                                                                         protocol) -> None:
    d = Driver(ob, params(protocol=protocol))
    d.connect(receive_maximum=20)
    add(ob, 600)
    ob.append("status", STATUS, b"offline (clean shutdown)", 0)
    stop(d, 1.0)
    run_until_stopped(d, step=0.1)  # slow acks: the backlog cannot drain in time
    assert d.published[0].payload == b"offline (clean shutdown)"  # urgent: first
    assert ob.stats()["by_kind"]["status"] == 0 and ob.stats()["messages"] > 0
    assert d.of(u.Close) == [u.Close(False, protocol)]


def test_stop_with_will_true_leaves_with_the_will(ob) -> None:
    d = Driver(ob)
    d.connect()
    stop(d, 1.0, will=True)
    run_until_stopped(d)
    assert d.of(u.Close) == [u.Close(True, "5")]


def test_stop_returns_in_time_when_the_broker_is_unreachable(ob) -> None:
    add(ob, 25)
    d = Driver(ob)
    attempts(d, 3, lambda: u.ConnectFailed("ConnectionRefusedError: refused"))
    t0 = d.now
    stop(d, 1.0)
    run_until_stopped(d, step=0.01, ack=False)
    assert d.now - t0 <= 0.75 + 1e-6, "the drain deadline (1.0 s less the 0.25 s reserve)"
    assert d.m.status()["state"] == "stopped" and ob.stats()["messages"] == 25
    assert "refused" in d.m.status()["last_error"]


def test_stop_while_a_connect_hangs(ob) -> None:
    d = Driver(ob)
    d.until_connect()  # no CONNACK ever
    stop(d, 1.0)
    run_until_stopped(d, ack=False)
    assert d.now - 100.0 <= 0.75 + 1e-6 and d.of(u.Close)


def test_stop_without_start(ob) -> None:
    m = u.UplinkMachine(params())
    assert m.send(u.StopRequested(0.0, 0.2)) == [] and m.status()["state"] == "stopped"
