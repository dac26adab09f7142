"""Remote commands on the runtime's core thread: verify, remember, execute, answer.

Every message from `{prefix}/commands` goes through the CommandGate (core/commands.py) before
anything else; only an Accepted command reaches the handler of its family (families.py).
Statuses are signed and committed to the outbox (and the latest one to the replay store, for
re-deliveries) before they are published.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..adapters.clockstore import mono_ms
from ..adapters.replaystore import ReplayStore
from ..adapters.truststore import load_trust_store
from ..config import CommandsConfig
from ..core import commands as C
from ..core import protocol as proto
from ..core.cose import decode_unverified
from ..core.executor import Status
from ..core.ratelimit import TokenBucket
from ..core.registry import Registry
from ..errors import AgentError
from .families import Handler

if TYPE_CHECKING:
    from .publisher import Publisher

log = logging.getLogger("agent.commands")


def gate_limits(cfg: CommandsConfig) -> C.GateLimits:
    return C.GateLimits(max_skew_ms=cfg.max_skew_ms, max_lifetime_ms=cfg.max_lifetime_ms,
                        max_message_bytes=cfg.max_message_bytes)


class CommandService:
    """The commands topic on the core thread: gate, replay store, dispatch to the handler of
    each command's family, and every status signed, stored and published."""

    def __init__(self, cfg: CommandsConfig, vin: str, storage_dir: Path, publisher: Publisher,
                 handlers: Sequence[Handler]):
        self.cfg = cfg
        self.vin = vin
        self.publisher = publisher
        self.handlers: tuple[Handler, ...] = tuple(handlers)
        self.registry = Registry(h.family for h in self.handlers)
        self._by_family = {h.family.name: h for h in self.handlers}
        self._trust = self._by_family.get("trust")  # the trust store as a TUF target
        self._names = self.registry.names | {C.grants.GRANT_PERMISSION}  # allow may name it
        store = (self._trust.initial_store() if self._trust is not None
                 else load_trust_store(cfg.trust_store, self._names))
        rental = self._by_family.get("rental")
        revoked = rental.revoked if getattr(rental, "cfg", None) is not None else None
        self.gate = C.CommandGate(store, vin, gate_limits(cfg), self.registry,
                                  clock=getattr(publisher, "clock", None), revoked=revoked,
                                  max_grant_ms=rental.cfg.max_grant_ms if revoked else
                                  C.grants.MAX_GRANT_MS)
        if revoked is not None:
            rental.bind_gate(self.gate)
        if self._trust is not None:
            self._trust.bind_gate(self.gate)
        self.replay = ReplayStore(storage_dir, on_loss=self.gate.note_replay_loss)
        self.gate.note_replay_loss(self.replay.lost_at_ms)
        self.bucket = TokenBucket(cfg.reject_rate_per_s, cfg.reject_burst)
        self.flooding = False
        self.counters: Counter = Counter()
        self.last_activity_ms = 0
        self._final: dict | None = None

    def handler(self, family: str) -> Handler:
        return self._by_family[family]

    @property
    def busy(self) -> bool:
        """A handler wants polling every few ms (actions waiting for confirmation)."""
        return any(getattr(h, "busy", False) for h in self.handlers)

    # -- incoming -------------------------------------------------------------------------

    def handle(self, message: bytes, now_ms: int) -> None:
        """One message from the commands topic (core thread)."""
        self.counters["received"] += 1
        self.last_activity_ms = now_ms
        if self.flooding:
            # Under a flood of bad messages even verifying costs too much: drop unread until
            # the rate limit has a token again.
            if not self.bucket.take(now_ms):
                self.counters["flood_dropped"] += 1
                return
            self.flooding = False
        outcome = self.gate.check(message, now_ms, self.replay.seen, mono_ms())
        if isinstance(outcome, C.Accepted):
            self._accepted(outcome.command, now_ms)
        elif isinstance(outcome, C.Redelivery):
            self._redelivered(outcome.id, now_ms)
        else:
            self._rejected(outcome, now_ms)

    def _accepted(self, cmd: C.Command, now_ms: int) -> None:
        if not self.replay.record(cmd.id, cmd.digest, cmd.exp, now_ms):
            self._redelivered(cmd.id, now_ms)  # recorded meanwhile: same id, same payload
            return
        self.counters["accepted"] += 1
        log.info("command %s %s from %s", cmd.id, cmd.name, cmd.key_name)
        handler = self._by_family[self.registry.family_of(cmd.name).name]
        self._emit(handler, handler.handle(cmd, now_ms), now_ms)

    def _rejected(self, r: C.Rejected, now_ms: int) -> None:
        self.counters["rejected"] += 1
        self.counters[f"rejected.{r.reason}"] += 1
        if not self.bucket.take(now_ms):
            self.flooding = True
            self.counters["flood_dropped"] += 1
            return
        log.info("command %s rejected: %s %s", r.id, r.reason, r.detail)
        if r.id is not None and r.digest is not None:
            self.replay.record(r.id, r.digest, r.exp, now_ms)  # answered the same way again
        self._status(Status(r.id, proto.REJECTED, r.reason, r.detail), now_ms,
                     remember=r.digest is not None)

    def _redelivered(self, command_id: str, now_ms: int) -> None:
        self.counters["redelivered"] += 1
        latest = self.replay.latest_status(command_id)
        if latest is not None:
            if _is_terminal(latest) or self._running(command_id):
                self.publisher.response_signed(latest)
                return
        # Recorded but not finished, and no longer running here: the agent restarted mid-way.
        self._status(Status(command_id, proto.FAILED, proto.INTERNAL_ERROR,
                            "interrupted by an agent restart; not executed again"), now_ms)

    def recover(self, now_ms: int) -> None:
        """At start: a command recorded before a crash or stop that has no terminal status and
        is not carried on (an update resumes) ends FAILED/INTERNAL_ERROR now, so the cloud is
        not left waiting. Its actuator's state arrives in the next state record."""
        try:
            rows = self.replay.recorded()  # before any purge: expired ids are still there
        except AgentError as e:
            log.error("cannot look for interrupted commands: %s", e)
            return
        for cid, latest in rows:
            if _is_terminal(latest) or self._running(cid):
                continue
            self.counters["interrupted"] += 1
            log.warning("command %s was interrupted by an agent restart", cid)
            try:
                self._status(Status(cid, proto.FAILED, proto.INTERNAL_ERROR,
                                    "interrupted by an agent restart; not executed further"),
                             now_ms)
            except AgentError as e:  # disk full: the agent must still start
                log.error("cannot answer interrupted command %s: %s", cid, e)

    def _running(self, command_id: str) -> bool:
        return any(h.running(command_id) for h in self.handlers)

    # -- execution ------------------------------------------------------------------------

    def poll(self, now_ms: int) -> None:
        for h in self.handlers:
            self.poll_family(h, now_ms)

    def poll_family(self, handler: Handler, now_ms: int) -> None:
        """One handler's poll (the runtime runs each as its own guarded step)."""
        statuses = handler.poll(now_ms)
        if statuses:
            self._emit(handler, statuses, now_ms)

    def report(self, statuses: list[Status], now_ms: int, family: str) -> None:
        """Statuses a family produced outside handle/poll (the update service's start and
        worker events)."""
        self._emit(self._by_family[family], statuses, now_ms)

    def _emit(self, handler: Handler, statuses: list[Status], now_ms: int) -> None:
        """Sign, store and publish. One terminal status per command, also across restarts:
        a status for an id whose stored latest status is terminal is not sent."""
        for s in statuses:
            if s.id is not None and _is_terminal(self.replay.latest_status(s.id)):
                continue
            self._status(s, now_ms)
        reported = getattr(handler, "reported", None)
        if reported is not None:
            reported(statuses)

    def _status(self, s: Status, now_ms: int, remember: bool = True) -> None:
        payload = proto.response_payload(self.vin, s.id, now_ms, s.status, s.reason, s.detail,
                                   progress=s.progress, result=s.result)
        signed = self.publisher.response(payload)
        if s.id is not None and remember:
            self.replay.set_status(s.id, signed)
        if s.status in proto.TERMINAL_STATUSES:
            self.counters[f"terminal.{s.status}"] += 1

    # -- control --------------------------------------------------------------------------

    def reload_trust(self) -> None:
        """SIGHUP: re-read the trust store; a broken file keeps the old one."""
        try:
            store = (self._trust.reload() if self._trust is not None
                     else load_trust_store(self.cfg.trust_store, self._names))
        except AgentError as e:
            log.error("trust store not reloaded, keeping the previous one: %s", e)
            return
        self.gate.replace_trust(store)
        log.info("trust store reloaded: %d key(s)", len(store))

    def status(self) -> dict:
        if self._final is not None:
            return self._final
        counters = Counter(self.counters)
        out: dict = {"trusted_keys": len(self.gate.trust), "replay_ids": self.replay.count()}
        for h in self.handlers:
            view = dict(h.status())
            counters.update(view.pop("counters", {}))
            if view:
                out[h.family.name] = view
        out["counters"] = {f"commands.{k}": v for k, v in sorted(counters.items())}
        return out

    def close(self) -> None:
        self._final = self.status()
        self.replay.close()


def _is_terminal(stored: bytes | None) -> bool:
    """Is this stored (signed) status of a command a terminal one?"""
    return stored is not None and \
        decode_unverified(stored)[2].get("status") in proto.TERMINAL_STATUSES
