"""The uplink: drains the outbox to the MQTT broker (PROTOCOL.md §1, §5). The only paho user.

Every decision (order, window, fallback, backoff, the will at stop) is in
``agent/core/uplink.py``; this module feeds it paho's events and carries out its actions.

* Threads: one worker thread (``tcu-uplink``) runs the machine, every outbox call and every
  ``publish``; paho's network thread (``loop_start``, one per connection) only reads and writes
  the socket. Paho callbacks only append an event to a deque and set an Event, so they never
  block or deadlock against the worker (paho calls ``on_publish`` holding its message lock).
* Wake-up: ``wake()``, paho events and ``stop()`` set one Event; the worker clears it *before*
  looking for work, so no wake-up is lost and none waits for polling.
* Oversized packets: paho reads a whole packet into memory. A packet announced larger than the
  limit ends the connection before its payload is read (MQTT 5 brokers do not send one: the
  CONNECT announces Maximum Packet Size); counted as ``oversized_refused``.
"""

from __future__ import annotations

import collections
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config import MqttConfig
from agent.core import uplink as core
from agent.errors import UplinkError

from .outbox import Outbox

log = logging.getLogger("agent.mqtt")
_UNSUPPORTED_VERSION = 0x84  # CONNACK reason (paho maps the 3.1.1 return code 1 to it too)


class Uplink:
    """Publishes the outbox to the broker in order, QoS 1, acking rows on PUBACK."""

    def __init__(self, cfg: MqttConfig, outbox: Outbox, client_id: str,
                 will: Callable[[], tuple[str, bytes]],
                 on_connected: Callable[[], None] | None = None,
                 max_packet_size: int | None = None):
        """Check the settings (TLS files, password file); raise UplinkError if unusable.

        ``max_packet_size``: the largest packet accepted from the broker (announced on
        MQTT 5). Nothing connects before :meth:`start`.
        """
        self._cfg, self._outbox, self._client_id = cfg, outbox, client_id
        self._will, self._on_connected = will, on_connected
        self._tls_context()  # fail early on unreadable certificates or keys
        self._password()
        self._m = core.UplinkMachine(core.UplinkParams(
            f"{cfg.host}:{cfg.port}", cfg.protocol, cfg.reconnect_min_s, cfg.reconnect_max_s,
            cfg.max_inflight, cfg.tls.ca is not None, max_packet_size))
        self._lock = threading.Lock()  # guards the machine and _subs; never held calling out
        self._kick = threading.Event()
        self._events: collections.deque = collections.deque()  # (client, event) from paho
        self._thread: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        self._paho_error: str | None = None  # first error paho logged on this connection
        self._subs: dict[str, Callable[[str, bytes], None]] = {}

    def start(self) -> None:
        """Start the worker thread; it connects, reconnects and publishes until stop()."""
        with self._lock:
            if self._thread is not None:
                if self._m.stopping:
                    raise UplinkError("the uplink was stopped; create a new one")
                return
            self._m.send(core.Start(time.monotonic()))
            self._thread = threading.Thread(target=self._run, name="tcu-uplink", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Tell the uplink the outbox has new rows (cheap; call after every append)."""
        self._kick.set()

    def subscribe(self, topic: str, on_message: Callable[[str, bytes], None]) -> None:
        """Receive messages on ``topic`` (a filter; QoS 1) on this and every later connection.

        ``on_message(topic, payload)`` runs on paho's network thread: it must be quick and must
        not block. Its exceptions are logged, not raised. Retained messages are not delivered.
        """
        with self._lock:
            self._subs[topic] = on_message
            self._m.send(core.SubscriptionAdded(topic))
        self._kick.set()

    def stop(self, drain_timeout_s: float = 3.0, *, will: bool = False) -> int:
        """Publish what can be acknowledged within the timeout, disconnect, stop the thread.

        ``will``: leave with the will even if no status row is left (the caller could not
        queue its offline record). Returns the number of rows left in the outbox. Never blocks
        much longer than the timeout, even when the broker is unreachable.
        """
        start = time.monotonic()
        with self._lock:
            thread = self._thread
            self._m.send(core.StopRequested(start, drain_timeout_s, will))
        self._kick.set()
        if thread is not None:
            thread.join(max(0.0, start + drain_timeout_s - time.monotonic()))
            if thread.is_alive():
                log.warning("MQTT uplink did not stop within %.1f s (a connect attempt is still "
                            "pending); leaving it behind", drain_timeout_s)
        with self._lock:
            self._m.send(core.Stopped())
        try:
            return self._outbox.stats()["messages"]
        except Exception as e:  # noqa: BLE001 - a closed/broken outbox must not crash shutdown
            log.warning("outbox unavailable after stopping the uplink: %s", e)
            return -1

    def status(self) -> dict:
        """A snapshot for status displays: see ``UplinkMachine.status`` (state, broker, tls,
        protocol, connects, disconnects, errors, last_error, published, acked, inflight,
        last_connect_ms, reconnect_delay_s, subscribed, retained_ignored, oversized_refused)."""
        with self._lock:
            return self._m.status()

    # ---- the worker ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                self._kick.clear()  # before looking for work: a wake() from now on is kept
                now, acts = time.monotonic(), []
                with self._lock:
                    while self._events:
                        client, ev = self._events.popleft()
                        if client is self._client:  # not a late event of an earlier one
                            if isinstance(ev, core.Closed) and self._paho_error:
                                ev = core.Closed(self._paho_error)
                            acts += self._m.send(ev, now)
                    acts += self._m.send(core.Tick(now))
                self._drive(acts)
                with self._lock:
                    if self._m.state == "stopped":
                        return
                    until = self._m.wait(time.monotonic()).until
                self._kick.wait(max(0.0, until - time.monotonic()))
            except Exception:  # noqa: BLE001 - the uplink thread must never die
                log.exception("uplink worker failed; going on")
                self._kick.wait(1.0)

    def _drive(self, actions: list) -> None:
        todo = collections.deque(actions)
        while todo:
            action = todo.popleft()
            try:
                ev = getattr(self, "_do_" + type(action).__name__)(action)
            except Exception as e:  # noqa: BLE001 - e.g. StorageError: reconnect, retry later
                log.debug("uplink action %r failed", action, exc_info=True)
                ev = core.OutboxFailed(_describe(e))
            if ev is not None:
                with self._lock:
                    todo.extend(self._m.send(ev, time.monotonic()))

    def _do_Connect(self, a: core.Connect):
        try:
            return self._connect(a)
        except (OSError, ValueError) as e:  # refused, unreachable, TLS handshake (ssl.SSLError)
            return core.ConnectFailed(_describe(e))
        except Exception as e:  # noqa: BLE001
            return core.ConnectFailed(repr(e), unexpected=True)

    def _connect(self, a: core.Connect) -> None:
        cfg, v5 = self._cfg, a.protocol == "5"
        self._client = self._paho_error = None
        topic, payload = self._will()  # freshly signed for every attempt
        client = _Client(self, mqtt.CallbackAPIVersion.VERSION2, client_id=self._client_id,
                         protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                         clean_session=None if v5 else True, reconnect_on_failure=False)
        client.suppress_exceptions = True  # a bug in a callback must not kill paho's thread
        client.connect_timeout = core.CONNECT_TIMEOUT_S
        client.max_inflight_messages_set(0)  # unlimited: the machine keeps the window
        client.will_set(topic, payload, qos=1, retain=True)
        if cfg.tls.ca is not None:
            client.tls_set_context(self._tls_context())
        password = self._password()
        if cfg.username or password is not None:
            client.username_pw_set(cfg.username, password)
        q = self._queue
        client.on_connect = lambda c, u, f, rc, p: q(c, core.Refused(
            str(rc), rc.value == _UNSUPPORTED_VERSION) if rc.is_failure else core.Connected(
            time.time_ns() // 1_000_000, getattr(p, "ReceiveMaximum", None)))
        client.on_disconnect = lambda c, u, f, rc, p: q(c, core.Closed(str(rc)))
        client.on_publish = lambda c, u, mid, rc, p: q(c, core.Puback(mid, not rc.is_failure,
                                                                      str(rc)))
        client.on_subscribe = lambda c, u, mid, rcs, p: q(c, core.Suback(
            mid, tuple(r.is_failure for r in rcs), tuple(str(r) for r in rcs)))
        client.on_message = self._on_message
        client.on_log = self._on_paho_log
        client.on_socket_open = _no_delay
        props = None
        if v5 and a.maximum_packet_size:
            props = Properties(PacketTypes.CONNECT)
            props.MaximumPacketSize = a.maximum_packet_size
        self._client = client
        client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive, properties=props,
                       clean_start=True if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY)
        client.loop_start()

    def _do_Publish(self, a: core.Publish):
        try:
            info = self._client.publish(a.topic, a.payload, qos=1, retain=a.retain)
        except ValueError as e:  # can never be sent (bad topic, absurd size)
            return core.Sent(a.row_id, error=f"{a.topic}: {e}")
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return core.Sent(a.row_id, error=mqtt.error_string(info.rc), fatal=True)
        return core.Sent(a.row_id, mid=info.mid)

    def _do_Peek(self, a: core.Peek):
        return core.Rows(self._outbox.peek(a.limit, a.after_id, a.urgent))

    def _do_Ack(self, a: core.Ack) -> None:
        self._outbox.ack_many(a.row_ids)

    def _do_Inspect(self, a: core.Inspect):
        try:
            return core.OutboxInfo(not self._outbox.peek(1),
                                   self._outbox.stats()["by_kind"]["status"] > 0)
        except Exception:  # noqa: BLE001 - a broken outbox: the machine assumes the worst
            return core.OutboxInfo(None, None)

    def _do_Subscribe(self, a: core.Subscribe):
        opts = (SubscribeOptions(qos=1, retainHandling=a.retain_handling)
                if a.retain_handling is not None else 1)
        rc, mid = self._client.subscribe([(t, opts) for t in a.filters])
        return core.Subscribed(mid if rc == mqtt.MQTT_ERR_SUCCESS else None, a.filters)

    def _do_Close(self, a: core.Close) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if a.with_will and a.protocol == "5":
                client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT,
                                                        "Disconnect with will message"))
            elif a.with_will:  # 3.1.1: end the connection without a DISCONNECT
                if (sock := client.socket()) is not None:
                    sock.shutdown(socket.SHUT_RDWR)
            else:
                client.disconnect()  # a no-op if the connection is already gone
            client.loop_stop()  # its thread ends once the socket is closed
        except Exception as e:  # noqa: BLE001 - best effort: the connection is over anyway
            log.debug("closing the MQTT client: %r", e)

    def _do_NotifyConnected(self, a) -> None:
        if self._on_connected is not None:
            try:
                self._on_connected()  # on this thread, not paho's: it may append and wake()
            except Exception:
                log.exception("on_connected callback failed")

    def _do_Log(self, a: core.Log) -> None:
        log.log(logging.getLevelName(a.level.upper()), "%s", a.message)

    # ---- paho's thread ------------------------------------------------------------------

    def _queue(self, client: mqtt.Client, ev) -> None:
        self._events.append((client, ev))
        self._kick.set()

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            if not self._m.deliver(msg.retain):
                return
            targets = [cb for t, cb in self._subs.items() if mqtt.topic_matches_sub(t, msg.topic)]
        for callback in targets:
            try:
                callback(msg.topic, bytes(msg.payload))
            except Exception:
                log.exception("message handler for %s failed", msg.topic)

    def _on_paho_log(self, client, userdata, level, buf) -> None:
        # The socket/TLS detail behind "connection lost": the first error is the cause; paho's
        # "Client is not connected" that follows is not.
        if level == mqtt.MQTT_LOG_ERR and not buf.startswith("Client is not connected"):
            self._paho_error = self._paho_error or buf

    def _too_big(self, size: int) -> bool:
        with self._lock:
            return self._m.oversized(size)

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


class _Client(mqtt.Client):
    """paho's client, refusing a packet announced over the limit before reading its body.
    paho has no public hook between a packet's length and its body, so this one reads
    paho's own parse state (paho-mqtt 2.x) at the first read of the body."""

    def __init__(self, owner: Uplink, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self._owner = owner

    def _sock_recv(self, bufsize: int) -> bytes:
        packet = self._in_packet
        if packet["have_remaining"] and packet["to_process"] == packet["remaining_length"] \
                and self._owner._too_big(packet["remaining_length"]):
            raise OSError(f"a {packet['remaining_length']}-byte packet is over the limit")
        return super()._sock_recv(bufsize)


def _no_delay(client, userdata, sock) -> None:
    """Disable Nagle: a PUBLISH held back by delayed ACKs (up to 40 ms) would ruin latency."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # not a TCP socket (e.g. a proxy or unix socket): nothing to tune


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
