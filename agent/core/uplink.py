"""The uplink's decisions (PROTOCOL.md §1, §5), sans I/O: events in, actions out.

The paho adapter (``agent/adapters/mqtt.py``) feeds :class:`UplinkMachine` what happened
(CONNACK, PUBACK, a lost connection, rows it read from the outbox, the time) and carries out the
actions it returns (connect, publish row N, subscribe, ack rows, close with or without the will,
wait until T). Time is passed in (monotonic seconds); randomness is injected.

Decisions worth knowing:

* Delivery: a fresh client (clean session) per connection; rows go in outbox order -- except
  that command statuses, state and status records go ahead of a telemetry backlog (a response
  must not wait behind an hour of batches after an outage; each kind keeps its own order;
  ``_Cursor`` makes sure no row goes twice on one connection) -- at most ``max_inflight``
  (capped by the broker's Receive Maximum) unacknowledged, and rows are acked in the outbox in
  batches, after the window was filled (the fsync overlaps the broker's work), only on a
  successful PUBACK. After a disconnect it starts again from the oldest row: at-least-once,
  consumers dedupe by seq. paho's own inflight queue and retries are not used.
* Connection: the will is set on every attempt (the offline record is freshly signed). With
  protocol "auto" (:class:`ProtocolChoice`), a CONNACK refusing MQTT 5 switches to 3.1.1 for
  good; a connection closed before any CONNACK (or no CONNACK in time) is retried at once with
  3.1.1, and 3.1.1 is kept only if that works (a TLS rejection looks the same and must not pin
  us to 3.1.1). Failures back off exponentially with jitter between reconnect_min_s and
  reconnect_max_s; the delay resets once a connection has proved healthy (a PUBACK that acked a
  row, or HEALTHY_S connected), not on CONNACK alone: a broker that accepts the CONNECT and then
  refuses or drops every publish (an ACL) must not be hammered at reconnect_min_s forever. MQTT 5 CONNECTs announce a
  Maximum Packet Size when one is given (the agent refuses larger commands anyway).
* Stop: the connection ends cleanly (the broker discards the will) when the offline record the
  caller queued was acknowledged, rows left or not; if a status row is still in the outbox (or
  the caller could not queue one: ``StopRequested(will=True)``), it ends so that the broker
  publishes the will. Publishing goes on until the drain deadline or an empty outbox.
* Errors: each distinct one is logged once (again after a successful connect), counted and
  shown in ``status()``.
* A PUBACK with a failure reason (MQTT 5, e.g. not authorized, quota exceeded) is not an ack: the
  connection is dropped and the row retried after the backoff, so nothing is silently lost.
* Commands are never retained (PROTOCOL.md §1): subscriptions ask for retain handling 2 on
  MQTT 5 (no retained message at subscribe), and a message that still carries the retain flag
  (3.1.1) is dropped and counted (``retained_ignored``).
"""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass, field
from typing import Any

RETAINED_KINDS = frozenset({"state", "status"})  # PROTOCOL.md §1: retained topics
CONNECT_TIMEOUT_S = 10.0  # TCP connect + TLS handshake
CONNACK_TIMEOUT_S = 5.0  # a healthy broker answers a CONNECT in milliseconds
IDLE_WAIT_S = 1.0  # safety net only: every real event wakes the adapter
HEADER_ROOM = 1024  # PUBLISH fixed header, topic and properties around a command's bytes


def works_with_311(where: str) -> str:
    """The one log line for a broker that took 3.1.1 after refusing or dropping MQTT 5."""
    return f"broker {where} works with MQTT 3.1.1; using it from now on"


class ProtocolChoice:
    """Which MQTT version to try next: "5", "3.1.1", or "auto" (5, then 3.1.1 when the broker
    refuses version 5 -- kept for good -- or closes/ignores a version-5 CONNECT -- kept only if
    3.1.1 then works). Shared by the agent and tcu-cloud."""

    def __init__(self, mode: str = "auto") -> None:
        if mode not in ("auto", "5", "3.1.1"):
            raise ValueError(f"MQTT protocol must be auto, 5 or 3.1.1, not {mode!r}")
        self.mode = mode
        self.sticky_311 = mode == "3.1.1"
        self._try_311 = False
        self._announce = False  # 5 failed: say so when 3.1.1 works

    def next(self) -> str:
        return "3.1.1" if (self.sticky_311 or self._try_311) else "5"

    def connected(self) -> bool:
        """The attempt with next() worked; True if the works_with_311 line is due now."""
        if self._try_311:
            self.sticky_311 = True
        announce = self._announce and self.next() == "3.1.1"
        self._try_311 = self._announce = False
        return announce

    def failed(self, outcome: str) -> bool:
        """The attempt with next() ended: "refused-version" (CONNACK), "closed" (before any
        CONNACK), "no-connack" (none in time) or "failed". True: retry at once."""
        if self.mode == "auto" and self.next() == "5" and outcome == "refused-version":
            self.sticky_311 = self._announce = True
            return True
        if self.mode == "auto" and self.next() == "5" and outcome in ("closed", "no-connack"):
            self._try_311 = self._announce = True
            return True
        self._try_311 = False
        return False


# ---- parameters -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class UplinkParams:
    where: str  # "host:port", for messages
    protocol: str = "auto"
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 60.0
    max_inflight: int = 32
    tls: bool = False
    max_packet_size: int | None = None  # announced in MQTT 5 CONNECT; refused on 3.1.1


# ---- events (in) ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Start:
    now: float

@dataclass(frozen=True, slots=True)
class Tick:
    now: float

@dataclass(frozen=True, slots=True)
class SubscriptionAdded:
    topic: str

@dataclass(frozen=True, slots=True)
class StopRequested:
    now: float
    drain_s: float
    will: bool = False  # leave with the will even if no status row is left

@dataclass(frozen=True, slots=True)
class Stopped:  # the adapter gave up waiting for its thread
    pass

@dataclass(frozen=True, slots=True)
class ConnectFailed:  # no connection at all (refused, unreachable, TLS handshake)
    detail: str
    unexpected: bool = False  # a bug rather than a network error

@dataclass(frozen=True, slots=True)
class Connected:  # CONNACK, success
    wall_ms: int
    receive_maximum: int | None = None
    maximum_packet_size: int | None = None

@dataclass(frozen=True, slots=True)
class Refused:  # CONNACK with a failure reason
    reason: str
    unsupported_version: bool = False

@dataclass(frozen=True, slots=True)
class Closed:  # the connection ended (before or after CONNACK)
    detail: str

@dataclass(frozen=True, slots=True)
class Rows:  # the answer to Peek: objects with id, kind, topic, payload
    rows: list

@dataclass(frozen=True, slots=True)
class Sent:  # the result of Publish: mid, or an error (fatal: the connection is unusable)
    row_id: int
    mid: int | None = None
    error: str | None = None
    fatal: bool = False

@dataclass(frozen=True, slots=True)
class Puback:
    mid: int
    ok: bool = True
    reason: str = ""

@dataclass(frozen=True, slots=True)
class Subscribed:  # the result of Subscribe: its mid, or None (the connection is going away)
    mid: int | None
    filters: tuple[str, ...]

@dataclass(frozen=True, slots=True)
class Suback:
    mid: int
    refused: tuple[bool, ...]  # per filter: refused by the broker
    reasons: tuple[str, ...] = ()

@dataclass(frozen=True, slots=True)
class OutboxInfo:  # the answer to Inspect; None fields: the outbox could not say
    empty: bool | None
    status_left: bool | None

@dataclass(frozen=True, slots=True)
class OutboxFailed:  # Peek or Ack raised (e.g. StorageError)
    detail: str


# ---- actions (out) --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Connect:
    protocol: str  # "5" or "3.1.1"
    maximum_packet_size: int | None = None

@dataclass(frozen=True, slots=True)
class Publish:
    row_id: int
    topic: str
    payload: bytes
    retain: bool

@dataclass(frozen=True, slots=True)
class Peek:
    limit: int
    after_id: int
    urgent: bool

@dataclass(frozen=True, slots=True)
class Subscribe:
    filters: tuple[str, ...]
    retain_handling: int | None  # 2 on MQTT 5: never send retained messages

@dataclass(frozen=True, slots=True)
class Ack:
    row_ids: tuple[int, ...]

@dataclass(frozen=True, slots=True)
class Inspect:  # answer with OutboxInfo
    pass

@dataclass(frozen=True, slots=True)
class Close:
    with_will: bool  # MQTT 5: DISCONNECT 0x04; 3.1.1: end the socket without a DISCONNECT
    protocol: str

@dataclass(frozen=True, slots=True)
class NotifyConnected:  # run the owner's on_connected callback
    pass

@dataclass(frozen=True, slots=True)
class Log:
    level: str  # "info" or "warning"
    message: str

@dataclass(frozen=True, slots=True)
class Wait:
    until: float


HEALTHY_S = 10.0  # a connection up this long resets the reconnect backoff


class _Cursor:
    """Where publishing stands on one connection: the last row id in order (`all`), the last
    urgent row id (`urgent`), and the ids (ascending) of urgent rows sent ahead that `all` has
    not reached yet; the in-order pass drops those it passes, so `early` stays small."""

    __slots__ = ("all", "urgent", "early")

    def __init__(self) -> None:
        self.all = 0
        self.urgent = 0
        self.early: collections.deque[int] = collections.deque()


@dataclass
class _Conn:
    """What one connection has done so far."""
    sent: dict[int, int] = field(default_factory=dict)  # mid -> row id, unacknowledged
    pending: int = 0  # Publish actions out, Sent not back yet
    cursor: _Cursor = field(default_factory=_Cursor)
    filters: set[str] = field(default_factory=set)
    subacks: dict[int, tuple[str, ...]] = field(default_factory=dict)
    granted: bool = True
    done: list[int] = field(default_factory=list)
    problem: str | None = None
    connected_at: float = 0.0  # machine time of the CONNACK
    acked: bool = False  # a PUBACK acked a row on this connection
    urgent: bool = True  # the fill's current pass
    filling: bool = False
    room: int = 0  # what the Peek out asked for


class UplinkMachine:
    """The uplink's state: send() an event, carry out the actions returned, in order."""

    def __init__(self, params: UplinkParams, rng: random.Random | None = None) -> None:
        self.p = params
        self.rng = rng or random.Random()
        self.choice = ProtocolChoice(params.protocol)
        self.state = "stopped"  # connecting, connected, disconnected (backing off), stopped
        self.protocol = self.choice.next()
        self.counts = {"connects": 0, "disconnects": 0, "errors": 0, "published": 0,
                       "acked": 0, "retained_ignored": 0, "oversized_refused": 0}
        self.last_error: str | None = None
        self.last_connect_ms: int | None = None
        self.reconnect_delay = 0.0
        self.window = params.max_inflight
        self.subs: list[str] = []
        self.subscribed = False
        self.stopping = False
        self.started = False
        self._leave_with_will = False
        self._deadline = 0.0  # drain deadline (monotonic), set by StopRequested
        self._logged: set[str] = set()
        self._delay = params.reconnect_min_s
        self._retry_now = True  # the first attempt, and a protocol fallback: no waiting
        self._wake_at = 0.0  # backoff end, or the CONNACK deadline while connecting
        self._awaiting: str | None = None  # an Inspect is out: "close" or "loop"
        self._conn: _Conn | None = None
        self._now = 0.0  # the latest time passed in

    # ---- queries ---------------------------------------------------------------------------

    def status(self) -> dict:
        """state ("connecting", "connected", "disconnected" while backing off, "stopped"),
        broker "host:port", tls, protocol (in use or being tried: "5"/"3.1.1"), connects,
        disconnects (of established connections), errors (failed attempts, lost connections,
        refusals), last_error, published (PUBLISH packets sent, re-sends included), acked (rows
        deleted on PUBACK), inflight, last_connect_ms (Unix ms of the last successful connect),
        reconnect_delay_s (the current backoff wait; 0 while connected), subscribed (the broker
        granted every filter on this connection), retained_ignored, oversized_refused."""
        inflight = len(self._conn.sent) if self._conn and self.state == "connected" else 0
        return {"state": self.state, "broker": self.p.where, "tls": self.p.tls,
                "protocol": self.protocol, **self.counts, "last_error": self.last_error,
                "inflight": inflight, "last_connect_ms": self.last_connect_ms,
                "reconnect_delay_s": self.reconnect_delay, "subscribed": self.subscribed}

    def deliver(self, retain: bool) -> bool:
        """A message arrived on a subscription: hand it on? Retained ones are not (§1)."""
        if retain:
            self.counts["retained_ignored"] += 1
        return not retain

    def oversized(self, size: int) -> bool:
        """A packet of ``size`` bytes (remaining length) is announced: refuse it unread?"""
        if self.p.max_packet_size is None or size <= self.p.max_packet_size:
            return False
        self.counts["oversized_refused"] += 1
        return True

    # ---- events ----------------------------------------------------------------------------

    def send(self, ev: Any, now: float | None = None) -> list:
        """Feed one event (``now``: monotonic seconds; Tick, Start and StopRequested carry
        their own); returns the actions to carry out, in order."""
        now = getattr(ev, "now", now)
        if now is not None:
            self._now = now
        out: list = []
        handler = getattr(self, "_on_" + type(ev).__name__)
        handler(ev, out)
        return out

    def _on_Start(self, ev: Start, out: list) -> None:
        self.started = True
        self.state = "connecting"
        self._wake_at = ev.now

    def _on_SubscriptionAdded(self, ev: SubscriptionAdded, out: list) -> None:
        if ev.topic not in self.subs:
            self.subs.append(ev.topic)
        self.subscribed = False

    def _on_StopRequested(self, ev: StopRequested, out: list) -> None:
        reserve = min(0.5, ev.drain_s / 4)  # time for the DISCONNECT and the thread to end
        if self.started and not self.stopping:
            self._deadline = ev.now + max(0.0, ev.drain_s - reserve)
        self.stopping = True
        self._leave_with_will = self._leave_with_will or ev.will
        if self.state == "disconnected":
            self._wake_at = ev.now  # backing off: look again now

    def _on_Stopped(self, ev: Stopped, out: list) -> None:
        self.state = "stopped"
        self._conn = None

    def _on_Tick(self, ev: Tick, out: list) -> None:
        now = ev.now
        if self._awaiting or self.state == "stopped":
            pass
        elif self.state in ("connecting", "disconnected") and self._conn is None:
            if now >= self._wake_at:  # an attempt is due
                self._before_attempt(out)
        elif self.state == "connecting" and self._conn is not None:
            if self.stopping and self._deadline - now <= 0:
                self._outcome("failed", now, out)  # stop() gave up on us
            elif now >= self._wake_at:
                self._error(f"no CONNACK from {self.p.where} within {CONNACK_TIMEOUT_S:.0f} s "
                            f"(MQTT {self.protocol})", out)
                self._outcome("no-connack", now, out)
        elif self.state == "connected":
            self._pass(now, out)

    def wait(self, now: float) -> Wait:
        """When to send the next Tick at the latest (every event also deserves one)."""
        if self._conn is None:
            return Wait(self._wake_at)  # the next attempt
        until = now + IDLE_WAIT_S
        if self.state == "connecting":
            until = min(until, self._wake_at)
        if self.stopping:
            until = min(until, self._deadline)
        return Wait(until)

    # ---- connecting ------------------------------------------------------------------------

    def _before_attempt(self, out: list) -> None:
        if self.stopping:  # the top of the loop: finished (deadline, or nothing left)?
            self._awaiting = "loop"
            out.append(Inspect())
        else:
            self._attempt(out)

    def _attempt(self, out: list) -> None:
        self._retry_now = False
        self.protocol = self.choice.next()
        self.state = "connecting"
        self._conn = _Conn()
        self._wake_at = self._now + CONNECT_TIMEOUT_S + CONNACK_TIMEOUT_S
        size = self.p.max_packet_size if self.protocol == "5" else None
        out.append(Connect(self.protocol, size))

    def _on_ConnectFailed(self, ev: ConnectFailed, out: list) -> None:
        if ev.unexpected:
            self._error(f"connection attempt failed: {ev.detail}", out)
        else:
            self._error(f"cannot connect to {self.p.where}: {ev.detail}", out)
        self._conn = None  # nothing to close
        self._outcome("failed", self._now, out, close=False)

    def _on_Refused(self, ev: Refused, out: list) -> None:
        if self.state != "connecting":
            return
        self._error(f"{self.p.where} refused the connection (MQTT {self.protocol}): "
                    f"{ev.reason}", out)
        self._outcome("refused-version" if ev.unsupported_version else "failed", self._now, out)

    def _on_Connected(self, ev: Connected, out: list) -> None:
        if self.state != "connecting" or self._conn is None:
            return
        if self.choice.connected():
            out.append(Log("info", works_with_311(self.p.where)))
        self._conn.connected_at = self._now
        # The broker's Receive Maximum (MQTT 5) caps our window: exceeding it is a protocol error.
        self.window = min(self.p.max_inflight, ev.receive_maximum or 65535)
        self.state, self.reconnect_delay = "connected", 0.0
        self.counts["connects"] += 1
        self.subscribed = False
        self.last_connect_ms = ev.wall_ms
        self._logged.clear()  # a new outage is worth logging again
        out.append(Log("info", f"MQTT connected to {self.p.where} (MQTT {self.protocol}"
                               f"{', TLS' if self.p.tls else ''}, window {self.window})"))
        out.append(NotifyConnected())

    def _on_Closed(self, ev: Closed, out: list) -> None:
        if self.state == "connecting" and self._conn is not None:
            self._error(f"{self.p.where} closed the connection before CONNACK "
                        f"(MQTT {self.protocol}): {ev.detail}", out)
            self._outcome("closed", self._now, out)
        elif self.state == "connected" and self._conn is not None:
            self._conn.problem = self._conn.problem or \
                f"connection to {self.p.where} lost: {ev.detail}"

    def _outcome(self, outcome: str, now: float, out: list, close: bool = True) -> None:
        """An attempt ended without a connection."""
        if close:
            out.append(Close(False, self.protocol))
        self._conn = None
        self._retry_now = self.choice.failed(outcome)
        self._schedule(now, out)

    def _schedule(self, now: float, out: list) -> None:
        """The next attempt: at once (fallback), or after a jittered backoff."""
        if self._retry_now:
            self.state, self._wake_at = "connecting", now
            return
        wait = self.rng.uniform(max(self.p.reconnect_min_s, self._delay / 2), self._delay)
        self._delay = min(self._delay * 2, self.p.reconnect_max_s)
        self.state, self.reconnect_delay = "disconnected", round(wait, 3)
        if self.stopping:  # draining: retry soon, within the deadline
            wait = max(0.0, min(self.p.reconnect_min_s, self._deadline - now))
        self._wake_at = now + wait

    # ---- connected: publishing -------------------------------------------------------------

    def _pass(self, now: float, out: list) -> None:
        c = self._conn
        if c is None or c.filling:
            return
        if c.problem is None:
            new = tuple(t for t in self.subs if t not in c.filters)
            if new:
                out.append(Subscribe(new, 2 if self.protocol == "5" else None))
        if c.problem is None and (not self.stopping or self._deadline - now > 0):
            c.filling, c.urgent = True, True
            self._peek(out)
        else:
            self._end_pass(now, out)

    def _peek(self, out: list) -> None:
        c = self._conn
        room = self.window - len(c.sent) - c.pending
        if c.problem is not None or room <= 0:
            self._end_pass(self._now, out)
            return
        # Urgent rows up to `all` went out in order (or early): never send them again, even
        # one appended between the urgent and the in-order peek.
        start = max(c.cursor.urgent, c.cursor.all) if c.urgent else c.cursor.all
        out.append(Peek(room, start, c.urgent))
        c.room = room

    def _on_Rows(self, ev: Rows, out: list) -> None:
        c = self._conn
        if c is None or not c.filling:
            return
        after, early = c.cursor, c.cursor.early
        for row in ev.rows:
            if c.urgent:
                after.urgent = row.id
                early.append(row.id)  # ids ascending
            else:
                after.all = row.id
                while early and early[0] < row.id:  # acked/replaced before we got here
                    early.popleft()
                if early and early[0] == row.id:  # already sent ahead of the backlog
                    early.popleft()
                    continue
            c.pending += 1
            out.append(Publish(row.id, row.topic, row.payload, row.kind in RETAINED_KINDS))
        if len(ev.rows) < c.room:
            if not c.urgent:  # saw every row above `all`: the early ones left are gone
                early.clear()
                self._end_pass(self._now, out)
                return
            c.urgent = False  # nothing more urgent for now: the rows in order
        self._peek(out)

    def _on_Sent(self, ev: Sent, out: list) -> None:
        c = self._conn
        if c is None:
            return
        c.pending -= 1
        if ev.mid is not None:
            c.sent[ev.mid] = ev.row_id
            self.counts["published"] += 1
        elif ev.fatal:
            c.problem = c.problem or f"publish failed: {ev.error}"
        else:  # can never be sent (bad topic, absurd size)
            out.append(Log("error", f"dropping outbox row {ev.row_id}: {ev.error}"))
            c.done.append(ev.row_id)

    def _end_pass(self, now: float, out: list) -> None:
        c = self._conn
        c.filling = False
        if c.done:
            out.append(Ack(tuple(c.done)))
            self.counts["acked"] += len(c.done)
            c.done = []
        if c.problem is not None:
            self._error(c.problem, out)
            self._end_connection(out)
        elif self.stopping and (self._deadline - now <= 0 or not (c.sent or c.pending)):
            self._end_connection(out)  # out of time, or drained

    def _on_Puback(self, ev: Puback, out: list) -> None:
        c = self._conn
        if c is None or self.state != "connected" or ev.mid not in c.sent:
            return
        if not ev.ok:  # not acked: retried from the oldest after the backoff
            c.problem = c.problem or f"broker {self.p.where} refused a message: {ev.reason}"
        else:
            c.done.append(c.sent.pop(ev.mid))
            c.acked = True

    def _on_Subscribed(self, ev: Subscribed, out: list) -> None:
        c = self._conn
        if c is None or ev.mid is None:
            return  # the connection is going away; the next one subscribes again
        c.filters.update(ev.filters)
        c.subacks[ev.mid] = ev.filters

    def _on_Suback(self, ev: Suback, out: list) -> None:
        c = self._conn
        if c is None or ev.mid not in c.subacks:
            return
        topics = c.subacks.pop(ev.mid)
        reasons = ev.reasons or ("refused",) * len(topics)
        refused = [f"{t} ({r})" for t, bad, r in zip(topics, ev.refused, reasons) if bad]
        if refused:
            self._error(f"broker {self.p.where} refused the subscription to "
                        f"{', '.join(refused)}", out)
        c.granted = c.granted and not refused
        self.subscribed = c.granted and not c.subacks and c.filters.issuperset(self.subs)

    def _on_OutboxFailed(self, ev: OutboxFailed, out: list) -> None:
        c = self._conn
        if c is not None and self.state == "connected":
            c.problem = c.problem or f"uplink failed while publishing: {ev.detail}"
            if c.filling:
                self._end_pass(self._now, out)

    def _end_connection(self, out: list) -> None:
        self.counts["disconnects"] += 1
        self.state = "disconnected"
        if self.stopping:
            self._awaiting = "close"
            out.append(Inspect())
            return
        out.append(Close(False, self.protocol))
        c, self._conn = self._conn, None
        if c is not None and (c.acked or self._now - c.connected_at >= HEALTHY_S):
            self._delay = self.p.reconnect_min_s  # it worked: the next outage starts afresh
        self._schedule(self._now, out)

    def _on_OutboxInfo(self, ev: OutboxInfo, out: list) -> None:
        awaiting, self._awaiting = self._awaiting, None
        if awaiting == "close":
            with_will = self._leave_with_will or ev.status_left is not False
            out.append(Close(with_will, self.protocol))
            self._conn = None
        finished = self._deadline - self._now <= 0 or ev.empty is not False
        if finished:
            self.state = "stopped"
        elif awaiting == "close":
            self._retry_now = False
            self._schedule(self._now, out)
        elif awaiting == "loop":
            self._attempt(out)

    # ---- helpers ---------------------------------------------------------------------------

    def _error(self, message: str, out: list) -> None:
        """Record an error: counted, shown in status(), logged once per distinct message."""
        self.last_error = message
        self.counts["errors"] += 1
        if message not in self._logged:
            if len(self._logged) >= 100:  # bounded, in case messages carry changing details
                self._logged.clear()
            self._logged.add(message)
            out.append(Log("warning", message))
