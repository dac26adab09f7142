"""The trust family: `trust.refresh` and the periodic refresh of the trust store from TUF.

A refresh runs in a worker thread (the network must not stall the core loop): python-tuf
checks the repository's metadata (root rotation, thresholds, expiry, rollback) against
`updates.trusted_root`; the target's signed custom fields are checked before a byte of it is
fetched (core/trust.py: version never lower than the installed one, VIN / hardware scoping);
the file is then parsed completely (every key inline, valid, no duplicates) and installed
atomically (adapters/truststore.py). The core thread picks the result up in poll(): the
command's terminal status is returned first, then the gate gets the new store, so the
refreshing command is answered under the store that authorised it and the next command is
checked against the new one.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from ..adapters import truststore as T
from ..core.commands import Command, TrustStore
from ..core.executor import Status
from ..core.protocol import (
    ACCEPTED,
    BUSY,
    FAILED,
    REJECTED,
    SUCCEEDED,
    UNKNOWN_COMMAND,
    VERIFICATION_FAILED,
)
from ..core.trust import FAMILY, accept_trust_target
from ..core.updates import check_repository
from ..errors import ConfigError, UpdateError

log = logging.getLogger("agent.trust")


@dataclass
class _Job:
    command_id: str | None  # None: the periodic refresh
    repository: str
    target: str
    done: threading.Event
    outcome: tuple | None = None  # ("installed", store, info) / ("same", version) / ("failed", reason, detail)


class TrustHandler:
    family = FAMILY

    def __init__(self, config, names, fetch=None):
        self.vin = config.vehicle.vin
        self.updates = config.updates
        self.refresh_cfg = config.trust
        self.factory = config.commands.trust_store
        self.storage = Path(config.storage.dir)
        self.cache = self.storage / T.TRUST_DIR / "tuf"
        self.downloads = self.storage / T.TRUST_DIR / "download"
        self.names = frozenset(names) | FAMILY.commands
        self._fetch = fetch  # injectable fetch_target (tests use the real one)
        self.gate = None  # bound by CommandService once the gate exists
        self.in_force: dict = {"source": str(self.factory), "version": 0}
        self._job: _Job | None = None
        self._next_refresh_ms = 0
        self.last_error: str | None = None
        self.last_refresh_ms: int | None = None

    # -- wiring ---------------------------------------------------------------------------

    def initial_store(self) -> TrustStore:
        """The store in force at start (the installed refreshed one, else the factory file)."""
        store, self.in_force = T.current_trust_store(self.factory, self.storage, self.names)
        return store

    def bind_gate(self, gate) -> None:
        self.gate = gate

    # -- Handler --------------------------------------------------------------------------

    def handle(self, cmd: Command, now_ms: int) -> list[Status]:
        if self.updates is None:
            return [Status(cmd.id, REJECTED, UNKNOWN_COMMAND,
                           "no [updates] (TUF root) configured on this vehicle for trust.refresh")]
        repository, target = cmd.params["repository"], cmd.params["target"]
        try:
            check_repository(repository, self.updates.allowed_repositories)
        except UpdateError as e:
            return [Status(cmd.id, REJECTED, e.reason, e.detail)]
        if self._job is not None:
            return [Status(cmd.id, REJECTED, BUSY, "a trust store refresh is already running")]
        self._start(cmd.id, repository, target)
        return [Status(cmd.id, ACCEPTED)]

    def poll(self, now_ms: int) -> list[Status]:
        job = self._job
        if job is None:
            cfg = self.refresh_cfg
            if (cfg is not None and cfg.repository and cfg.interval_s > 0
                    and self.updates is not None and now_ms >= self._next_refresh_ms):
                self._next_refresh_ms = now_ms + int(cfg.interval_s * 1000)
                self._start(None, cfg.repository, cfg.target)
            return []
        if not job.done.is_set():
            return []
        self._job = None
        self.last_refresh_ms = now_ms
        kind = job.outcome[0]
        if kind == "failed":
            _, reason, detail = job.outcome
            self.last_error = detail
            log.warning("trust store refresh from %s failed: %s %s", job.repository, reason, detail)
            return [] if job.command_id is None else [Status(job.command_id, FAILED, reason, detail)]
        self.last_error = None
        if kind == "same":
            result = {"version": job.outcome[1], "changed": False}
            return [] if job.command_id is None else [Status(job.command_id, SUCCEEDED, result=result)]
        _, store, info = job.outcome
        # The terminal status goes out first (signed now, under the old store's authority);
        # the swap follows in the same core-loop pass, before the next command is read.
        statuses = [] if job.command_id is None else [Status(job.command_id, SUCCEEDED, result={
            "version": info["version"], "changed": True, "keys": len(store)})]
        self._swap(store, dict(info, source="tuf"))
        return statuses

    def running(self, command_id: str) -> bool:
        return self._job is not None and self._job.command_id == command_id

    def status(self) -> dict:
        out = {"source": self.in_force.get("source"), "version": self.in_force.get("version", 0)}
        if self.in_force.get("target"):
            out["target"] = self.in_force["target"]
        if self.last_refresh_ms is not None:
            out["last_refresh_ms"] = self.last_refresh_ms
        if self.last_error:
            out["last_error"] = self.last_error[:200]
        if self._job is not None:
            out["refreshing"] = True
        return out

    def reload(self) -> TrustStore:
        """SIGHUP: re-read the store in force. Raises ConfigError (the caller keeps the old)."""
        store, info = T.current_trust_store(self.factory, self.storage, self.names)
        self.in_force = info
        return store

    # -- the worker -----------------------------------------------------------------------

    def _swap(self, store: TrustStore, info: dict) -> None:
        self.in_force = info
        if self.gate is not None:
            self.gate.replace_trust(store)
        log.info("trust store version %s from %s in force: %d key(s)", info.get("version"),
                 info.get("repository"), len(store))

    def _start(self, command_id, repository: str, target: str) -> None:
        job = _Job(command_id, repository, target, threading.Event())
        self._job = job
        installed = int(self.in_force.get("version", 0))
        # TUF expiry is checked against the gate's clock: never earlier than the time floor.
        clock = getattr(self.gate, "clock", None)
        reference = None
        if clock is not None:
            from ..adapters.clockstore import mono_ms, system_ms

            reference = clock.now_ms(system_ms(), mono_ms())
        threading.Thread(target=self._run, args=(job, installed, reference), name="trust-refresh",
                         daemon=True).start()

    def _run(self, job: _Job, installed: int, reference_ms: int | None) -> None:
        try:
            job.outcome = self._refresh(job, installed, reference_ms)
        except Exception as e:  # noqa: BLE001 - a bug must still end the command
            log.exception("trust store refresh failed")
            job.outcome = ("failed", "INTERNAL_ERROR", f"{type(e).__name__}: {e}"[:200])
        finally:
            job.done.set()

    def _refresh(self, job: _Job, installed: int, reference_ms: int | None) -> tuple:
        from ..adapters.tuf import FetchConfig, fetch_target

        fetch = self._fetch or fetch_target
        wanted: dict = {}

        def accept(name: str, custom: dict) -> None:
            version = accept_trust_target(name, custom, installed, self.vin,
                                          self.updates.hardware_id)
            wanted["version"] = version
            if version is None:
                raise _Same()

        try:
            fetched = fetch(job.repository, job.target, self.updates.trusted_root, self.cache,
                            self.downloads, accept=accept, reference_ms=reference_ms,
                            config=FetchConfig(max_target_bytes=1 << 20, free_margin_bytes=0))
        except _Same:
            return ("same", installed)
        except UpdateError as e:
            return ("failed", e.reason, e.detail)
        try:
            data = Path(fetched.path).read_bytes()
            store = T.parse_trust_store(data, f"target {job.target}", self.names)
        except (OSError, ConfigError) as e:
            return ("failed", VERIFICATION_FAILED, f"the trust store is not valid: {e}"[:300])
        finally:
            Path(fetched.path).unlink(missing_ok=True)
        try:
            info = T.install(self.storage, data, wanted["version"], job.repository, job.target,
                             _now_ms())
        except OSError as e:
            return ("failed", "WRITE_FAILED", f"cannot install the trust store: {e}")
        return ("installed", store, info)


class _Same(UpdateError):
    def __init__(self):
        super().__init__(SUCCEEDED, "already installed")


def _now_ms() -> int:
    import time

    return time.time_ns() // 1_000_000

