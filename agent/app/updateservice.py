"""update.stage / update.activate / update.cancel on the runtime (PROTOCOL.md §6): the executor.

Every decision is in core/updates.py and core/updatemachine.py: the state machine and its
live transitions (`on_command`, `on_event`, `poll`), the restart rule (`on_restart`, `start`), the anti-rollback
floor (`floor`, also from the active slot's metadata), the target checks, the preconditions
checked again after hashing, the health timeout and max boot attempts, when to restart, and
what a failed save or slot operation means. This module runs the actions the core returns, in
order, by the rules written at the top of the core's "typed commands, events and actions":

- The core thread calls `handle`, `on_event`, `poll`, `start` and `mark_reported`; they
  return statuses to sign and publish. `Save` writes the record (write, fsync, rename) and
  comes first in every list, so a state change is durable BEFORE its status is emitted and
  before the slot is touched.
- One worker thread runs the slow jobs in order: TUF download and verification
  (adapters/tuf.py), installing into the inactive slot, discarding a slot, hashing the staged
  artifact and switching slots. A cancel never races an install: the discard job simply runs
  after the stage job stopped. Jobs report back through `post` (the core thread's queue) as
  `UpdateEvent(gen, event)`; the core ignores another generation's.
- mark_good and roll_back while confirming run on the core thread; their outcome goes back to
  the core at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from ..adapters.slots import DirectorySlots, SlotBackend
from ..adapters.updatestate import UpdateStateStore
from ..config import Config
from ..core import updates as U
from ..core import updatemachine as UM
from ..core.updates import UpdateEvent
from ..core.protocol import INSTALL_FAILED, INTERNAL_ERROR, REJECTED
from ..core.conditions import Lookup, parse_condition
from ..core.executor import Status
from ..errors import AgentError, StorageError

log = logging.getLogger("agent.updates")

_WORKER_JOBS = (U.StartDownload, U.Install, U.Verify, U.Switch, U.Discard)


class UpdateService:
    def __init__(self, config: Config, lookup: Lookup, post: Callable[[UpdateEvent], None],
                 slots: SlotBackend | None = None, clock=None):
        """`clock`: the trusted clock (core/clock.py, the gate's); TUF expiry is then checked
        against a time never earlier than its floor."""
        cfg = config.updates
        assert cfg is not None
        self.cfg = cfg
        self.lookup = lookup
        self.post = post
        self.clock = clock
        base = config.storage.dir / "update"
        self.store = UpdateStateStore(base)
        self.downloads = base / "downloads"
        self.tuf_cache = base / "tuf"
        self.slots = slots or DirectorySlots(config.slots_dir)
        self.policy = UM.Policy(
            hardware_id=cfg.hardware_id, installed_version=cfg.installed_version,
            allowed_repositories=tuple(cfg.allowed_repositories),
            preconditions=tuple(parse_condition(text, f"updates.preconditions.{i}")
                                for i, text in enumerate(cfg.preconditions)),
            stale_ms=cfg.stale_ms, health_timeout_s=cfg.health_timeout_s,
            max_boot_attempts=cfg.max_boot_attempts,
            max_resume_age_ms=int(cfg.max_resume_age_s * 1000))
        self.machine = UM.Machine(record=self._load(), policy=self.policy)
        self.restart_requested = False
        self._cancel = threading.Event()
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
    def state(self) -> U.UpdateState:
        return self.machine.record

    @property
    def installed_version(self) -> str:
        return UM.floor(self.state, self.cfg.installed_version, self._slots_report())

    def running(self, command_id: str) -> bool:
        return self.machine.running(command_id)

    def status(self) -> dict:
        s = self.state
        return {"state": s.state, "command_id": s.command_id, "target": s.target,
                "version": s.version, "installed_version": self.installed_version,
                "reason": s.reason, "detail": s.detail}

    # -- the core thread's entry points ---------------------------------------------------

    def handle(self, command_id: str, name: str, params: dict, now_ms: int) -> list[Status]:
        cmd = U.parse_command(name, command_id, params)
        if cmd is None:
            return [Status(command_id, REJECTED, "UNKNOWN_COMMAND", f"no update command {name}")]
        return self._run(UM.on_command(self.machine, cmd, now_ms, lookup=self.lookup,
                                      slots=self._slots_report()), now_ms)

    def on_event(self, ev: UpdateEvent, now_ms: int) -> list[Status]:
        return self._run(UM.on_event(self.machine, ev, now_ms, lookup=self.lookup), now_ms)

    def poll(self, now_ms: int, health: Callable[[], tuple[bool, str]]) -> list[Status]:
        return self._run(UM.poll(self.machine, now_ms, health), now_ms)

    def mark_reported(self, statuses: list[Status]) -> None:
        """The statuses are in the outbox (core: on_reported)."""
        self._run(UM.on_reported(self.machine, [(x.id, x.status) for x in statuses]), 0)

    def start(self, now_ms: int) -> list[Status]:
        """The record found on disk, carried out (core: start / on_restart). The boot of a
        pending activation is counted first: the core's max_boot_attempts reads it."""
        try:
            if self.slots.report().get("pending"):
                self.slots.note_boot()
            step = UM.start(self.state, self.slots.report(), now_ms, self.policy)
        except AgentError as e:
            log.error("update state at start: %s", e)
            return []
        return self._run(step, now_ms)

    def close(self) -> None:
        self._cancel.set()
        self._jobs.put(None)
        self._worker.join(5)

    # -- running actions ------------------------------------------------------------------

    def _run(self, step: UM.Step, now_ms: int, out: list[Status] | None = None) -> list[Status]:
        out = [] if out is None else out
        before, (machine, actions) = self.machine, step
        self.machine = machine
        for action in actions:
            try:
                feedback = self._do(action, out)
            except AgentError as e:
                log.error("update %s failed: %s", type(action).__name__, e)
                if getattr(action, "keep_going", False):
                    continue
                self.machine = before  # the rest is dropped; the core decides what it means
                failed = (U.SaveFailed(state=action.state, detail=str(e))
                          if isinstance(action, U.Save) else U.SlotFailed(detail=str(e)))
                ev = UpdateEvent(gen=before.gen, event=failed)
                return self._run(UM.on_event(before, ev, now_ms, lookup=self.lookup), now_ms, out)
            if feedback is not None:
                ev = UpdateEvent(gen=self.machine.gen, event=feedback)
                self._run(UM.on_event(self.machine, ev, now_ms, lookup=self.lookup), now_ms, out)
        return out

    def _do(self, a, out: list[Status]) -> U.Event | None:
        if isinstance(a, U.Save):
            self.store.save(a.state)
            log.info("update %s: %s (command %s)", a.state.target, a.state.state,
                     a.state.command_id)
            _test_crash_point(a.state.state)
        elif isinstance(a, U.Report):
            out.append(Status(a.command_id, a.status, a.reason, a.detail,
                              dict(a.result) if a.result is not None else None, a.progress))
            if a.status in (U.FAILED, REJECTED) and a.reason != INTERNAL_ERROR:
                log.warning("update command %s: %s %s %s", a.command_id, a.status, a.reason,
                            a.detail)
        elif isinstance(a, U.StartDownload):
            self._cancel = threading.Event()
            self._jobs.put((a, self._cancel))
        elif isinstance(a, _WORKER_JOBS):
            self._jobs.put((a, self._cancel))
        elif isinstance(a, U.Abort):
            self._cancel.set()
        elif isinstance(a, U.Confirm):
            log.info("update %s %s: confirming (health check, up to %.0f s)", a.state.target,
                     a.state.version, self.cfg.health_timeout_s)
        elif isinstance(a, U.MarkGood):
            self.slots.mark_good()
            return U.MarkedGood()
        elif isinstance(a, U.RollBackSlot):
            self.slots.roll_back()
            if a.restart:
                self.restart_requested = True
        elif isinstance(a, U.UndoSwitch):
            self._undo_switch(a.slot)
        elif isinstance(a, U.RequestRestart):
            log.info("update %s %s: restart requested", self.state.target, self.state.version)
            self.restart_requested = True
        else:
            raise TypeError(f"not an update action: {a!r}")
        return None

    def _slots_report(self) -> dict | None:
        try:
            return self.slots.report()
        except AgentError as e:
            log.warning("slot report: %s", e)
            return None

    def _undo_switch(self, slot: str | None) -> None:
        """Drop a trial switch to `slot` (marker and pointer); errors are logged, not raised."""
        try:
            if (self.slots.report().get("pending") or {}).get("slot") == slot:
                self.slots.roll_back()
        except AgentError as e:
            log.error("cannot undo the slot switch: %s", e)

    # -- the worker thread ----------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            action, cancel = job
            try:
                ev = self._job(action, cancel)
            except U.UpdateError as e:
                log.warning("update job %s: %s %s", type(action).__name__, e.reason, e.detail)
                ev = U.Failed(reason=e.reason, detail=e.detail,
                              refused=isinstance(e, U.TargetRefused))
            except Exception as e:  # a bug must not kill the worker; the command still ends
                log.exception("update job %s failed", type(action).__name__)
                ev = U.Failed(reason=INTERNAL_ERROR, detail=f"{type(e).__name__}: {e}"[:200])
            if ev is not None and not isinstance(action, U.Discard):
                self.post(UpdateEvent(gen=action.gen, event=ev))

    def _job(self, a, cancel: threading.Event) -> U.Event | None:
        if isinstance(a, U.StartDownload):
            return self._download(a, cancel)
        if isinstance(a, U.Install):
            if cancel.is_set():
                return None
            slot = self.slots.install_inactive(Path(a.path), dict(a.meta))
            Path(a.path).unlink(missing_ok=True)  # the slot holds it now; spare the disk
            return None if cancel.is_set() else U.Installed(slot=slot)
        if isinstance(a, U.Verify):
            return U.Hashed(sha256=self._hash(a.slot))
        if isinstance(a, U.Switch):
            try:
                self.slots.switch_active(a.slot)
            except U.UpdateError:
                self._undo_switch(a.slot)  # the marker may be down without the pointer
                raise
            return U.Switched()
        if isinstance(a, U.Discard):
            if a.what == "inactive":
                self.slots.discard_inactive()
            if self.downloads.exists():
                shutil.rmtree(self.downloads, ignore_errors=True)
        return None

    def _download(self, a: U.StartDownload, cancel: threading.Event) -> U.Event | None:
        accepted: dict[str, str] = {}

        def accept(name: str, custom: dict) -> None:
            try:
                accepted["version"] = U.accept_target(name, custom, a.hardware_id, a.floor)
            except U.UpdateError as e:  # this vehicle refuses it: REJECTED, not FAILED
                raise U.TargetRefused(e.reason, e.detail) from e

        # python-tuf and urllib3 (~3 MB) are loaded only when an update is actually fetched.
        from ..adapters.tuf import FetchConfig, fetch_target

        def progress(pct: int) -> None:
            pct = max(0, min(100, int(pct)))
            self.post(UpdateEvent(gen=a.gen, event=U.DownloadProgress(pct=pct)))

        reference = None
        if self.clock is not None:  # a clock behind its floor must not make old metadata valid
            from ..adapters.clockstore import mono_ms, system_ms

            reference = self.clock.now_ms(system_ms(), mono_ms())
        fetched = fetch_target(
            a.state.repository, a.state.target, self.cfg.trusted_root, self.tuf_cache,
            self.downloads, progress=progress,
            config=FetchConfig(free_margin_bytes=self.cfg.min_free_bytes),
            cancelled=cancel.is_set, accept=accept, reference_ms=reference)
        if cancel.is_set():
            return None
        return U.Downloaded(path=str(fetched.path), name=fetched.name, sha256=fetched.sha256,
                            version=accepted["version"])

    def _hash(self, slot: str) -> str:
        digest = hashlib.sha256()
        try:
            with open(self.slots.payload(slot), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError as e:
            raise U.UpdateError(INSTALL_FAILED, f"staged artifact unreadable: {e}") from e
        return digest.hexdigest()


def _test_crash_point(state: str) -> None:
    """TCU_AGENT_TEST_KILL_AT=STATE: SIGKILL this process right after that state was saved.

    For the power-loss tests only (a deterministic kill at each transition); unset in
    production, where it costs one dictionary lookup per state change."""
    if os.environ.get("TCU_AGENT_TEST_KILL_AT") == state:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
