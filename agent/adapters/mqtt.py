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
  outbox order, at most ``max_inflight`` (capped by the broker's Receive Maximum) unacknowledged,
  and acks rows in the outbox in batches, only on a successful PUBACK. After a disconnect it
  starts again from the oldest row: at-least-once, consumers dedupe by seq. paho's own inflight
  queue and retries are not used (paho would resend its own copies on reconnect, out of order
  with ours).
* Connection: ``will()`` is called before every attempt (the offline record is freshly signed).
  With protocol "auto", a CONNACK refusing MQTT 5 switches to 3.1.1 for good; a connection closed
  before any CONNACK is retried at once with 3.1.1, and 3.1.1 is kept only if that works (a TLS
  rejection looks the same and must not pin us to 3.1.1). Failures back off exponentially with
  jitter between reconnect_min_s and reconnect_max_s; the delay resets after a successful connect.
* Errors never leave the worker: each distinct one is logged once (again after a successful
  connect), counted and shown in ``status()``.
* A PUBACK with a failure reason (MQTT 5, e.g. not authorized, quota exceeded) is not an ack: the
  connection is dropped and the row retried after the backoff, so nothing is silently lost.
"""

from __future__ import annotations

import collections
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from agent.config import MqttConfig
from agent.errors import UplinkError

from .outbox import Outbox

log = logging.getLogger("agent.mqtt")

RETAINED_KINDS = frozenset({"state", "status"})  # PROTOCOL.md §1: retained topics
CONNECT_TIMEOUT_S = 10.0  # TCP connect + TLS handshake, then again for the CONNACK
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
        self._publish_deadline = 0.0  # monotonic; set by stop()
        self._state = "stopped"
        self._protocol = "3.1.1" if cfg.protocol == "3.1.1" else "5"
        self._sticky_311 = cfg.protocol == "3.1.1"  # auto: the broker refused 5 once
        self._counts = dict(connects=0, disconnects=0, errors=0, published=0, acked=0)
        self._inflight = 0
        self._last_error: str | None = None
        self._last_connect_ms: int | None = None
        self._reconnect_delay = 0.0
        self._logged: set[str] = set()
        self._paho_error: str | None = None  # last error paho logged (socket/TLS details)
        self._rng = random.Random()

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

    def stop(self, drain_timeout_s: float = 3.0) -> int:
        """Publish what can be acknowledged within the timeout, disconnect, stop the thread.

        Returns the number of rows left in the outbox. Never blocks much longer than the
        timeout, even when the broker is unreachable or a connect attempt hangs.
        """
        start = time.monotonic()
        # Leave time for the DISCONNECT and thread exit inside the caller's budget.
        reserve = min(0.5, drain_timeout_s / 4)
        with self._lock:
            thread = self._thread
            if thread is not None and not self._stopping:
                self._publish_deadline = start + max(0.0, drain_timeout_s - reserve)
            self._stopping = True
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
        """A snapshot for status displays; see the keys below."""
        cfg = self._cfg
        with self._lock:
            return {"state": self._state, "broker": f"{cfg.host}:{cfg.port}",
                    "tls": cfg.tls.ca is not None, "protocol": self._protocol,
                    **self._counts, "last_error": self._last_error, "inflight": self._inflight,
                    "last_connect_ms": self._last_connect_ms,
                    "reconnect_delay_s": self._reconnect_delay}

    # ---- worker: connection loop ----------------------------------------------------------

    def _run(self) -> None:
        delay = self._cfg.reconnect_min_s
        retry_now = False  # protocol fallback: next attempt without waiting
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
            elif self._cfg.protocol == "auto" and proto == "5" and outcome == "closed":
                try_311 = retry_now = True  # maybe a 3.1.1-only broker: try it at once
            else:
                try_311 = False
            if client is not None:
                self._close(client)
        with self._lock:
            self._state = "stopped"
            self._inflight = 0

    def _finished(self) -> bool:
        """Stopping and (past the deadline or nothing left to publish)."""
        with self._lock:
            if not self._stopping:
                return False
            if time.monotonic() >= self._publish_deadline:
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
            stopping, deadline = self._stopping, self._publish_deadline
        if stopping:
            time.sleep(max(0.0, min(cfg.reconnect_min_s, deadline - time.monotonic())))
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
        client.on_log = self._on_paho_log
        self._events.clear()
        self._kick.clear()
        started = time.monotonic()
        try:
            client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive,
                           clean_start=True if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY)
        except (OSError, ValueError) as e:  # refused, unreachable, TLS handshake (ssl.SSLError)
            return None, self._error(f"cannot connect to {cfg.host}:{cfg.port}: {_describe(e)}")
        client.loop_start()
        while (left := started + 2 * CONNECT_TIMEOUT_S - time.monotonic()) > 0:
            self._kick.wait(min(left, _IDLE_WAIT_S))
            self._kick.clear()
            for c, kind, rc, props in self._take_events():
                if c is not client:
                    continue
                if kind == "closed":
                    why = self._paho_error or str(rc)
                    return client, self._error(f"{cfg.host}:{cfg.port} closed the connection "
                                               f"before CONNACK (MQTT {proto}): {why}", "closed")
                if kind == "connack" and rc.is_failure:
                    outcome = ("refused-version" if rc.value == _UNSUPPORTED_VERSION else "failed")
                    return client, self._error(f"{cfg.host}:{cfg.port} refused the connection "
                                               f"(MQTT {proto}): {rc}", outcome)
                if kind == "connack":
                    self._connected(client, props)
                    return client, "connected"
            with self._lock:
                if self._stopping and time.monotonic() >= self._publish_deadline:
                    return client, "failed"
        return client, self._error(f"no CONNACK from {cfg.host}:{cfg.port} within "
                                   f"{2 * CONNECT_TIMEOUT_S:.0f} s")

    def _connected(self, client: mqtt.Client, props: Any) -> None:
        receive_max = getattr(props, "ReceiveMaximum", None) if props is not None else None
        # The broker's Receive Maximum (MQTT 5) caps our window: exceeding it is a protocol error.
        self._window = min(self._cfg.max_inflight, receive_max or 65535)
        with self._lock:
            self._state, self._reconnect_delay = "connected", 0.0
            self._counts["connects"] += 1
            self._last_connect_ms = time.time_ns() // 1_000_000
            self._logged.clear()  # a new outage is worth logging again
        log.info("MQTT connected to %s:%d (MQTT %s%s, window %d)", self._cfg.host,
                 self._cfg.port, self._protocol, ", TLS" if self._cfg.tls.ca else "",
                 self._window)
        if self._on_connected is not None:
            try:
                self._on_connected()  # on this thread, not paho's: it may append and wake()
            except Exception:  # noqa: BLE001
                log.exception("on_connected callback failed")

    def _close(self, client: mqtt.Client) -> None:
        """Disconnect cleanly (no will) if still connected; join paho's thread."""
        try:
            if client.is_connected():
                client.disconnect()
            client.loop_stop()  # its thread ends once the socket is closed
        except Exception as e:  # noqa: BLE001
            log.debug("closing the MQTT client: %r", e)

    # ---- worker: publishing ---------------------------------------------------------------

    def _serve_safely(self, client: mqtt.Client) -> None:
        try:
            self._serve(client)
        except Exception as e:  # noqa: BLE001 - e.g. StorageError: reconnect and retry later
            self._error(f"uplink failed while publishing: {_describe(e)}")
            log.debug("uplink failure", exc_info=True)
        with self._lock:
            self._counts["disconnects"] += 1
            self._inflight = 0

    def _serve(self, client: mqtt.Client) -> None:
        """Publish and ack until the connection is lost or the drain is over."""
        sent: dict[int, int] = {}  # mid -> row id, unacknowledged, in publish order
        after = 0  # id of the last row published on this connection
        while True:
            self._kick.clear()  # before looking for work: a wake() from now on is kept
            acked, failed = [], None
            for c, kind, a, b in self._take_events():
                if c is not client:
                    continue
                if kind == "closed":
                    self._error(f"connection to {self._cfg.host}:{self._cfg.port} lost: "
                                f"{self._paho_error or b or a}")
                    return
                if kind == "puback" and a in sent:
                    if b.is_failure:
                        failed = failed or f"broker refused a message on {self._cfg.host}:" \
                                           f"{self._cfg.port}: {b}"
                    else:
                        acked.append(sent.pop(a))
            if acked:
                self._outbox.ack_many(acked)
                with self._lock:
                    self._counts["acked"] += len(acked)
            if failed:
                self._error(failed)  # not acked: retried from the oldest after the backoff
                return
            with self._lock:
                stopping, deadline = self._stopping, self._publish_deadline
                self._inflight = len(sent)
            if stopping and (time.monotonic() >= deadline
                             or (not sent and not self._outbox.peek(1, after))):
                return
            room = self._window - len(sent)
            rows = self._outbox.peek(room, after) if room > 0 else []
            for row in rows:
                try:
                    info = client.publish(row.topic, row.payload, qos=1,
                                          retain=row.kind in RETAINED_KINDS)
                except ValueError as e:  # can never be sent (bad topic, absurd size): drop it
                    log.error("dropping outbox row %d (%s): %s", row.id, row.topic, e)
                    self._outbox.ack_many([row.id])
                    after = row.id
                    continue
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    break  # connection gone; the "closed" event follows
                sent[info.mid] = row.id
                after = row.id
            with self._lock:
                self._inflight = len(sent)
                self._counts["published"] += len(rows)
            if len(rows) == room and room > 0 and not sent:
                continue  # only dropped rows: look again at once
            wait = _IDLE_WAIT_S
            if stopping:
                wait = max(0.0, min(wait, deadline - time.monotonic()))
            self._kick.wait(wait)

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
        # Keeps the socket/TLS detail behind "connection lost" for last_error.
        if level in (mqtt.MQTT_LOG_ERR, mqtt.MQTT_LOG_WARNING):
            self._paho_error = buf

    def _error(self, message: str, outcome: str = "failed") -> str:
        """Record an error: counted, shown in status(), logged once per distinct message."""
        with self._lock:
            self._last_error = message
            self._counts["errors"] += 1
            first = message not in self._logged
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


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
