"""An embedded MQTT broker (amqtt, pure Python) for the demo on a machine with no Mosquitto.

amqtt speaks MQTT 3.1.1 only and refuses MQTT 5 — so the demo also shows the agent's
fallback from 5 to 3.1.1 working against a real broker.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

from ..errors import UplinkError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    def __init__(self, port: int | None = None):
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="broker", daemon=True)

    def start(self, timeout: float = 10.0) -> "EmbeddedBroker":
        try:
            import amqtt.broker  # noqa: F401
        except ImportError:
            raise UplinkError("the embedded broker needs amqtt: pip install 'tcu-agent[demo]' "
                              "(or give --broker HOST:PORT of a running Mosquitto)") from None
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.ERROR)  # chatty at INFO
        self._thread.start()
        if not self._ready.wait(timeout) or self._error:
            raise UplinkError(f"embedded broker did not start on {self.host}:{self.port}: "
                              f"{self._error}")
        return self

    def _run(self) -> None:
        from amqtt.broker import Broker

        async def main():
            config = {"listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                      "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                                  {"allow_anonymous": True}}}
            self._broker = Broker(config)
            await self._broker.start()
            self._ready.set()
            self._stopped = asyncio.Event()
            await self._stopped.wait()
            await self._broker.shutdown()

        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(main())
        except BaseException as e:  # reported by start()
            self._error = e
            self._ready.set()

    def stop(self) -> None:
        if self._loop and self._ready.is_set() and not self._error:
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(5)
