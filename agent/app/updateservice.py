"""update.stage / update.activate / update.cancel on the runtime (PROTOCOL.md §6).

Decisions live in core/updates.py (the state machine, the restart rule, version and target
checks); this module owns the I/O around them:

- The core thread calls `handle`, `on_event`, `poll` and `start`; they return statuses to
  sign and publish. Every state change is saved (write, fsync, rename) BEFORE its status is
  emitted and before the slot is touched.
- One worker thread runs the slow jobs in order: TUF download and verification
  (adapters/tuf.py), installing into the inactive slot, discarding a slot, re-hashing the
  staged artifact and switching slots. Every slot write happens on that thread, so a
  cancel never races an install: the discard job simply runs after the stage job stopped.
  Jobs report back through `post` (the core thread's queue) tagged with a generation number;
  events of a superseded or cancelled job are ignored.
- Activation switches the slot and asks the runtime to restart (`restart_requested`); the
  next start confirms it with a health check (`poll`): every bus open and the broker
  reached within `updates.health_timeout_s` -> mark_good, COMMITTED, SUCCEEDED; otherwise
  roll back, ROLLED_BACK, FAILED/INSTALL_FAILED and restart once more into the previous slot.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import shutil
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..adapters.slots import DirectorySlots, SlotBackend
from ..adapters.updatestate import UpdateStateStore
from ..config import Config
from ..core import updates as U
from ..core.updates import UpdateEvent
from ..core.protocol import (
    ACCEPTED,
    FAILED,
    IN_PROGRESS,
    INSTALL_FAILED,
    INTERNAL_ERROR,
    PRECONDITION_FAILED,
    REJECTED,
    SUCCEEDED,
    VERIFICATION_FAILED,
)
from ..core.conditions import Lookup, check_all, parse_condition
from ..core.executor import Status
from ..errors import AgentError, StorageError

log = logging.getLogger("agent.updates")

PROGRESS_STEP = 10  # IN_PROGRESS statuses at every 10 % of the download


class UpdateService:
    def __init__(self, config: Config, lookup: Lookup, post: Callable[[UpdateEvent], None],
                 slots: SlotBackend | None = None):
        cfg = config.updates
        assert cfg is not None
        self.cfg = cfg
        self.lookup = lookup
        self.post = post
        base = config.storage.dir / "update"
        self.store = UpdateStateStore(base)
        self.downloads = base / "downloads"
        self.tuf_cache = base / "tuf"
        self.slots = slots or DirectorySlots(config.slots_dir)
        self.preconditions = tuple(parse_condition(text, f"updates.preconditions.{i}")
                                   for i, text in enumerate(cfg.preconditions))
        self.state = self._load()
        self.restart_requested = False
        self.confirm_deadline_ms: int | None = None
        self._marked_good = False  # mark_good done, COMMITTED not yet saved
        self._gen = 0
        self._cancel = threading.Event()
        self._last_progress = -1
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._work, name="updates", daemon=True)
        self._worker.start()

    def _load(self) -> U.UpdateState:
        try:
            return self.store.load() or U.UpdateState()
        except StorageError as e:
            # Outside damage: start over rather than refuse every update forever. The slots
            # themselves are untouched and report what is active.
            log.error("%s; starting from IDLE", e)
            broken = self.store.path.with_suffix(".json.broken")
            try:
                os.replace(self.store.path, broken)
            except OSError:
                pass
            return U.UpdateState()

    # -- views ----------------------------------------------------------------------------

    @property
    def installed_version(self) -> str:
        """The anti-rollback floor: the newest of the configured version, the last committed
        one and the confirmed active slot's (which survives a lost update record)."""
        floor = U.installed_version(self.state, self.cfg.installed_version)
        try:
            report = self.slots.report()
            meta = (report.get("slots") or {}).get(report["active"]) or {}
            if not report.get("pending") and U.is_newer(meta.get("version"), floor):
                floor = meta["version"]
        except (AgentError, KeyError, TypeError):
            pass  # no readable slot metadata: the record and the config decide
        return floor

    def running(self, command_id: str) -> bool:
        """Is this command's update still in progress here (not in a final state)?"""
        return (self.state.command_id == command_id
                and self.state.state not in U.FINAL_STATES)

    def status(self) -> dict:
        s = self.state
        return {"state": s.state, "command_id": s.command_id, "target": s.target,
                "version": s.version, "installed_version": self.installed_version,
                "reason": s.reason, "detail": s.detail}

    # -- commands (core thread) -----------------------------------------------------------

    def handle(self, command_id: str, name: str, params: dict, now_ms: int) -> list[Status]:
        try:
            if name == "update.stage":
                return self._stage(command_id, params, now_ms)
            if name == "update.activate":
                return self._activate(command_id, params["target"], now_ms)
            if name == "update.cancel":
                return self._cancel_stage(command_id)
        except U.UpdateError as e:
            return [Status(command_id, REJECTED, e.reason, e.detail)]
        except StorageError as e:
            log.error("%s", e)
            return [Status(command_id, FAILED, INTERNAL_ERROR, str(e)[:200])]
        return [Status(command_id, REJECTED, "UNKNOWN_COMMAND", f"no update command {name}")]

    def _stage(self, cid: str, params: dict, now_ms: int) -> list[Status]:
        U.check_repository(params["repository"], self.cfg.allowed_repositories)
        old = self.state
        new, reports = U.stage(old, cid, params["target"], now_ms, params["repository"])
        self._save(new)
        out = [self._status(r) for r in reports]
        if old.state in (U.DOWNLOADING, U.VERIFYING, U.STAGED):
            self._abort_jobs()
            self._jobs.put(("discard", self._gen))
        out.append(Status(cid, ACCEPTED))
        self._start_stage(new)
        return out

    def _start_stage(self, state: U.UpdateState) -> None:
        self._gen += 1
        self._cancel = threading.Event()
        self._last_progress = -1
        self._jobs.put(("stage", self._gen, state, self._cancel, self.installed_version))

    def _activate(self, cid: str, target: str, now_ms: int) -> list[Status]:
        U.check_activate(self.state, target)
        ok, why = self._safe(now_ms)
        if not ok:
            raise U.UpdateError(PRECONDITION_FAILED, why)
        self._save(U.transition(self.state, U.ACTIVATE, command_id=cid, started_ms=now_ms,
                                detail=None, reason=None, final_status=None, reported=False))
        self._gen += 1
        self._jobs.put(("activate", self._gen, self.state))
        return [Status(cid, ACCEPTED),
                Status(cid, IN_PROGRESS, detail="checking the staged artifact again")]

    def _safe(self, now_ms: int) -> tuple[bool, str]:
        """updates.preconditions on live signals (stale or never seen: not safe)."""
        return check_all(self.preconditions, self.lookup, now_ms, self.cfg.stale_ms, {})

    def _cancel_stage(self, cid: str) -> list[Status]:
        new, reports = U.cancel(self.state, cid)
        self._save(new)
        self._abort_jobs()
        self._jobs.put(("discard", self._gen))
        return [Status(cid, ACCEPTED)] + [self._status(r) for r in reports]

    def _abort_jobs(self) -> None:
        self._cancel.set()
        self._gen += 1  # events of the aborted job are ignored from now on

    # -- worker events (core thread) ------------------------------------------------------

    def on_event(self, ev: UpdateEvent, now_ms: int) -> list[Status]:
        if ev.gen != self._gen:
            return []
        s = self.state
        cid = s.command_id
        try:
            if ev.kind == "progress" and s.state == U.DOWNLOADING:
                percent = int(ev.data)
                step = percent // PROGRESS_STEP
                if step == self._last_progress:
                    return []
                self._last_progress = step
                return [Status(cid, IN_PROGRESS, detail="downloading", progress=percent)]
            if ev.kind == "downloaded" and s.state == U.DOWNLOADING:
                self._save(U.transition(s, U.DOWNLOADED))
                return [Status(cid, IN_PROGRESS, detail="verified; installing into the "
                                                        "inactive slot", progress=100)]
            if ev.kind == "staged" and s.state in (U.DOWNLOADING, U.VERIFYING):
                fetched, slot, version = ev.data
                if s.state == U.DOWNLOADING:
                    s = U.transition(s, U.DOWNLOADED)
                self._save(U.transition(s, U.VERIFIED, version=version, sha256=fetched.sha256,
                                        slot=slot, final_status=SUCCEEDED, reported=False))
                log.info("update %s %s staged in slot %s", s.target, version, slot)
                return [Status(cid, SUCCEEDED, result=U.staged_result(self.state))]
            if ev.kind == "verified" and s.state == U.ACTIVATING:
                # Checked again now: hashing a large artifact takes time, and the vehicle may
                # have been driven off meanwhile.
                ok, why = self._safe(now_ms)
                if not ok:
                    detail = f"{why}; not activated, the update stays staged"
                    self._save(U.transition(s, U.ABORT, final_status=FAILED, reported=False,
                                            reason=PRECONDITION_FAILED, detail=detail))
                    return [Status(cid, FAILED, PRECONDITION_FAILED, detail)]
                self._jobs.put(("switch", self._gen, s))
                return []
            if ev.kind == "switched" and s.state == U.ACTIVATING:
                try:
                    self._save(U.transition(s, U.SWITCHED))
                except StorageError:
                    self._undo_switch(s.slot)  # never run a slot the record does not know about
                    raise
                self.restart_requested = True
                log.info("update %s %s: slot %s active on trial; restarting", s.target,
                         s.version, s.slot)
                return [Status(cid, IN_PROGRESS,
                               detail=f"slot {s.slot} active; restarting to confirm it")]
            if ev.kind == "failed" and s.state in (U.DOWNLOADING, U.VERIFYING, U.ACTIVATING):
                err: U.UpdateError = ev.data
                # A target this vehicle refuses (hardware, version) is a rejection of the
                # command, not a failure to carry it out.
                status = REJECTED if isinstance(err, U.TargetRefused) else FAILED
                new, reports = U.fail(s, err.reason, err.detail, status)
                self._save(new)
                log.warning("update %s failed: %s %s", s.target, err.reason, err.detail)
                return [self._status(r) for r in reports]
        except StorageError as e:
            log.error("%s", e)
            return [Status(cid, FAILED, INTERNAL_ERROR, str(e)[:200])] if cid else []
        return []

    # -- start and confirmation -----------------------------------------------------------

    def start(self, now_ms: int) -> list[Status]:
        """What the record found on disk means now (core/updates.on_restart), carried out."""
        try:
            report = self.slots.report()
            if report.get("pending"):
                self.slots.note_boot()
            active_before = report["active"]
            actions = U.on_restart(self.state, self.slots.report(), now_ms,
                                   int(self.cfg.max_resume_age_s * 1000),
                                   self.cfg.max_boot_attempts)
        except AgentError as e:
            log.error("update state at start: %s", e)
            return []
        out: list[Status] = []
        for action in actions:
            try:
                if isinstance(action, U.Save):
                    self._save(action.state)
                elif isinstance(action, U.Report):
                    out.append(self._status(action))
                elif isinstance(action, U.ResumeStage):
                    log.info("resuming the staging of %s", action.state.target)
                    self._start_stage(action.state)
                elif isinstance(action, U.Discard):
                    self._jobs.put(("discard_downloads", self._gen))
                elif isinstance(action, U.Confirm):
                    self.confirm_deadline_ms = now_ms + int(self.cfg.health_timeout_s * 1000)
                    log.info("update %s %s: confirming (health check, up to %.0f s)",
                             self.state.target, self.state.version, self.cfg.health_timeout_s)
                elif isinstance(action, U.RollBackSlot):
                    self.slots.roll_back()
            except AgentError as e:
                log.error("update start action %s failed: %s", type(action).__name__, e)
        try:
            if self.slots.report()["active"] != active_before:
                self.restart_requested = True  # rolled back: run the previous slot's code
        except AgentError as e:
            log.error("slots after start: %s", e)
        return out

    def poll(self, now_ms: int, health: Callable[[], tuple[bool, str]]) -> list[Status]:
        """While confirming: commit when healthy, roll back when the time is up."""
        if self.confirm_deadline_ms is None or self.state.state != U.CONFIRMING:
            return []
        s = self.state
        if not self._marked_good:
            ok, why = health()
            if not ok and now_ms < self.confirm_deadline_ms:
                return []
            detail = ""
            try:
                if ok:
                    self.slots.mark_good()
                    self._marked_good = True
                else:
                    detail = (f"health check failed after {self.cfg.health_timeout_s:g} s: "
                              f"{why}; rolled back")
                    self.slots.roll_back()
            except AgentError as e:  # the slot backend failed: the old slot is the safe one
                log.error("confirming the update failed: %s", e)
                detail = f"confirming failed: {e}"[:200]
                self._undo_switch(s.slot)
            if not self._marked_good:
                self._rolled_back(s, detail)
                return [Status(s.command_id, FAILED, INSTALL_FAILED, detail)]
        # Marked good: from here on the new slot stays, whatever happens. A failed save is
        # retried at the next poll (and a restart reads "confirming, marker gone" as committed).
        try:
            self._save(U.commit(s))
        except StorageError as e:
            log.error("update %s %s confirmed but not yet recorded: %s", s.target, s.version, e)
            return []
        self.confirm_deadline_ms = None
        self._marked_good = False
        log.info("update %s %s committed", s.target, s.version)
        return [Status(s.command_id, SUCCEEDED, result={"target": s.target, "version": s.version})]

    def _rolled_back(self, s: U.UpdateState, detail: str) -> None:
        self.confirm_deadline_ms = None
        self.restart_requested = True  # back into the previous slot's code
        log.error("update %s %s: %s", s.target, s.version, detail)
        try:
            self._save(U.roll_back(s, detail))
        except StorageError as e:  # the restart rule sees "previous slot active": rolled back
            log.error("%s", e)
            self.state = U.roll_back(s, detail)

    def _undo_switch(self, slot: str | None) -> None:
        """Drop a trial switch to `slot` (marker and pointer); errors are logged, not raised."""
        try:
            if (self.slots.report().get("pending") or {}).get("slot") == slot:
                self.slots.roll_back()
        except AgentError as e:
            log.error("cannot undo the slot switch: %s", e)

    def mark_reported(self, statuses: list[Status]) -> None:
        """The statuses are in the outbox: a terminal one of the record's command need not be
        sent again after a restart."""
        s = self.state
        if s.reported or s.final_status is None:
            return
        if any(x.id == s.command_id and x.status == s.final_status for x in statuses):
            try:
                self._save(replace(s, reported=True))
            except StorageError as e:  # sent again after a restart at worst
                log.warning("%s", e)

    def close(self) -> None:
        self._abort_jobs()
        self._jobs.put(None)
        self._worker.join(5)

    # -- helpers --------------------------------------------------------------------------

    def _save(self, state: U.UpdateState) -> None:
        self.store.save(state)
        self.state = state
        _test_crash_point(state.state)

    @staticmethod
    def _status(r: U.Report) -> Status:
        return Status(r.command_id, r.status, r.reason, r.detail,
                      dict(r.result) if r.result is not None else None)

    # -- the worker thread ----------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            kind, gen = job[0], job[1]
            try:
                if kind == "stage":
                    self._do_stage(gen, *job[2:])
                elif kind == "activate":
                    self._do_verify(gen, job[2])
                elif kind == "switch":
                    self._do_switch(gen, job[2])
                elif kind == "discard":
                    self.slots.discard_inactive()
                    self._discard_downloads()
                elif kind == "discard_downloads":
                    self._discard_downloads()
            except U.UpdateError as e:
                log.warning("update job %s: %s %s", kind, e.reason, e.detail)
                self.post(UpdateEvent(gen, "failed", e))
            except Exception as e:  # a bug must not kill the worker; the command still ends
                log.exception("update job %s failed", kind)
                self.post(UpdateEvent(gen, "failed", U.UpdateError(
                    INTERNAL_ERROR, f"{type(e).__name__}: {e}"[:200])))

    def _do_stage(self, gen: int, state: U.UpdateState, cancel: threading.Event,
                  installed: str) -> None:
        accepted: dict[str, str] = {}

        def accept(name: str, custom: dict) -> None:
            try:
                accepted["version"] = U.accept_target(name, custom, self.cfg.hardware_id,
                                                      installed)
            except U.UpdateError as e:  # this vehicle refuses it: REJECTED, not FAILED
                raise U.TargetRefused(e.reason, e.detail) from e

        # python-tuf and urllib3 (~3 MB) are loaded only when an update is actually fetched.
        from ..adapters.tuf import FetchConfig, fetch_target

        fetched = fetch_target(
            state.repository, state.target, self.cfg.trusted_root, self.tuf_cache,
            self.downloads, progress=lambda p: self.post(UpdateEvent(gen, "progress", p)),
            config=FetchConfig(free_margin_bytes=self.cfg.min_free_bytes),
            cancelled=cancel.is_set, accept=accept)
        self.post(UpdateEvent(gen, "downloaded"))
        if cancel.is_set():
            return
        meta = {"target": fetched.name, "version": accepted["version"], "sha256": fetched.sha256}
        slot = self.slots.install_inactive(fetched.path, meta)
        fetched.path.unlink(missing_ok=True)  # the slot holds it now; spare the disk
        if cancel.is_set():  # cancelled while installing: the discard job runs next
            return
        self.post(UpdateEvent(gen, "staged", (fetched, slot, accepted["version"])))

    def _do_verify(self, gen: int, state: U.UpdateState) -> None:
        path = self.slots.payload(state.slot)
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError as e:
            raise U.UpdateError(INSTALL_FAILED, f"staged artifact unreadable: {e}") from e
        if digest.hexdigest() != state.sha256:
            raise U.UpdateError(VERIFICATION_FAILED,
                                f"staged artifact in slot {state.slot} changed since it was "
                                "verified (sha256 mismatch); not activated")
        self.post(UpdateEvent(gen, "verified"))

    def _do_switch(self, gen: int, state: U.UpdateState) -> None:
        try:
            self.slots.switch_active(state.slot)
        except U.UpdateError:
            self._undo_switch(state.slot)  # the marker may be down without the pointer
            raise
        self.post(UpdateEvent(gen, "switched"))

    def _discard_downloads(self) -> None:
        if self.downloads.exists():
            shutil.rmtree(self.downloads, ignore_errors=True)


def _test_crash_point(state: str) -> None:
    """TCU_AGENT_TEST_KILL_AT=STATE: SIGKILL this process right after that state was saved.

    For the power-loss tests only (a deterministic kill at each transition); unset in
    production, where it costs one dictionary lookup per state change."""
    if os.environ.get("TCU_AGENT_TEST_KILL_AT") == state:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
