"""Signed records into the outbox, and the uplink that drains it (PROTOCOL.md §1-5).

Everything the vehicle sends is signed and committed to the outbox before the uplink may
publish it; the uplink deletes a row only on the broker's PUBACK. Called from the runtime's
core thread, except `on_connected`, which only raises a flag for that thread.
"""

from __future__ import annotations

import logging
import threading
import time

from ..adapters.keys import load_private_key
from ..adapters.mqtt import Uplink
from ..adapters.outbox import Outbox
from ..config import Config
from ..core.batch import Batch
from ..core.campaigns import DEFAULT_PRIORITY
from ..core.cose import Signer
from ..core.protocol import Topics, state_payload, status_record
from ..core.ratelimit import RateLimit
from ..errors import ConfigError

log = logging.getLogger("agent.app.publisher")

STATE_MIN_INTERVAL_MS = 1000  # state records on change: at most one a second


def now_ms() -> int:
    return int(time.time() * 1000)


class Publisher:
    def __init__(self, config: Config, outbox: Outbox | None = None):
        if config.mqtt is None:
            raise ConfigError("an [mqtt] section is needed to publish")
        if config.signing is None:
            raise ConfigError("signing.key_file: missing required key (every message is signed; "
                              "create a key with `tcu-agent keys generate --dir DIR`)")
        self.vin = config.vehicle.vin
        self.topics = Topics(config.vehicle.prefix)
        self.signer = Signer(load_private_key(config.signing.key_file))
        self.outbox = outbox or Outbox(config.storage.dir, config.storage.max_bytes)
        client_id = config.mqtt.client_id or f"tcu-{self.vin}"
        self.uplink = Uplink(config.mqtt, self.outbox, client_id, will=self._will,
                             on_connected=self._connected)
        self.state_limit = RateLimit(STATE_MIN_INTERVAL_MS)
        self._just_connected = threading.Event()
        self._final: dict | None = None
        self._lost = 0  # samples of batches the outbox could not store (disk full)

    def start(self) -> None:
        self.uplink.start()

    def stop(self, drain_timeout_s: float = 3.0) -> int:
        """Queue the offline record, publish what can be acknowledged in time, disconnect.
        Returns the number of messages left in the outbox for the next start (-1: unknown).
        If the offline record cannot be queued (disk full), the uplink still stops, leaving
        with the will, and the outbox is closed."""
        try:
            self._append("status", self.topics.status, status_record(self.vin, now_ms(), False))
            queued = True
        except Exception as e:  # noqa: BLE001 - e.g. disk full: stopping must go on
            log.error("cannot queue the offline record (%s); leaving with the MQTT will", e)
            queued = False
        left = self.uplink.stop(drain_timeout_s, will=not queued)
        self._final = self.status()  # what `tcu-agent status` shows after the stop
        self.outbox.close()
        return left

    # -- records --------------------------------------------------------------------------

    def batch(self, batch: Batch) -> int:
        """Sign and queue a telemetry batch; returns its seq. Raises StorageError when the
        outbox cannot take it: its samples are then reported in the next batch's `drop`."""
        def build(seq: int, drop: int) -> bytes:
            return self.signer.sign(batch.payload(self.vin, seq, drop))

        try:
            # extra_drop: stored with the batch, so the loss is carried on if it is evicted
            # A campaign's batch (§8) carries its priority and outbox quota; base telemetry
            # has the default priority and no quota of its own.
            campaign = getattr(batch, "campaign", None)
            seq = self.outbox.append_telemetry(
                build, batch.samples, now_ms(), self.topics.telemetry, extra_drop=self._lost,
                priority=getattr(batch, "priority", DEFAULT_PRIORITY), campaign=campaign,
                max_bytes=getattr(batch, "max_bytes", None) if campaign else None)
        except Exception:
            self._lost += batch.samples
            raise
        self._lost = 0
        self.uplink.wake()
        return seq

    def state(self, values: dict, t_ms: int | None = None) -> dict:
        """Sign and queue a state record (§4); returns its payload."""
        payload = state_payload(self.vin, t_ms if t_ms is not None else now_ms(), values)
        self._append("state", self.topics.state, payload)
        return payload

    def response(self, payload: dict) -> bytes:
        """Sign and queue a command status (§7); returns the signed message."""
        return self._append("response", self.topics.responses, payload)

    def response_signed(self, message: bytes) -> None:
        """Queue an already signed status again (the answer to an MQTT re-delivery)."""
        self.outbox.append("response", self.topics.responses, message, now_ms())
        self.uplink.wake()

    def _append(self, kind: str, topic: str, payload: dict) -> bytes:
        signed = self.signer.sign(payload)
        self.outbox.append(kind, topic, signed, now_ms())
        self.uplink.wake()
        return signed

    # -- connection events ----------------------------------------------------------------

    def _will(self) -> tuple[str, bytes]:
        # Built and signed at each connect (§5): its `t` says when the vehicle went online.
        return self.topics.status, self.signer.sign(status_record(self.vin, now_ms(), False))

    def _connected(self) -> None:
        self._just_connected.set()  # the core thread publishes online + state (it owns the core)

    def take_connected(self) -> bool:
        if self._just_connected.is_set():
            self._just_connected.clear()
            return True
        return False

    def online(self) -> None:
        self._append("status", self.topics.status, status_record(self.vin, now_ms(), True))

    def status(self) -> dict:
        if self._final is not None:
            return self._final
        return {"uplink": self.uplink.status(), "outbox": self.outbox.stats(),
                "outbox_campaigns": self.outbox.campaign_bytes(), "kid": self.signer.kid.hex()}
