"""The uplink: drains the outbox to the MQTT broker (PROTOCOL.md §1, §5). The only paho user.

Decisions worth knowing:

* Threads: one worker thread (``tcu-uplink``) owns the connection loop, every outbox call and
  every ``publish``; paho's network thread (``loop_start``, one per connection) only reads and
  writes the socket. Paho callbacks do nothing but append an event to a deque and set an Event,
  so they can never block or deadlock against the worker (paho calls ``on_publish`` while
  holding its own message lock, which ``publish`` also takes).
* Wake-up: ``wake()``, PUBACKs, CONNACK, disconnects and ``stop()`` all set one Event the worker
  waits on; it clears the Event *before* looking for work, so no wake-up is lost and none is
  delayed by polling.
* Delivery: a fresh paho client (clean session) per connection; the worker publishes rows in
  outbox order -- except that command statuses, state and status records go ahead of a
  telemetry backlog (a response must not wait behind an hour of batches after an outage;
  each kind keeps its own order; ``_Cursor`` makes sure no row goes twice on one connection) --
  at most ``max_inflight`` (capped by the broker's Receive Maximum) unacknowledged,
  and acks rows in the outbox in batches, only on a successful PUBACK. After a disconnect it
  starts again from the oldest row: at-least-once, consumers dedupe by seq. paho's own inflight
  queue and retries are not used (paho would resend its own copies on reconnect, out of order
  with ours).
* Connection: ``will()`` is called before every attempt (the offline record is freshly signed).
  With protocol "auto", a CONNACK refusing MQTT 5 switches to 3.1.1 for good; a connection closed
  before any CONNACK is retried at once with 3.1.1, and 3.1.1 is kept only if that works (a TLS
  rejection looks the same and must not pin us to 3.1.1). Failures back off exponentially with
  jitter between reconnect_min_s and reconnect_max_s; the delay resets after a successful connect.
* Stop: the connection ends cleanly (the broker discards the will) when the offline record the
  caller queued was acknowledged, rows left or not; if a status row is still in the outbox (or
  the caller could not queue one: ``stop(will=True)``), it ends so that the broker publishes
  the will.
* Errors never leave the worker: each distinct one is logged once (again after a successful
  connect), counted and shown in ``status()``.
* A PUBACK with a failure reason (MQTT 5, e.g. not authorized, quota exceeded) is not an ack: the
  connection is dropped and the row retried after the backoff, so nothing is silently lost.
"""

from __future__ import annotations

import collections
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import MqttConfig
from agent.errors import UplinkError

from .outbox import Outbox

log = logging.getLogger("agent.mqtt")

RETAINED_KINDS = frozenset({"state", "status"})  # PROTOCOL.md §1: retained topics
CONNECT_TIMEOUT_S = 10.0  # TCP connect + TLS handshake
CONNACK_TIMEOUT_S = 5.0  # a healthy broker answers a CONNECT in milliseconds
_UNSUPPORTED_VERSION = 0x84  # CONNACK reason (paho maps the 3.1.1 return code 1 to it too)
_IDLE_WAIT_S = 1.0  # safety net only: every real event sets the wake-up Event


class Uplink:
    """Publishes the outbox to the broker in order, QoS 1, acking rows on PUBACK."""

    def __init__(self, cfg: MqttConfig, outbox: Outbox, client_id: str,
                 will: Callable[[], tuple[str, bytes]],
                 on_connected: Callable[[], None] | None = None):
        """Check the settings (TLS files, password file); raise UplinkError if unusable.

        Nothing connects before :meth:`start`.
        """
        self._cfg = cfg
        self._outbox = outbox
        self._client_id = client_id
        self._will = will
        self._on_connected = on_connected
        self._tls_context()  # fail early on unreadable certificates or keys
        self._password()
        self._lock = threading.Lock()  # guards the fields below; never held while calling out
        self._kick = threading.Event()  # "something happened": wake(), paho events, stop()
        self._events: collections.deque = collections.deque()  # (client, kind, a, b) from paho
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._leave_with_will = False  # stop(will=True): no offline record could be queued
        self._publish_deadline = 0.0  # monotonic; set by stop()
        self._state = "stopped"
        self._protocol = "3.1.1" if cfg.protocol == "3.1.1" else "5"
        self._sticky_311 = cfg.protocol == "3.1.1"  # auto: the broker refused 5 once
        self._counts = {"connects": 0, "disconnects": 0, "errors": 0, "published": 0, "acked": 0}
        self._inflight = 0
        self._last_error: str | None = None
        self._last_connect_ms: int | None = None
        self._reconnect_delay = 0.0
        self._logged: set[str] = set()
        self._paho_error: str | None = None  # last error paho logged (socket/TLS details)
        self._window = cfg.max_inflight  # per connection: capped by the broker's Receive Maximum
        self._rng = random.Random()
        self._subs: dict[str, Callable[[str, bytes], None]] = {}  # topic filter -> callback
        self._subscribed = False  # SUBACK for every filter on the current connection

    # ---- public API ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread; it connects, reconnects and publishes until stop()."""
        with self._lock:
            if self._thread is not None:
                if self._stopping:
                    raise UplinkError("the uplink was stopped; create a new one")
                return
            self._state = "connecting"
            self._thread = threading.Thread(target=self._run, name="tcu-uplink", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Tell the uplink the outbox has new rows (cheap; call after every append)."""
        self._kick.set()

    def subscribe(self, topic: str, on_message: Callable[[str, bytes], None]) -> None:
        """Receive messages on ``topic`` (a filter; QoS 1) on this and every later connection.

        ``on_message(topic, payload)`` runs on paho's network thread: it must be quick and must
        not block (hand the message to another thread). Its exceptions are logged, not raised.
        """
        with self._lock:
            self._subs[topic] = on_message
            self._subscribed = False
        self._kick.set()

    def stop(self, drain_timeout_s: float = 3.0, *, will: bool = False) -> int:
        """Publish what can be acknowledged within the timeout, disconnect, stop the thread.

        ``will``: leave with the will even if no status row is left (the caller could not
        queue its offline record). Returns the number of rows left in the outbox. Never blocks
        much longer than the timeout, even when the broker is unreachable or a connect attempt
        hangs.
        """
        start = time.monotonic()
        # Leave time for the DISCONNECT and thread exit inside the caller's budget.
        reserve = min(0.5, drain_timeout_s / 4)
        with self._lock:
            thread = self._thread
            if thread is not None and not self._stopping:
                self._publish_deadline = start + max(0.0, drain_timeout_s - reserve)
            self._stopping = True
            self._leave_with_will = self._leave_with_will or will
        self._kick.set()
        if thread is not None:
            thread.join(max(0.0, start + drain_timeout_s - time.monotonic()))
            if thread.is_alive():
                log.warning("MQTT uplink did not stop within %.1f s (a connect attempt is still "
                            "pending); leaving it behind", drain_timeout_s)
        with self._lock:
            self._state = "stopped"
            self._inflight = 0
        try:
            return self._outbox.stats()["messages"]
        except Exception as e:  # noqa: BLE001 - a closed/broken outbox must not crash shutdown
            log.warning("outbox unavailable after stopping the uplink: %s", e)
            return -1

    def status(self) -> dict:
        """A snapshot for status displays.

        state ("connecting", "connected", "disconnected" while backing off, "stopped"), broker
        "host:port", tls, protocol (in use or being tried: "5"/"3.1.1"), connects, disconnects
        (of established connections), errors (failed attempts, lost connections, refusals),
        last_error, published (PUBLISH packets sent, re-sends included), acked (rows deleted on
        PUBACK), inflight, last_connect_ms (Unix ms of the last successful connect, or None),
        reconnect_delay_s (the current backoff wait; 0 while connected), subscribed (the broker
        granted every subscribe() filter on the current connection).
        """
        cfg = self._cfg
        with self._lock:
            return {"state": self._state, "broker": f"{cfg.host}:{cfg.port}",
                    "tls": cfg.tls.ca is not None, "protocol": self._protocol,
                    **self._counts, "last_error": self._last_error, "inflight": self._inflight,
                    "last_connect_ms": self._last_connect_ms,
                    "reconnect_delay_s": self._reconnect_delay,
                    "subscribed": self._subscribed}

    # ---- worker: connection loop ----------------------------------------------------------

    def _run(self) -> None:
        delay = self._cfg.reconnect_min_s
        retry_now = True  # the first attempt, and a protocol fallback: no waiting
        try_311 = False  # auto: the last v5 attempt was closed before any CONNACK
        while not self._finished():
            if not retry_now:
                self._backoff(delay)
                delay = min(delay * 2, self._cfg.reconnect_max_s)
                if self._finished():
                    break
            retry_now = False
            proto = "3.1.1" if (self._sticky_311 or try_311) else "5"
            try:
                client, outcome = self._connect(proto)
            except Exception as e:  # noqa: BLE001 - the uplink thread must never die
                client, outcome = None, self._error(f"connection attempt failed: {e!r}")
            if outcome == "connected":
                if try_311 and not self._sticky_311:
                    self._sticky_311 = True
                    log.info("MQTT broker %s:%d works with MQTT 3.1.1; using it from now on",
                             self._cfg.host, self._cfg.port)
                try_311 = False
                delay = self._cfg.reconnect_min_s
                self._serve_safely(client)
            elif self._cfg.protocol == "auto" and proto == "5" and outcome == "refused-version":
                self._sticky_311 = retry_now = True
                log.info("MQTT broker %s:%d refused MQTT 5; using 3.1.1 from now on",
                         self._cfg.host, self._cfg.port)
            elif self._cfg.protocol == "auto" and proto == "5" and outcome in ("closed",
                                                                               "no-connack"):
                # Maybe a 3.1.1-only broker that closes, or (amqtt) never answers, on a v5
                # CONNECT: try 3.1.1 at once, and keep it only if it works.
                try_311 = retry_now = True
            else:
                try_311 = False
            if client is not None:
                self._close(client)
        with self._lock:
            self._state = "stopped"
            self._inflight = 0

    def _drain_left(self) -> float | None:
        """While stopping: seconds left to publish (<= 0: time is up). Otherwise None."""
        with self._lock:
            return self._publish_deadline - time.monotonic() if self._stopping else None

    def _nap(self, seconds: float) -> None:
        """Wait for the next event, at most ``seconds`` and never past the drain deadline."""
        left = self._drain_left()
        self._kick.wait(max(0.0, seconds if left is None else min(seconds, left)))

    def _finished(self) -> bool:
        """Stopping and (past the deadline or nothing left to publish)."""
        left = self._drain_left()
        if left is None:
            return False
        if left <= 0:
            return True
        try:
            return not self._outbox.peek(1)
        except Exception:  # noqa: BLE001 - outbox closed under us: nothing more to do
            return True

    def _backoff(self, delay: float) -> None:
        """Wait about ``delay`` seconds (jittered); while stopping, only until the deadline."""
        cfg = self._cfg
        wait = self._rng.uniform(max(cfg.reconnect_min_s, delay / 2), delay)
        with self._lock:
            self._state, self._reconnect_delay = "disconnected", round(wait, 3)
        if (left := self._drain_left()) is not None:  # draining: retry soon, within the deadline
            time.sleep(max(0.0, min(cfg.reconnect_min_s, left)))
            return
        end = time.monotonic() + wait
        while (left := end - time.monotonic()) > 0:
            self._kick.wait(left)  # woken early only to notice stop(); wake() just loops
            self._kick.clear()
            with self._lock:
                if self._stopping:
                    return

    def _connect(self, proto: str) -> tuple[mqtt.Client | None, str]:
        """One attempt. Outcome: connected, refused-version, closed, or failed."""
        cfg = self._cfg
        with self._lock:
            self._state, self._protocol = "connecting", proto
            self._paho_error = None
        topic, payload = self._will()
        v5 = proto == "5"
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self._client_id,
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                             clean_session=None if v5 else True, reconnect_on_failure=False)
        client.suppress_exceptions = True  # a bug in a callback must not kill paho's thread
        client.connect_timeout = CONNECT_TIMEOUT_S
        client.max_inflight_messages_set(0)  # unlimited: we enforce the window ourselves
        client.will_set(topic, payload, qos=1, retain=True)
        if cfg.tls.ca is not None:
            client.tls_set_context(self._tls_context())
        password = self._password()
        if cfg.username or password is not None:
            client.username_pw_set(cfg.username, password)
        client.on_connect = lambda c, u, f, rc, p: self._event(c, "connack", rc, p)
        client.on_disconnect = lambda c, u, f, rc, p: self._event(c, "closed", rc, None)
        client.on_publish = lambda c, u, mid, rc, p: self._event(c, "puback", mid, rc)
        client.on_subscribe = lambda c, u, mid, rcs, p: self._event(c, "suback", mid, rcs)
        client.on_message = self._on_message
        client.on_log = self._on_paho_log
        client.on_socket_open = _no_delay
        self._events.clear()
        self._kick.clear()
        started = time.monotonic()
        try:
            client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive,
                           clean_start=True if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY)
        except (OSError, ValueError) as e:  # refused, unreachable, TLS handshake (ssl.SSLError)
            return None, self._error(f"cannot connect to {cfg.host}:{cfg.port}: {_describe(e)}")
        client.loop_start()
        while (left := started + CONNECT_TIMEOUT_S + CONNACK_TIMEOUT_S - time.monotonic()) > 0:
            if (drain := self._drain_left()) is not None and drain <= 0:
                return client, "failed"  # stop() gave up on us (maybe connect() was slow)
            self._nap(min(left, _IDLE_WAIT_S))
            self._kick.clear()
            for c, kind, rc, props in self._take_events():
                if c is not client:
                    continue
                if kind == "closed":
                    why = self._paho_detail() or str(rc)
                    return client, self._error(f"{cfg.host}:{cfg.port} closed the connection "
                                               f"before CONNACK (MQTT {proto}): {why}", "closed")
                if kind == "connack" and rc.is_failure:
                    outcome = ("refused-version" if rc.value == _UNSUPPORTED_VERSION else "failed")
                    return client, self._error(f"{cfg.host}:{cfg.port} refused the connection "
                                               f"(MQTT {proto}): {rc}", outcome)
                if kind == "connack":
                    self._connected(client, props)
                    return client, "connected"
        return client, self._error(f"no CONNACK from {cfg.host}:{cfg.port} within "
                                   f"{CONNACK_TIMEOUT_S:.0f} s (MQTT {proto})", "no-connack")

    def _connected(self, client: mqtt.Client, props: Any) -> None:
        receive_max = getattr(props, "ReceiveMaximum", None) if props is not None else None
        # The broker's Receive Maximum (MQTT 5) caps our window: exceeding it is a protocol error.
        self._window = min(self._cfg.max_inflight, receive_max or 65535)
        with self._lock:
            self._state, self._reconnect_delay = "connected", 0.0
            self._counts["connects"] += 1
            self._subscribed = False
            self._last_connect_ms = time.time_ns() // 1_000_000
            self._logged.clear()  # a new outage is worth logging again
        log.info("MQTT connected to %s:%d (MQTT %s%s, window %d)", self._cfg.host,
                 self._cfg.port, self._protocol, ", TLS" if self._cfg.tls.ca else "",
                 self._window)
        if self._on_connected is not None:
            try:
                self._on_connected()  # on this thread, not paho's: it may append and wake()
            except Exception:
                log.exception("on_connected callback failed")

    def _close(self, client: mqtt.Client) -> None:
        """Disconnect if still connected; join paho's thread.

        A clean DISCONNECT discards the will. When stopping and the offline record did not get
        through (a status row is left) or was never queued, let the broker publish the will
        instead (MQTT 5 reason 0x04; on 3.1.1, end the connection without a DISCONNECT), or
        the retained status would say "online" until the next start. When it did get through,
        the will (older, signed at connect) must not replace it."""
        try:
            if self._stopping and (self._leave_with_will or self._status_left()):
                if self._protocol == "5":
                    client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT,
                                                            "Disconnect with will message"))
                else:
                    sock = client.socket()
                    if sock is not None:
                        sock.shutdown(socket.SHUT_RDWR)
            else:
                client.disconnect()  # a no-op if the connection is already gone
            client.loop_stop()  # its thread ends once the socket is closed
        except Exception as e:  # noqa: BLE001 - best effort: the connection is over anyway
            log.debug("closing the MQTT client: %r", e)

    def _status_left(self) -> bool:
        try:
            return self._outbox.stats()["by_kind"]["status"] > 0
        except Exception:  # noqa: BLE001 - a broken outbox: assume the offline record is stuck
            return True

    # ---- worker: publishing ---------------------------------------------------------------

    def _serve_safely(self, client: mqtt.Client) -> None:
        try:
            self._serve(client)
        except Exception as e:  # e.g. StorageError: reconnect and retry later
            self._error(f"uplink failed while publishing: {_describe(e)}")
            log.debug("uplink failure", exc_info=True)
        with self._lock:
            self._counts["disconnects"] += 1
            self._inflight = 0

    def _serve(self, client: mqtt.Client) -> None:
        """Publish and ack until the connection is lost or the drain is over."""
        sent: dict[int, int] = {}  # mid -> row id, unacknowledged, in publish order
        after = _Cursor()  # what was published on this connection
        filters: set[str] = set()  # subscribed (requested) on this connection
        subacks: dict[int, list[str]] = {}  # SUBSCRIBE mid -> its filters, until the SUBACK
        granted = True  # no SUBACK refused a filter on this connection
        where = f"{self._cfg.host}:{self._cfg.port}"
        while True:
            self._kick.clear()  # before looking for work: a wake() from now on is kept
            done, problem = [], None  # row ids to delete; why this connection must end
            for c, kind, a, b in self._take_events():
                if c is not client:
                    continue  # a late event of an earlier connection
                if kind == "closed":
                    problem = f"connection to {where} lost: {self._paho_detail() or a}"
                elif kind == "suback" and a in subacks:
                    granted = self._suback(subacks.pop(a), b) and granted
                    with self._lock:
                        self._subscribed = granted and not subacks
                elif kind == "puback" and a in sent:
                    if b.is_failure:  # not acked: retried from the oldest after the backoff
                        problem = problem or f"broker {where} refused a message: {b}"
                    else:
                        done.append(sent.pop(a))
            if problem is None and (new := self._subscribe_new(client, filters)) is not None:
                subacks[new[0]] = new[1]
            drain = self._drain_left()  # None unless stopping
            if problem is None and (drain is None or drain > 0):
                after, problem = self._fill_window(client, sent, after, done)
            # Ack after publishing: the fsync overlaps the broker's work on the new window.
            if done:
                self._outbox.ack_many(done)
            with self._lock:
                self._counts["acked"] += len(done)
                self._inflight = len(sent)
            if problem is not None:
                self._error(problem)
                return
            if drain is not None and (drain <= 0 or not sent):
                return  # out of time, or drained (nothing in flight after filling the window)
            self._nap(_IDLE_WAIT_S)

    def _fill_window(self, client: mqtt.Client, sent: dict[int, int], after: _Cursor,
                     done: list[int]) -> tuple[_Cursor, str | None]:
        """Publish urgent rows first, then the next rows in order, until the window is full or
        the outbox empty. Returns the cursor and an error that ends the connection, if any."""
        published, problem = 0, None
        for urgent in (True, False):
            while problem is None and (room := self._window - len(sent)) > 0:
                # Urgent rows up to `all` went out in order (or early): never send them again,
                # even one appended between the urgent and the in-order peek.
                start = max(after.urgent, after.all) if urgent else after.all
                rows = self._outbox.peek(room, start, urgent)
                early = after.early
                for row in rows:
                    if urgent:
                        after.urgent = row.id
                        early.append(row.id)  # ids ascending
                    else:
                        after.all = row.id
                        while early and early[0] < row.id:  # acked/replaced before we got here
                            early.popleft()
                        if early and early[0] == row.id:  # already sent ahead of the backlog
                            early.popleft()
                            continue
                    try:
                        info = client.publish(row.topic, row.payload, qos=1,
                                              retain=row.kind in RETAINED_KINDS)
                    except ValueError as e:  # can never be sent (bad topic, absurd size)
                        log.error("dropping outbox row %d (%s): %s", row.id, row.topic, e)
                        done.append(row.id)
                        continue
                    if info.rc != mqtt.MQTT_ERR_SUCCESS:
                        problem = f"publish failed: {mqtt.error_string(info.rc)}"
                        break
                    sent[info.mid] = row.id
                    published += 1
                if len(rows) < room:
                    if not urgent:  # saw every row above `all`: the early ones left are gone
                        early.clear()
                    break  # nothing more of this kind for now
        with self._lock:
            self._counts["published"] += published
        return after, problem

    def _subscribe_new(self, client: mqtt.Client,
                       filters: set[str]) -> tuple[int, list[str]] | None:
        """SUBSCRIBE to filters not yet requested on this connection: (mid, filters) or None."""
        with self._lock:
            new = [t for t in self._subs if t not in filters]
        if not new:
            return None
        rc, mid = client.subscribe([(t, 1) for t in new])
        if rc != mqtt.MQTT_ERR_SUCCESS:
            return None  # the connection is going away; the next one subscribes again
        filters.update(new)
        return mid, new

    def _suback(self, topics: list[str], reason_codes: list) -> bool:
        """Record refused filters as an error; True if all were granted."""
        refused = [f"{t} ({rc})" for t, rc in zip(topics, reason_codes) if rc.is_failure]
        if refused:
            self._error(f"broker {self._cfg.host}:{self._cfg.port} refused the subscription to "
                        f"{', '.join(refused)}")
        return not refused

    def _on_message(self, client, userdata, msg) -> None:
        """paho callback (its network thread): hand the message to its subscriber."""
        with self._lock:
            targets = [cb for t, cb in self._subs.items() if mqtt.topic_matches_sub(t, msg.topic)]
        for callback in targets:
            try:
                callback(msg.topic, bytes(msg.payload))
            except Exception:
                log.exception("message handler for %s failed", msg.topic)

    # ---- helpers ----------------------------------------------------------------------------

    def _event(self, client: mqtt.Client, kind: str, a: Any, b: Any) -> None:
        """paho callback (its network thread): queue and wake; never blocks."""
        self._events.append((client, kind, a, b))
        self._kick.set()

    def _take_events(self) -> list[tuple]:
        events = []
        while True:
            try:
                events.append(self._events.popleft())
            except IndexError:
                return events

    def _on_paho_log(self, client, userdata, level, buf) -> None:
        # Keeps the socket/TLS detail behind "connection lost" for last_error: the first error of
        # a connection is the cause; paho's "Client is not connected" that follows is not.
        if level == mqtt.MQTT_LOG_ERR and not buf.startswith("Client is not connected"):
            with self._lock:
                self._paho_error = self._paho_error or buf

    def _paho_detail(self) -> str | None:
        with self._lock:
            return self._paho_error

    def _error(self, message: str, outcome: str = "failed") -> str:
        """Record an error: counted, shown in status(), logged once per distinct message."""
        with self._lock:
            self._last_error = message
            self._counts["errors"] += 1
            first = message not in self._logged
            if len(self._logged) >= 100:  # bounded, in case messages carry changing details
                self._logged.clear()
            self._logged.add(message)
        if first:
            log.warning("%s", message)
        return outcome

    def _tls_context(self) -> ssl.SSLContext | None:
        tls = self._cfg.tls
        if tls.ca is None:
            return None
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if tls.cert is not None:
                ctx.load_cert_chain(str(tls.cert), str(tls.key) if tls.key else None)
        except (OSError, ssl.SSLError, ValueError) as e:
            raise UplinkError(f"mqtt.tls: cannot load the CA/certificate/key: {_describe(e)}") \
                from None
        return ctx

    def _password(self) -> str | None:
        path = self._cfg.password_file
        if path is None:
            return None
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UplinkError(f"mqtt.password_file: cannot read {path}: {e}") from None
        return lines[0] if lines else ""


class _Cursor:
    """Where publishing stands on one connection: the last row id in order (`all`), the last
    urgent row id (`urgent`), and the ids (ascending) of urgent rows sent ahead that `all` has
    not reached yet; the in-order pass drops those it passes, so `early` stays small."""

    __slots__ = ("all", "urgent", "early")

    def __init__(self) -> None:
        self.all = 0
        self.urgent = 0
        self.early: collections.deque[int] = collections.deque()


def _no_delay(client, userdata, sock) -> None:
    """Disable Nagle: paho writes each packet separately, and a PUBLISH held back until the
    previous one is ACKed at TCP level (delayed ACK: up to 40 ms) would ruin command latency."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # not a TCP socket (e.g. a proxy or unix socket): nothing to tune


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
