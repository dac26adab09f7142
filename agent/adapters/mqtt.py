"""The uplink: drains the outbox to the MQTT broker (PROTOCOL.md §1, §5). The only paho user.

Every decision is in ``agent/core/uplink.py``; this glue feeds the machine paho's events and
carries out its actions. One worker thread (``tcu-uplink``) runs the machine, every outbox call
and every ``publish``; paho's thread only moves bytes, its callbacks only queue an event and set
the wake-up Event, which the worker clears *before* looking for work (no wake-up is lost). A
packet announced over the limit ends the connection before its body is read (MQTT 5: the
CONNECT's Maximum Packet Size stops the broker first). ``publish_volatile`` is the one publish
from another thread: a status the full disk could not keep, sent once from memory.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.config import MqttConfig
from agent.core import uplink as core
from agent.errors import UplinkError

from .mqttfiles import describe, read_password, tls_context
from .outbox import Outbox

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

log = logging.getLogger("agent.mqtt")


def _paho():
    """paho's client module: imported by the worker when it first connects, so that the agent
    is ready (buses and outbox open) without it; a dict look-up after that."""
    import paho.mqtt.client

    return paho.mqtt.client


class Uplink:
    """Publishes the outbox to the broker in order, QoS 1, acking rows on PUBACK."""

    def __init__(self, cfg: MqttConfig, outbox: Outbox, client_id: str,
                 will: Callable[[], tuple[str, bytes]],
                 on_connected: Callable[[], None] | None = None,
                 max_packet_size: int | None = None):
        """Check the TLS and password files (UplinkError). ``max_packet_size``: the largest
        packet taken from the broker. Nothing connects before :meth:`start`."""
        self._cfg, self._outbox, self._client_id = cfg, outbox, client_id
        self._will, self._on_connected = will, on_connected
        tls_context(cfg.tls), read_password(cfg.password_file)  # fail early on unusable files
        self._m = core.UplinkMachine(core.UplinkParams(
            f"{cfg.host}:{cfg.port}", cfg.protocol, cfg.reconnect_min_s, cfg.reconnect_max_s,
            cfg.max_inflight, cfg.tls.ca is not None, max_packet_size))
        self._lock = threading.Lock()  # guards the machine and _subs; never held calling out
        self._keepalive: int | None = None  # set_keepalive(): the next connections' keepalive
        self._kick = threading.Event()
        self._events: collections.deque = collections.deque()  # (client, event) from paho
        self._thread: threading.Thread | None = None
        self._client: mqtt.Client | None = None  # the worker's; read under the lock elsewhere
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

    def publish_volatile(self, topic: str, payload: bytes) -> None:
        """QoS 1, once, no outbox row; UplinkError (keep it, retry) when not connected now."""
        with self._lock:
            client = self._client if self._m.state == "connected" else None
        if client is None or client.publish(topic, payload, qos=1).rc != _paho().MQTT_ERR_SUCCESS:
            raise UplinkError(f"no connection to {self._cfg.host}:{self._cfg.port} now")

    def set_keepalive(self, seconds: int | None) -> None:  # of the next connections; None: config
        self._keepalive = seconds

    def wake(self) -> None:
        """Tell the uplink the outbox has new rows (cheap; call after every append)."""
        self._kick.set()

    def subscribe(self, topic: str, on_message: Callable[[str, bytes], None]) -> None:
        """Receive messages on ``topic`` (a filter; QoS 1) on this and every later connection.
        ``on_message(topic, payload)`` runs on paho's thread: quick, never blocking; its
        exceptions are logged. Retained messages are not delivered."""
        with self._lock:
            self._subs[topic] = on_message
            self._m.send(core.SubscriptionAdded(topic))
        self._kick.set()

    def stop(self, drain_timeout_s: float = 3.0, *, will: bool = False) -> int:
        """Publish what is acked within the timeout, disconnect, stop; return the rows left.
        ``will``: leave with the will (the caller could not queue its offline record)."""
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
        """A snapshot for status displays (see ``UplinkMachine.status``)."""
        with self._lock:
            return self._m.status()

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
                ev = core.OutboxFailed(describe(e))
            if ev is not None:
                with self._lock:
                    todo.extend(self._m.send(ev, time.monotonic()))

    def _do_Connect(self, a: core.Connect):
        from .mqttclient import new_client

        self._client = self._paho_error = None
        try:
            will = self._will()  # freshly signed for every attempt
        except Exception as e:  # noqa: BLE001
            return core.ConnectFailed(repr(e), unexpected=True)
        self._client = client = new_client(
            self._cfg, self._client_id, a.protocol, will, a.maximum_packet_size, self._queue,
            self._too_big, tls_context(self._cfg.tls), read_password(self._cfg.password_file))
        client.on_message = self._on_message
        client.on_log = self._on_paho_log
        try:
            client.connect(self._cfg.host, self._cfg.port,
                           keepalive=self._keepalive or self._cfg.keepalive,
                           properties=client.connect_properties,
                           clean_start=True if a.protocol == "5" else
                           _paho().MQTT_CLEAN_START_FIRST_ONLY)
        except (OSError, ValueError) as e:  # refused, unreachable, TLS handshake (ssl.SSLError)
            return core.ConnectFailed(describe(e))
        client.loop_start()

    def _do_Publish(self, a: core.Publish):
        try:
            info = self._client.publish(a.topic, a.payload, qos=1, retain=a.retain)
        except ValueError as e:  # can never be sent (bad topic, absurd size)
            return core.Sent(a.row_id, error=f"{a.topic}: {e}")
        if info.rc != _paho().MQTT_ERR_SUCCESS:
            return core.Sent(a.row_id, error=_paho().error_string(info.rc), fatal=True)
        return core.Sent(a.row_id, mid=info.mid)

    def _do_Peek(self, a: core.Peek):
        return core.Rows(self._outbox.peek(a.limit, a.after_id, a.urgent))

    def _do_Ack(self, a: core.Ack) -> None:
        self._outbox.ack_many(a.row_ids)  # an error ends the connection (OutboxFailed)

    def _do_Inspect(self, a: core.Inspect):
        try:
            return core.OutboxInfo(not self._outbox.peek(1),
                                   self._outbox.stats()["by_kind"]["status"] > 0)
        except Exception:  # noqa: BLE001 - a broken outbox: the machine assumes the worst
            return core.OutboxInfo(None, None)

    def _do_Subscribe(self, a: core.Subscribe):
        from paho.mqtt.subscribeoptions import SubscribeOptions

        opts = (SubscribeOptions(qos=1, retainHandling=a.retain_handling)
                if a.retain_handling is not None else 1)
        rc, mid = self._client.subscribe([(t, opts) for t in a.filters])
        return core.Subscribed(mid if rc == _paho().MQTT_ERR_SUCCESS else None, a.filters)

    def _do_Close(self, a: core.Close) -> None:
        from .mqttclient import close_client

        client, self._client = self._client, None
        close_client(client, a.with_will, a.protocol)

    def _do_NotifyConnected(self, a) -> None:
        try:  # on this thread, not paho's: it may append and wake()
            self._on_connected and self._on_connected()
        except Exception:
            log.exception("on_connected callback failed")

    def _do_Log(self, a: core.Log) -> None:
        log.log(logging.getLevelName(a.level.upper()), "%s", a.message)

    def _queue(self, client: mqtt.Client, ev) -> None:
        self._events.append((client, ev))
        self._kick.set()

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            if not self._m.deliver(msg.retain):
                return
            matches = _paho().topic_matches_sub
            targets = [cb for t, cb in self._subs.items() if matches(t, msg.topic)]
        for callback in targets:
            try:
                callback(msg.topic, bytes(msg.payload))
            except Exception:
                log.exception("message handler for %s failed", msg.topic)

    def _on_paho_log(self, client, userdata, level, buf) -> None:
        # The socket/TLS detail behind "connection lost": the first error is the cause; paho's
        # "Client is not connected" that follows is not.
        if level == _paho().MQTT_LOG_ERR and not buf.startswith("Client is not connected"):
            self._paho_error = self._paho_error or buf

    def _too_big(self, size: int) -> bool:
        with self._lock:
            return self._m.oversized(size)

