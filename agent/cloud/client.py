"""A small blocking MQTT client for the cloud tool (paho-mqtt 2.x): MQTT 5, or 3.1.1 by the
agent's own protocol choice (agent/core/uplink.py ProtocolChoice)."""

from __future__ import annotations

import os
import socket
import sys
import ssl
import threading
import time
from typing import Callable

import paho.mqtt.client as mqtt

from ..core.uplink import CONNACK_TIMEOUT_S, ProtocolChoice, works_with_311
from ..errors import UplinkError

_UNSUPPORTED_VERSION = 0x84  # CONNACK reason (paho maps the 3.1.1 return code 1 to it too)


class _NoSession(UplinkError):
    """An attempt that ended before a session: outcome as ProtocolChoice.failed() takes it."""

    def __init__(self, message: str, outcome: str) -> None:
        super().__init__(message)
        self.outcome = outcome


class CloudClient:
    def __init__(self, host: str, port: int, topics: list[str],
                 on_message: Callable[[str, bytes], None], tls_ca=None, tls_cert=None,
                 tls_key=None, timeout: float = 10.0, mqtt311: bool = False):
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                   protocol=mqtt.MQTTv311 if mqtt311 else mqtt.MQTTv5)
        if tls_ca:
            try:
                self._client.tls_set(ca_certs=tls_ca, certfile=tls_cert, keyfile=tls_key,
                                     cert_reqs=ssl.CERT_REQUIRED)
            except (OSError, ssl.SSLError, ValueError) as e:
                given = ", ".join(f"{o} {p}" for o, p in (("--tls-ca", tls_ca),
                                  ("--tls-cert", tls_cert), ("--tls-key", tls_key)) if p)
                raise UplinkError(f"TLS: cannot use {given}: {e}") from None
        self._subscribed = threading.Event()
        self._connected = threading.Event()
        self._error = None
        self._outcome = "failed"
        self._closed = threading.Event()
        self._topics = topics
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = lambda *a: self._closed.set()
        self._client.on_subscribe = lambda *a: self._subscribed.set()
        self._client.on_message = lambda c, u, msg: on_message(msg.topic, msg.payload)
        # Commands are interactive: Nagle's algorithm would hold small packets ~40 ms.
        self._client.on_socket_open = lambda c, u, sock: sock.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self._client.connect(host, port, keepalive=30)
        except (OSError, ssl.SSLError) as e:
            raise UplinkError(f"cannot connect to {host}:{port}: {e}") from None
        self._client.loop_start()
        start = time.monotonic()
        while not self._subscribed.wait(0.02) and self._error is None:
            if self._closed.is_set() and not self._connected.is_set():
                self.close()
                raise _NoSession(f"{host}:{port} closed the connection before CONNACK",
                                 "closed")
            if not self._connected.is_set() and time.monotonic() - start > CONNACK_TIMEOUT_S:
                self.close()
                raise _NoSession(f"{host}:{port}: no CONNACK within {CONNACK_TIMEOUT_S:.0f} s",
                                 "no-connack")
            if time.monotonic() - start > timeout:
                break
        if not self._subscribed.is_set():
            self.close()
            if self._error is not None:
                raise _NoSession(f"{host}:{port} refused the connection: {self._error}",
                                 self._outcome)
            raise _NoSession(f"{host}:{port}: no subscription within {timeout:.0f} s "
                             "(no answer)", self._outcome)

    def _on_connect(self, client, userdata, flags, reason_code, properties=None):
        if reason_code.is_failure:
            self._error = str(reason_code)
            if reason_code.value == _UNSUPPORTED_VERSION:
                self._outcome = "refused-version"
            return
        self._connected.set()
        client.subscribe([(t, 1) for t in self._topics])

    def publish(self, topic: str, payload: bytes, timeout: float = 10.0) -> None:
        info = self._client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise UplinkError(f"publish to {topic} not acknowledged within {timeout:.0f} s")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def check_tls(ca, cert, key) -> None:
    """The agent's rules (config TlsConfig): a client certificate without a CA would
    silently connect in plaintext, so it is refused."""
    if (cert is None) != (key is None):
        raise UplinkError("--tls-cert and --tls-key go together (mutual TLS)")
    if cert is not None and ca is None:
        raise UplinkError("--tls-cert needs --tls-ca (the CA that signed the broker's "
                          "certificate); without it the connection would not be TLS")
    for option, path in (("--tls-ca", ca), ("--tls-cert", cert), ("--tls-key", key)):
        if path is not None and not os.path.isfile(path):
            raise UplinkError(f"{option} {path}: no such file")


def connect(args, topics: list[str], on_message) -> CloudClient:
    """Connect with ``args.mqtt`` ("auto" if absent: MQTT 5, and 3.1.1 when the broker
    refuses or drops a version-5 CONNECT, as the agent does)."""
    host, _, port = args.broker.rpartition(":")
    if not host or not port.isdigit():
        raise UplinkError(f"--broker {args.broker!r}: expected HOST:PORT")
    check_tls(args.tls_ca, args.tls_cert, args.tls_key)
    choice = ProtocolChoice(getattr(args, "mqtt", None) or "auto")
    while True:
        try:
            client = CloudClient(host, int(port), topics, on_message, args.tls_ca,
                                 args.tls_cert, args.tls_key, mqtt311=choice.next() == "3.1.1")
        except _NoSession as e:
            if choice.failed(e.outcome):
                print(f"tcu-cloud: {e} (MQTT 5); trying MQTT 3.1.1", file=sys.stderr)
                continue
            raise UplinkError(str(e)) from None
        if choice.connected():
            print(f"tcu-cloud: {works_with_311(f'{host}:{port}')}", file=sys.stderr)
        return client
