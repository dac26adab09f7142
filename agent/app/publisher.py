"""Signed records into the outbox, and the uplink that drains it (PROTOCOL.md §1-5).

Everything the vehicle sends is signed and committed to the outbox before the uplink may
publish it; the uplink deletes a row only on the broker's PUBACK. Called from the runtime's
core thread, except `on_connected`, which only raises a flag for that thread.

One exception: a command status the outbox cannot store (disk full) is kept in memory instead
(`response_volatile`, at most VOLATILE_MAX, oldest dropped and counted) so that the command is
still answered. `flush_volatile` hands those on: back into the outbox as soon as it has room
again (delivered rows free their pages), else straight out with the uplink's
`publish_volatile` (QoS 1 from memory, no outbox row) whenever it is connected. Memory-only
answers are lost with a restart; the replay store keeps the status where it still can.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections import deque
from pathlib import Path

from ..adapters.clockstore import ClockStore, mono_ms
from ..adapters.atomic import atomic_write
from ..adapters.keys import commit_rotation, load_private_key, load_signing_key, next_key_paths
from ..adapters.mqtt import Uplink
from ..core.uplink import HEADER_ROOM
from ..adapters.outbox import DEFAULT_PRIORITY, Outbox
from ..config import Config
from ..core.batch import Batch
from ..core.clock import rmc_time_ms
from ..core.cose import Signer
from ..core.protocol import Topics, state_payload, status_record
from ..core.ratelimit import RateLimit
from ..errors import AgentError, ConfigError

log = logging.getLogger("agent.app.publisher")

STATE_MIN_INTERVAL_MS = 1000  # state records on change: at most one a second
VOLATILE_MAX = 64  # statuses kept in memory when the outbox cannot store them
VOLATILE_RETRY_MS = 1000  # how often the outbox is tried again for them


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
        self.signer = Signer(load_signing_key(config.signing))
        self.storage_dir = Path(config.storage.dir)
        # After `tcu-agent keys rotate`: {"kid", "prev", "proof"} in every status record.
        self.key_record = self._rotate_if_pending(config)
        self.outbox = outbox or Outbox(config.storage.dir, config.storage.max_bytes)
        client_id = config.mqtt.client_id or f"tcu-{self.vin}"
        # Commands are the only subscription: nothing larger than one is worth reading.
        limit = (config.commands.max_message_bytes + HEADER_ROOM
                 if config.commands is not None else None)
        self.uplink = Uplink(config.mqtt, self.outbox, client_id, will=self._will,
                             on_connected=self._connected, max_packet_size=limit)
        self.state_limit = RateLimit(STATE_MIN_INTERVAL_MS)
        # The time floor (core/clock.py): the command gate reads it, GNSS fixes raise it, the
        # status records say whether the system clock is behind it.
        self.clockstore = ClockStore(config.storage.dir)
        self.clock = self.clockstore.clock
        self.gnss_max_skew_ms = config.commands.max_skew_ms if config.commands else 30_000
        self._just_connected = threading.Event()
        self._final: dict | None = None
        self._lost = 0  # samples of batches the outbox could not store (disk full)
        self._batch_lock = threading.Lock()  # batch() runs on two threads (see there)
        self.power: str | None = None  # §10 power state carried by the status records
        self.keepalive_s: int | None = None  # asleep: the longer MQTT keepalive wanted
        self._volatile: deque[tuple[str, bytes]] = deque()  # (topic, signed status)
        self.volatile_dropped = 0
        self._volatile_tried_ms = 0

    def start(self) -> None:
        self.uplink.start()

    def stop(self, drain_timeout_s: float = 3.0) -> int:
        """Queue the offline record, publish what can be acknowledged in time, disconnect.
        Returns the number of messages left in the outbox for the next start (-1: unknown).
        If the offline record cannot be queued (disk full), the uplink still stops, leaving
        with the will, and the outbox is closed."""
        try:
            self._append("status", self.topics.status, self._status_record(False))
            queued = True
        except Exception as e:  # noqa: BLE001 - e.g. disk full: stopping must go on
            log.error("cannot queue the offline record (%s); leaving with the MQTT will", e)
            queued = False
        left = self.uplink.stop(drain_timeout_s, will=not queued)
        self.clockstore.save()
        self._final = self.status()  # what `tcu-agent status` shows after the stop
        self.outbox.close()
        return left

    # -- records --------------------------------------------------------------------------

    def batch(self, batch: Batch) -> int:
        """Sign and queue a telemetry batch; returns its seq. Raises StorageError when the
        outbox cannot take it: its samples are then reported in the next batch's `drop`.
        Thread-safe: base telemetry comes from the batch store's thread (app/batchstore.py),
        campaign captures from the core thread."""
        def build(seq: int, drop: int) -> bytes:
            return self.signer.sign(batch.payload(self.vin, seq, drop))

        with self._batch_lock:
            try:
                # extra_drop: stored with the batch, so the loss is carried on if it is evicted
                # A campaign's batch (§8) carries its priority and outbox quota; base
                # telemetry has the default priority and no quota of its own.
                campaign = getattr(batch, "campaign", None)
                seq = self.outbox.append_telemetry(
                    build, batch.samples, now_ms(), self.topics.telemetry,
                    extra_drop=self._lost,
                    priority=getattr(batch, "priority", DEFAULT_PRIORITY), campaign=campaign,
                    max_bytes=getattr(batch, "max_bytes", None) if campaign else None)
            except Exception:
                self._lost += batch.samples
                raise
            self._lost = 0
        self.uplink.wake()
        return seq

    def tick(self) -> None:
        """From the core thread now and then: the time floor's periodic save."""
        self.clockstore.tick()

    def state(self, values: dict, t_ms: int | None = None) -> dict:
        """Sign and queue a state record (§4); returns its payload."""
        payload = state_payload(self.vin, t_ms if t_ms is not None else now_ms(), values)
        self._append("state", self.topics.state, payload)
        return payload

    def response(self, payload: dict) -> bytes:
        """Sign and queue a command status (§7); returns the signed message."""
        self.clockstore.tick()  # an accepted command may have raised the floor
        return self._append("response", self.topics.responses, payload)

    def response_signed(self, message: bytes) -> None:
        """Queue an already signed status again (the answer to an MQTT re-delivery)."""
        self.outbox.append("response", self.topics.responses, message, now_ms())
        self.uplink.wake()

    def response_volatile(self, payload: dict) -> bytes:
        """Sign a command status the outbox could not store and keep it in memory (see the
        module docstring); returns the signed message."""
        signed = self.signer.sign(payload)
        self.keep_signed(signed)
        return signed

    def keep_signed(self, message: bytes) -> None:
        """Keep an already signed status in memory for the uplink (the outbox failed)."""
        if len(self._volatile) >= VOLATILE_MAX:
            self._volatile.popleft()
            self.volatile_dropped += 1
        self._volatile.append((self.topics.responses, message))
        self.flush_volatile(now_ms(), force=True)

    def volatile_pending(self) -> int:
        return len(self._volatile)

    def flush_volatile(self, t_ms: int, force: bool = False) -> int:
        """Hand statuses kept in memory on (module docstring); at most every
        VOLATILE_RETRY_MS unless `force`. Returns how many are still waiting."""
        if not self._volatile or (not force and t_ms - self._volatile_tried_ms < VOLATILE_RETRY_MS):
            return len(self._volatile)
        self._volatile_tried_ms = t_ms
        while self._volatile:
            topic, message = self._volatile[0]
            try:
                try:  # back into the outbox if there is room again, else straight out
                    self.outbox.append("response", topic, message, t_ms)
                except AgentError:
                    self.uplink.publish_volatile(topic, message)
            except AgentError:
                break
            self._volatile.popleft()
            self.uplink.wake()
        return len(self._volatile)

    def _append(self, kind: str, topic: str, payload: dict) -> bytes:
        signed = self.signer.sign(payload)
        self.outbox.append(kind, topic, signed, now_ms())
        self.uplink.wake()
        return signed

    # -- connection events ----------------------------------------------------------------

    def _will(self) -> tuple[str, bytes]:
        # Built and signed at each connect (§5): its `t` says when the vehicle went online.
        return self.topics.status, self.signer.sign(self._status_record(False))

    def _connected(self) -> None:
        self._just_connected.set()  # the core thread publishes online + state (it owns the core)

    def take_connected(self) -> bool:
        if self._just_connected.is_set():
            self._just_connected.clear()
            return True
        return False

    def online(self) -> None:
        self._append("status", self.topics.status, self._status_record(True))

    def _status_record(self, online: bool, t_ms: int | None = None) -> dict:
        system = now_ms() if t_ms is None else t_ms
        self.clock.now_ms(system, mono_ms())  # refreshes `behind`
        return status_record(self.vin, system, online, self.power if online else None,
                             clock="behind" if self.clock.behind else "ok", key=self.key_record)

    # -- key rotation ---------------------------------------------------------------------

    def _rotate_if_pending(self, config: Config) -> dict | None:
        """Switch to the key `keys rotate` prepared, with a proof signed by the old key:

            proof = COSE_Sign1 by the old key of {"v": 1, "vin", "t", "kid": new kid,
                                                  "prev": old kid, "public_key": new SPKI DER}

        key.json is written before the key files are switched, so a crash in between only
        repeats the switch (with a fresh proof) at the next start."""
        path = self.storage_dir / "key.json"
        key_file = config.signing.key_file
        if key_file is not None and next_key_paths(key_file)[0].exists():
            from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

            old, new = self.signer, Signer(load_private_key(next_key_paths(key_file)[0]))
            der = new.public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
            proof = old.sign({"v": 1, "vin": self.vin, "t": now_ms(), "kid": new.kid,
                              "prev": old.kid, "public_key": der}, compress=False)
            record = {"kid": new.kid, "prev": old.kid, "proof": proof}
            self.storage_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps({"kid": new.kid.hex(), "prev": old.kid.hex(),
                                           "proof": base64.b64encode(proof).decode()}).encode(),
                         0o600)
            commit_rotation(key_file)
            self.signer = new
            log.warning("signing key rotated: kid %s replaces %s", new.kid.hex(), old.kid.hex())
            return record
        try:
            saved = json.loads(path.read_text())
            if saved["kid"] != self.signer.kid.hex():
                return None  # an older rotation, or the key was replaced by hand
            return {"kid": bytes.fromhex(saved["kid"]), "prev": bytes.fromhex(saved["prev"]),
                    "proof": base64.b64decode(saved["proof"])}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("%s unreadable (%s): status records carry no key rotation", path, e)
            return None

    # -- the clock ------------------------------------------------------------------------

    def gnss_values(self, values: dict, system_ms: int) -> None:
        """GNSS values (core thread): a valid RMC fix raises the time floor and measures the
        system clock against GNSS time."""
        gnss = rmc_time_ms(values)
        if gnss is None:
            return
        was = self.clock.skew_warning
        raised = self.clock.gnss_fix(gnss, system_ms, mono_ms(), self.gnss_max_skew_ms)
        if self.clock.skew_warning and not was:
            log.warning("the system clock is %+d ms off GNSS time (more than %d ms)",
                        self.clock.gnss_skew_ms, self.gnss_max_skew_ms)
        elif was and not self.clock.skew_warning:
            log.info("the system clock agrees with GNSS time again")
        self.clockstore.observed(raised)

    # -- power (app/power.py) ---------------------------------------------------------------

    def power_status(self, power: str, t_ms: int | None = None) -> None:
        """The signed online status with `power` (§5, §10): on a change and as the slow
        heartbeat while asleep or in protect."""
        self.power = power
        self._append("status", self.topics.status, self._status_record(True, t_ms))

    def skipped(self, samples: int) -> None:
        """Samples of batches not published (protect, a full batch store): reported in the
        next batch's `drop`. Any thread."""
        with self._batch_lock:
            self._lost += samples

    def storage_status(self) -> dict:
        if self._final is not None:
            return {k: self._final[k] for k in ("outbox", "outbox_campaigns") if k in self._final}
        return {"outbox": self.outbox.stats(), "outbox_campaigns": self.outbox.campaign_bytes()}

    def set_keepalive(self, seconds: int | None) -> None:
        """The MQTT keepalive while asleep (None: the configured one)."""
        self.keepalive_s = seconds
        self.uplink.set_keepalive(seconds)  # from the next connection on

    def status(self, storage: bool = True) -> dict:
        """Everything `tcu-agent status` shows of the uplink; storage=False leaves out the
        outbox's counts (storage_status: queries that wait for a commit in progress)."""
        if self._final is not None:
            return self._final
        self.clock.now_ms(now_ms(), mono_ms())
        return {"uplink": self.uplink.status(), **(self.storage_status() if storage else {}),
                "kid": self.signer.kid.hex(), "clock": self.clock.status(),
                "key": {"kid": self.signer.kid.hex(), "alg": self.signer.alg,
                        "prev": self.key_record["prev"].hex() if self.key_record else None},
                "volatile": {"pending": len(self._volatile), "dropped": self.volatile_dropped}}
