"""Remote commands: screened on the MQTT thread, then verified, remembered, executed and
answered on the runtime's core thread.

Every message from `{prefix}/commands` first goes through `screen()` on the MQTT thread: the
gate's cheap precheck (steps 1-2 without the signature) and the admission budgets
(core/ratelimit.py Admission). Garbage, strangers, copies of a command already answered within
`redelivery_interval_ms` and what a trusted key's budget cannot pay for are dropped there and
counted, costing microseconds and no signature check. What passes goes through the full
CommandGate (core/commands.py) on the core thread; only an Accepted command reaches the handler
of its family (families.py).

Statuses are signed and committed to the outbox (and the latest one to the replay store, for
re-deliveries) before they are published. Storage failures:
  * nothing reaches the bus unless the command's ACCEPTED is committed: the actions handler
    commits each status as the executor emits it (`commit`), and a failed ACCEPTED aborts the
    command before its first frame; it is answered REJECTED/INTERNAL_ERROR;
  * a status that cannot be stored is answered from memory (Publisher.response_volatile) and
    kept in memory as the id's latest, so a re-delivery gets that same answer; a command whose
    id cannot be recorded is refused the same way and never executed.
"""

from __future__ import annotations

import logging
import random
import threading
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
from ..core import ratelimit as R
from ..core.cose import decode_unverified
from ..core.executor import Status
from ..core.registry import Registry
from ..errors import AgentError, StorageError
from .families import Handler
from .messages import CommandMessage

if TYPE_CHECKING:
    from .publisher import Publisher

log = logging.getLogger("agent.commands")

MEMORY_IDS = 1024  # ids whose latest status (or record) lives only in memory (storage failed)
_BAD_BYTES = (proto.BAD_SIGNATURE, proto.BAD_ENVELOPE)  # these bytes never verify: drop copies


def gate_limits(cfg: CommandsConfig) -> C.GateLimits:
    return C.GateLimits(max_skew_ms=cfg.max_skew_ms, max_lifetime_ms=cfg.max_lifetime_ms,
                        max_message_bytes=cfg.max_message_bytes)


def admission_limits(cfg: CommandsConfig) -> R.AdmissionLimits:
    return R.AdmissionLimits(
        reject_rate_per_s=cfg.reject_rate_per_s, reject_burst=cfg.reject_burst,
        garbage_rate_per_s=cfg.garbage_rate_per_s, garbage_burst=cfg.garbage_burst,
        verify_rate_per_s=cfg.verify_rate_per_s, verify_burst=cfg.verify_burst,
        verify_sample=cfg.verify_sample, redelivery_interval_ms=cfg.redelivery_interval_ms)


class CommandService:
    """The commands topic: the MQTT thread's screen, then on the core thread the gate, the
    replay store, dispatch to the handler of each command's family, and every status signed,
    stored and published."""

    def __init__(self, cfg: CommandsConfig, vin: str, storage_dir: Path, publisher: Publisher,
                 handlers: Sequence[Handler], rng=random.random):
        self.cfg = cfg
        self.vin = vin
        self.publisher = publisher
        self.handlers: tuple[Handler, ...] = tuple(handlers)
        self.registry = Registry(h.family for h in self.handlers)
        self._by_family = {h.family.name: h for h in self.handlers}
        self._trust = self._by_family.get("trust")  # the trust store as a TUF target
        store = (self._trust.initial_store() if self._trust is not None
                 else load_trust_store(cfg.trust_store, self.registry.names))
        self.gate = C.CommandGate(store, vin, gate_limits(cfg), self.registry,
                                  clock=getattr(publisher, "clock", None))
        if self._trust is not None:
            self._trust.bind_gate(self.gate)
        self.replay = ReplayStore(storage_dir, on_loss=self.gate.note_replay_loss)
        self.gate.note_replay_loss(self.replay.lost_at_ms)
        self.admission = R.Admission(admission_limits(cfg), rng)
        self._lock = threading.Lock()  # the admission is shared by the MQTT and core threads
        self.counters: Counter = Counter()  # core thread
        self.screen_counters: Counter = Counter()  # MQTT thread
        self.last_activity_ms = 0
        self._final: dict | None = None
        self._memory_digest = R.Lru(MEMORY_IDS)  # id -> digest, when replay.db could not record
        self._memory_latest = R.Lru(MEMORY_IDS)  # id -> signed status the stores could not keep
        self._recorded_here = R.Lru(MEMORY_IDS)  # ids recorded by this run of the agent
        for h in self.handlers:
            if hasattr(h, "commit"):  # it commits each status before acting on the next output
                h.commit = self._commit

    def handler(self, family: str) -> Handler:
        return self._by_family[family]

    @property
    def busy(self) -> bool:
        """A handler wants polling every few ms (actions waiting for confirmation)."""
        return any(getattr(h, "busy", False) for h in self.handlers)

    # -- the MQTT thread ------------------------------------------------------------------

    def screen(self, message: bytes, now_ms: int) -> CommandMessage | None:
        """The cheap part, on the MQTT thread: what to hand to the core thread, or None
        (dropped and counted). Never raises for any input."""
        c = self.screen_counters
        c["received"] += 1
        pre = self.gate.precheck(message)
        refused = isinstance(pre, C.Rejected)
        with self._lock:
            if refused:
                verdict = self.admission.screen(None, None, now_ms)
            else:
                verdict = self.admission.screen(pre.kid, pre.fingerprint, now_ms)
        if refused:
            c["rejected"] += 1
            c[f"rejected.{pre.reason}"] += 1
            if verdict == R.ANSWER:
                return CommandMessage(b"", refused=pre)
            c[verdict] += 1
            return None
        if verdict == R.VERIFY or verdict == R.REDELIVER:
            return CommandMessage(bytes(message), pre.fingerprint, known=verdict == R.REDELIVER)
        c[verdict] += 1
        return None

    # -- the core thread ------------------------------------------------------------------

    def receive(self, message: bytes, now_ms: int) -> None:
        """screen() and handle() in one go (a caller without an MQTT thread: tests, tools)."""
        item = self.screen(message, now_ms)
        if item is not None:
            self.handle(item, now_ms)

    def handle(self, item: CommandMessage, now_ms: int) -> None:
        """One screened message from the commands topic (core thread)."""
        self.last_activity_ms = now_ms
        if item.refused is not None:  # refused by the precheck; the reject budget paid for it
            r = item.refused
            log.info("command rejected: %s %s", r.reason, r.detail)
            self._status(Status(None, proto.REJECTED, r.reason, r.detail), now_ms, remember=False)
            return
        self.counters["verified"] += 1
        outcome = self.gate.check(item.payload, now_ms, self._seen, mono_ms())
        fp = item.fingerprint
        with self._lock:
            if isinstance(outcome, C.Rejected) and outcome.reason in _BAD_BYTES:
                if fp is not None:
                    self.admission.forged(fp)
            elif isinstance(outcome, C.Rejected) and outcome.reason == proto.INTERNAL_ERROR:
                pass  # the replay store failed: the same bytes may pass later
            else:
                cid = outcome.command.id if isinstance(outcome, C.Accepted) else outcome.id
                if isinstance(outcome, C.Redelivery) and not item.known \
                        and not self.admission.redelivery_due(cid, now_ms):
                    self.counters["redelivery_dropped"] += 1
                    return
                if fp is not None:
                    self.admission.verified(fp, cid if cid is not None else fp, now_ms)
        if isinstance(outcome, C.Accepted):
            self._accepted(outcome.command, now_ms)
        elif isinstance(outcome, C.Redelivery):
            self._redelivered(outcome.id, now_ms)
        else:
            self._rejected(outcome, now_ms)

    def _seen(self, command_id: str) -> bytes | None:
        digest = self.replay.seen(command_id)
        return digest if digest is not None else self._memory_digest.get(command_id)

    def _latest(self, command_id: str) -> bytes | None:
        latest = self._memory_latest.get(command_id)
        if latest is not None:
            return latest
        return self.replay.latest_status(command_id)

    def tick(self, now_ms: int) -> None:
        """Every core-loop pass: forget expired ids on time (not only when a command is
        recorded), and hand statuses kept in memory on."""
        self.replay.maybe_purge(now_ms)
        if self.publisher.volatile_pending():
            self.publisher.flush_volatile(now_ms)

    def _accepted(self, cmd: C.Command, now_ms: int) -> None:
        try:
            added = self.replay.record(cmd.id, cmd.digest, cmd.exp, now_ms)
        except AgentError as e:
            # Not durably recorded: never executed. Remembered in memory, so a re-delivery
            # gets this same answer while the agent runs.
            self.counters["record_failed"] += 1
            log.error("command %s not recorded, refused: %s", cmd.id, e)
            self._memory_digest.set(cmd.id, cmd.digest)
            self._status(Status(cmd.id, proto.REJECTED, proto.INTERNAL_ERROR,
                                f"cannot record the command, not executed: {e}"[:200]), now_ms)
            return
        if not added:
            self._redelivered(cmd.id, now_ms)  # recorded meanwhile: same id, same payload
            return
        self._recorded_here.set(cmd.id, True)
        self.counters["accepted"] += 1
        log.info("command %s %s from %s", cmd.id, cmd.name, cmd.key_name)
        handler = self._by_family[self.registry.family_of(cmd.name).name]
        try:
            statuses = handler.handle(cmd, now_ms)
        except AgentError as e:  # its own storage or device failed before it could answer
            self.counters["handler_failed"] += 1
            log.error("command %s failed in its handler: %s", cmd.id, e)
            statuses = [Status(cmd.id, proto.FAILED, proto.INTERNAL_ERROR,
                               f"could not be carried out: {e}"[:200])]
        self._emit(handler, statuses, now_ms)

    def _rejected(self, r: C.Rejected, now_ms: int) -> None:
        self.counters["rejected"] += 1
        self.counters[f"rejected.{r.reason}"] += 1
        with self._lock:
            answer = self.admission.answer_rejection(r.id is not None, now_ms)
        if not answer:
            self.counters["flood_dropped"] += 1
            return
        log.info("command %s rejected: %s %s", r.id, r.reason, r.detail)
        if r.id is not None and r.digest is not None:
            try:
                self.replay.record(r.id, r.digest, r.exp, now_ms)  # answered the same way again
            except AgentError as e:
                log.error("rejected command %s not recorded: %s", r.id, e)
                self._memory_digest.set(r.id, r.digest)
        self._status(Status(r.id, proto.REJECTED, r.reason, r.detail), now_ms,
                     remember=r.digest is not None)

    def _redelivered(self, command_id: str, now_ms: int) -> None:
        self.counters["redelivered"] += 1
        latest = self._latest(command_id)
        if latest is not None:
            if _is_terminal(latest) or self._running(command_id):
                try:
                    self.publisher.response_signed(latest)
                except AgentError:
                    self.publisher.keep_signed(latest)
                return
        if command_id in self._recorded_here:
            # Recorded by this run, but no status could be kept: it never ran (a failed ACCEPTED
            # aborts before the bus) or its status was lost with the storage.
            detail = "its status could not be stored; see the vehicle's log"
        else:  # recorded, not finished, no longer running: the agent restarted mid-way
            detail = "interrupted by an agent restart; not executed again"
        self._status(Status(command_id, proto.FAILED, proto.INTERNAL_ERROR, detail), now_ms)

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
            self._commit(s, now_ms, durable=False)
        reported = getattr(handler, "reported", None)
        if reported is not None:
            reported(statuses)

    def _commit(self, s: Status, now_ms: int, durable: bool | None = None) -> None:
        """Sign, store and publish one status. With `durable` (default: for ACCEPTED) a
        storage failure raises StorageError instead of answering from memory: the caller
        must then not act on the command (families.py ActionsHandler aborts it)."""
        if s.id is not None and _is_terminal(self._latest(s.id)):
            return
        self._status(s, now_ms, durable=s.status == proto.ACCEPTED if durable is None else durable)

    def _status(self, s: Status, now_ms: int, remember: bool = True, durable: bool = False) -> None:
        payload = proto.response_payload(self.vin, s.id, now_ms, s.status, s.reason, s.detail,
                                         progress=s.progress, result=s.result)
        try:
            signed = self.publisher.response(payload)
        except AgentError as e:
            self.counters["status_not_stored"] += 1
            if durable:
                raise StorageError(f"status {s.status} of command {s.id} not stored: {e}") from e
            log.error("status %s of command %s not stored, answered from memory: %s",
                      s.status, s.id, e)
            signed = self.publisher.response_volatile(payload)
            if s.id is not None and remember:
                self._memory_latest.set(s.id, signed)
                try:  # replay.db may still take it: then a restart does not contradict it
                    self.replay.set_status(s.id, signed)
                except AgentError:
                    pass
        else:
            if s.id is not None and remember:
                try:
                    self.replay.set_status(s.id, signed)
                except AgentError as e:  # published and in the outbox; kept here for re-sends
                    log.error("latest status of command %s kept in memory only: %s", s.id, e)
                    self._memory_latest.set(s.id, signed)
                else:
                    if s.id in self._memory_latest:
                        self._memory_latest.set(s.id, None)  # the store has the latest again
        if s.status in proto.TERMINAL_STATUSES:
            self.counters[f"terminal.{s.status}"] += 1

    # -- control --------------------------------------------------------------------------

    def reload_trust(self) -> None:
        """SIGHUP: re-read the trust store; a broken file keeps the old one."""
        try:
            store = (self._trust.reload() if self._trust is not None
                     else load_trust_store(self.cfg.trust_store, self.registry.names))
        except AgentError as e:
            log.error("trust store not reloaded, keeping the previous one: %s", e)
            return
        self.gate.replace_trust(store)
        log.info("trust store reloaded: %d key(s)", len(store))

    def status(self) -> dict:
        if self._final is not None:
            return self._final
        counters = Counter(self.counters)
        counters.update(self.screen_counters)
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
        for h in self.handlers:  # handlers with threads or connections of their own
            getattr(h, "close", lambda: None)()
        self.replay.close()


def _is_terminal(stored: bytes | None) -> bool:
    """Is this stored (signed) status of a command a terminal one?"""
    return stored is not None and \
        decode_unverified(stored)[2].get("status") in proto.TERMINAL_STATUSES
