"""A paho client that reports in the uplink machine's events (agent/core/uplink.py). Used by
``adapters/mqtt.py``, from its worker thread: paho is imported when the uplink first connects,
not while the agent starts (the files the settings name are checked by ``mqttfiles.py``)."""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import MqttConfig
from agent.core import uplink as core

log = logging.getLogger("agent.mqtt")

UNSUPPORTED_VERSION = 0x84  # CONNACK reason (paho maps the 3.1.1 return code 1 to it too)


class Client(mqtt.Client):
    """paho's client, refusing a packet announced over the limit before reading its body
    (paho has no public hook there: this reads its parse state, paho-mqtt 2.x)."""

    too_big: Callable[[int], bool] = staticmethod(lambda size: False)
    connect_properties: Properties | None = None

    def _sock_recv(self, bufsize: int) -> bytes:
        p = self._in_packet
        if p["have_remaining"] and p["to_process"] == (n := p["remaining_length"]) \
                and self.too_big(n):
            raise OSError(f"a {n}-byte packet is over the limit")
        return super()._sock_recv(bufsize)


def new_client(cfg: MqttConfig, client_id: str, protocol: str, will: tuple[str, bytes],
               max_packet_size: int | None, report: Callable[[mqtt.Client, object], None],
               too_big: Callable[[int], bool], tls: ssl.SSLContext | None,
               password: str | None) -> Client:
    """A fresh client (clean session) whose callbacks ``report(client, event)``."""
    v5 = protocol == "5"
    client = Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                    clean_session=None if v5 else True, reconnect_on_failure=False)
    client.suppress_exceptions = True  # a bug in a callback must not kill paho's thread
    client.too_big = too_big
    client.connect_timeout = core.CONNECT_TIMEOUT_S
    client.max_inflight_messages_set(0)  # unlimited: the machine keeps the window
    client.will_set(will[0], will[1], qos=1, retain=True)
    if tls is not None:
        client.tls_set_context(tls)
    if cfg.username or password is not None:
        client.username_pw_set(cfg.username, password)
    if v5:
        client.connect_properties = Properties(PacketTypes.CONNECT)
        if max_packet_size:
            client.connect_properties.MaximumPacketSize = max_packet_size
    client.on_connect = lambda c, u, f, rc, p: report(c, core.Refused(
        str(rc), rc.value == UNSUPPORTED_VERSION) if rc.is_failure else core.Connected(
        time.time_ns() // 1_000_000, getattr(p, "ReceiveMaximum", None)))
    client.on_disconnect = lambda c, u, f, rc, p: report(c, core.Closed(str(rc)))
    client.on_publish = lambda c, u, mid, rc, p: report(c, core.Puback(mid, not rc.is_failure,
                                                                       str(rc)))
    client.on_subscribe = lambda c, u, mid, rcs, p: report(c, core.Suback(
        mid, tuple(r.is_failure for r in rcs), tuple(str(r) for r in rcs)))
    client.on_socket_open = _no_delay
    return client


def _no_delay(client, userdata, sock) -> None:
    """Disable Nagle: a PUBLISH held back by delayed ACKs (up to 40 ms) would ruin latency."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket: nothing to tune
        pass


def close_client(client, with_will: bool, protocol: str) -> None:
    """End a connection: with the will (MQTT 5: DISCONNECT 0x04; 3.1.1: no DISCONNECT at all)
    or cleanly (the broker discards the will). Best effort: never raises."""
    try:
        if with_will and protocol == "5":
            client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT,
                                                    "Disconnect with will message"))
        elif with_will:  # 3.1.1: end the connection without a DISCONNECT
            if (sock := client.socket()) is not None:
                sock.shutdown(socket.SHUT_RDWR)
        else:
            client.disconnect()  # a no-op if the connection is already gone
            end = time.monotonic() + 0.2  # paho closes the socket once DISCONNECT is out;
            while client.socket() is not None and time.monotonic() < end:  # not before
                time.sleep(0.002)  # loop_stop, or the broker would publish the will
        client.loop_stop()
    except Exception as e:  # noqa: BLE001 - best effort (or None: nothing to close)
        log.debug("closing the MQTT client: %r", e)
