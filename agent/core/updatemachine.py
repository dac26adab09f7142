"""The live update machine (PROTOCOL.md §6), h11 style. Sans-I/O.

`Machine` is the persisted record (`updates.UpdateState`) plus what only lives while the
process runs; `on_command`, `on_event`, `poll`, `on_reported` and `start` take it and return
the new one with a list of actions (`updates`' typed Save, Report, StartDownload, ...), which
app/updateservice.py runs in order, feeding what happened back as events. What each decides
is in the docstring of core/updates.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from agent.errors import UpdateError

from .conditions import check_all
from .protocol import (ACCEPTED, FAILED, IN_PROGRESS, INSTALL_FAILED, INTERNAL_ERROR,
                       PRECONDITION_FAILED, REJECTED, SUCCEEDED, VERIFICATION_FAILED, is_newer)
from .updates import (ABORT, ACTIVATE, ACTIVATING, COMMITTED, CONFIRMING, DOWNLOADED,
                      DOWNLOADING, FINAL_STATES, STAGED, SWITCHED, VERIFIED, VERIFYING, Abort,
                      Activate, Command, Confirm, Discard, DownloadProgress, Downloaded,
                      Failed, Hashed, Install, Installed, MarkGood, MarkedGood, Report,
                      RequestRestart, ResumeStage, RollBackSlot, Save, SaveFailed, SlotFailed,
                      Stage, StartDownload, Switch, Switched, UndoSwitch, UpdateEvent,
                      UpdateState, Verify, cancel, check_activate, check_repository, commit,
                      fail, installed_version, on_restart, roll_back, stage, staged_result,
                      transition, typed)


# -- the live machine -----------------------------------------------------------------------

@typed
class Policy:
    """The [updates] settings the decisions use (the core's own parameter type)."""

    hardware_id: str
    installed_version: str
    allowed_repositories: tuple
    preconditions: tuple = ()  # parsed core.conditions.Condition
    stale_ms: int = 2000
    health_timeout_s: float = 60.0
    max_boot_attempts: int = 3
    max_resume_age_ms: int = 6 * 3600 * 1000


@typed
class Machine:
    """The record plus what only lives while the process runs."""

    record: UpdateState
    policy: Policy
    gen: int = 0  # the job generation; events of another one are stale
    progress_step: int = -1  # the last 10 % step reported
    confirm_deadline_ms: int | None = None  # confirming: roll back when unhealthy by then
    marked_good: bool = False  # mark_good went through, COMMITTED not saved yet

    def running(self, command_id: str) -> bool:
        """Is this command's update still in progress here (not in a final state)?"""
        return self.record.command_id == command_id and self.record.state not in FINAL_STATES


PROGRESS_STEP = 10  # IN_PROGRESS statuses at every 10 % of the download
Step = tuple[Machine, list]


def floor(current: UpdateState | None, configured: str, slots: Mapping | None) -> str:
    """The anti-rollback floor: the newest of the configured version, the last committed one
    and the confirmed active slot's (which survives a lost update record). `slots` is
    SlotBackend.report(), None when it could not be read."""
    version = installed_version(current, configured)
    try:
        if slots and not slots.get("pending"):
            meta = (slots.get("slots") or {}).get(slots["active"]) or {}
            if is_newer(meta.get("version"), version):
                version = meta["version"]
    except (UpdateError, KeyError, TypeError, AttributeError):
        pass  # no readable slot metadata: the record and the config decide
    return version


def _safe(m: Machine, lookup: Callable, now_ms: int) -> tuple[bool, str]:
    """updates.preconditions on live signals (stale or never seen: not safe)."""
    return check_all(m.policy.preconditions, lookup, now_ms, m.policy.stale_ms, {})


def _reject(cid: str, e: UpdateError) -> list:
    return [Report(command_id=cid, status=REJECTED, reason=e.reason, detail=e.detail)]


def on_command(m: Machine, cmd: Command, now_ms: int, *, lookup: Callable,
               slots: Mapping | None) -> Step:
    """An accepted update.* command. `lookup` gives live signals (preconditions), `slots` the
    slot backend's report (the floor). A command this vehicle refuses ends REJECTED."""
    s = m.record
    cid = cmd.command_id
    try:
        if isinstance(cmd, Stage):
            check_repository(cmd.repository, m.policy.allowed_repositories)
            new, reports = stage(s, cid, cmd.target, now_ms, cmd.repository)
            actions: list = [Save(state=new), *reports]
            if s.state in (DOWNLOADING, VERIFYING, STAGED):
                actions += [Abort(), Discard(what="inactive")]
            gen = m.gen + 1
            actions += [Report(command_id=cid, status=ACCEPTED),
                        StartDownload(gen=gen, state=new, hardware_id=m.policy.hardware_id,
                                      floor=floor(new, m.policy.installed_version, slots))]
            return replace(m, record=new, gen=gen, progress_step=-1), actions
        if isinstance(cmd, Activate):
            check_activate(s, cmd.target)
            ok, why = _safe(m, lookup, now_ms)
            if not ok:
                raise UpdateError(PRECONDITION_FAILED, why)
            new = transition(s, ACTIVATE, command_id=cid, started_ms=now_ms, detail=None,
                             reason=None, final_status=None, reported=False)
            gen = m.gen + 1
            return replace(m, record=new, gen=gen), [
                Save(state=new), Verify(gen=gen, slot=new.slot or ""),
                Report(command_id=cid, status=ACCEPTED),
                Report(command_id=cid, status=IN_PROGRESS,
                       detail="checking the staged artifact again")]
        new, reports = cancel(s, cid)
        return replace(m, record=new, gen=m.gen + 1), [
            Save(state=new), Abort(), Discard(what="inactive"),
            Report(command_id=cid, status=ACCEPTED), *reports]
    except UpdateError as e:
        return m, _reject(cid, e)


def _commit(m: Machine) -> Step:
    new = commit(m.record)
    return replace(m, record=new, confirm_deadline_ms=None, marked_good=False), [
        Save(state=new),
        Report(command_id=new.command_id, status=SUCCEEDED,
               result={"target": new.target, "version": new.version})]


def _roll_back(m: Machine, detail: str, first: list) -> Step:
    new = roll_back(m.record, detail)
    return replace(m, record=new, confirm_deadline_ms=None, marked_good=False), [
        *first, RequestRestart(), Save(state=new, keep_going=True),
        Report(command_id=new.command_id, status=FAILED, reason=INSTALL_FAILED, detail=detail)]


def on_event(m: Machine, ev: UpdateEvent, now_ms: int, *, lookup: Callable = lambda n: None
             ) -> Step:
    """A worker result or an action's outcome; stale generations and events that do not fit
    the state (a late progress, a job that finished after a cancel) change nothing."""
    if ev.gen != m.gen:
        return m, []
    s, e = m.record, ev.event
    cid = s.command_id
    if isinstance(e, DownloadProgress) and s.state == DOWNLOADING and cid:
        step = e.pct // PROGRESS_STEP
        if step == m.progress_step:
            return m, []
        return replace(m, progress_step=step), [
            Report(command_id=cid, status=IN_PROGRESS, detail="downloading", progress=e.pct)]
    if isinstance(e, Downloaded) and s.state in (DOWNLOADING, VERIFYING):
        # VERIFYING: a stage resumed after a restart; its IN_PROGRESS went out before.
        new = (transition(s, DOWNLOADED) if s.state == DOWNLOADING else s)
        new = replace(new, version=e.version, sha256=e.sha256)
        install = Install(gen=m.gen, path=e.path,
                          meta={"target": e.name, "version": e.version, "sha256": e.sha256})
        if s.state == VERIFYING:
            return replace(m, record=new), [Save(state=new), install]
        return replace(m, record=new), [
            Save(state=new),
            Report(command_id=cid, status=IN_PROGRESS,
                   detail="verified; installing into the inactive slot", progress=100),
            install]
    if isinstance(e, Installed) and s.state == VERIFYING:
        new = transition(s, VERIFIED, slot=e.slot, final_status=SUCCEEDED, reported=False)
        return replace(m, record=new), [
            Save(state=new), Report(command_id=cid, status=SUCCEEDED, result=staged_result(new))]
    if isinstance(e, Hashed) and s.state == ACTIVATING:
        if e.sha256 != s.sha256:
            return _failed(m, Failed(reason=VERIFICATION_FAILED,
                                     detail=f"staged artifact in slot {s.slot} changed since "
                                            "it was verified (sha256 mismatch); not activated"))
        # Checked again now: hashing a large artifact takes time, and the vehicle may have
        # been driven off meanwhile.
        ok, why = _safe(m, lookup, now_ms)
        if not ok:
            detail = f"{why}; not activated, the update stays staged"
            new = transition(s, ABORT, final_status=FAILED, reported=False,
                             reason=PRECONDITION_FAILED, detail=detail)
            return replace(m, record=new), [
                Save(state=new),
                Report(command_id=cid, status=FAILED, reason=PRECONDITION_FAILED, detail=detail)]
        return m, [Switch(gen=m.gen, slot=s.slot or "")]
    if isinstance(e, Switched) and s.state == ACTIVATING:
        new = transition(s, SWITCHED)
        return replace(m, record=new), [
            Save(state=new), RequestRestart(),
            Report(command_id=cid, status=IN_PROGRESS,
                   detail=f"slot {s.slot} active; restarting to confirm it")]
    if isinstance(e, Failed) and s.state in (DOWNLOADING, VERIFYING, ACTIVATING):
        return _failed(m, e)
    if isinstance(e, SaveFailed):
        return _save_failed(m, e)
    if isinstance(e, MarkedGood) and s.state == CONFIRMING:
        return _commit(replace(m, marked_good=True))
    if isinstance(e, SlotFailed) and s.state == CONFIRMING:
        # The slot backend failed while confirming: the old slot is the safe one.
        return _roll_back(m, f"confirming failed: {e.detail}"[:200], [UndoSwitch(slot=s.slot)])
    return m, []


def _failed(m: Machine, e: Failed) -> Step:
    # A target this vehicle refuses (hardware, version) is a rejection of the command, not
    # a failure to carry it out.
    new, reports = fail(m.record, e.reason, e.detail, REJECTED if e.refused else FAILED)
    return replace(m, record=new), [Save(state=new), *reports]


def _save_failed(m: Machine, e: SaveFailed) -> Step:
    """`m` is the machine before the step whose Save failed (the record still on disk)."""
    s, attempted = m.record, e.state
    if attempted == replace(s, reported=True):
        return m, []  # sent again after a restart at worst
    if s.state == CONFIRMING and attempted.state == COMMITTED:
        # Marked good: the new slot stays. The save is retried at the next poll, and a
        # restart reads "confirming, marker gone" as committed.
        return replace(m, marked_good=True), []
    actions: list = []
    if s.state == ACTIVATING and attempted.state == CONFIRMING:
        actions.append(UndoSwitch(slot=s.slot))  # never run a slot the record does not know
    if attempted.command_id:
        actions.append(Report(command_id=attempted.command_id, status=FAILED,
                              reason=INTERNAL_ERROR, detail=e.detail[:200]))
    return m, actions


def poll(m: Machine, now_ms: int, health: Callable[[], tuple[bool, str]]) -> Step:
    """While confirming: commit when healthy (MarkGood first), roll back when the time is
    up (updates.health_timeout_s). `health` is asked only while confirming."""
    if m.confirm_deadline_ms is None or m.record.state != CONFIRMING:
        return m, []
    if m.marked_good:
        return _commit(m)  # retrying a save that failed
    ok, why = health()
    if ok:
        return m, [MarkGood()]
    if now_ms < m.confirm_deadline_ms:
        return m, []
    return _roll_back(m, f"health check failed after {m.policy.health_timeout_s:g} s: {why}; "
                         "rolled back", [RollBackSlot()])


def on_reported(m: Machine, sent: Iterable[tuple[str, str]]) -> Step:
    """(command id, status) pairs now in the outbox: once the record's terminal status is
    among them, a restart need not send it again."""
    s = m.record
    if s.reported or s.final_status is None:
        return m, []
    if (s.command_id, s.final_status) in set(sent):
        new = replace(s, reported=True)
        return replace(m, record=new), [Save(state=new)]
    return m, []


def start(found: UpdateState, slots: Mapping, now_ms: int, policy: Policy) -> Step:
    """The machine at start and what to do first: on_restart's answer, made executable.

    `slots` is the report after the boot of a pending activation was counted. Saves and
    roll-backs keep going when they fail (the next start decides again from the slots); a
    roll-back that moves the active slot asks for a restart into the previous slot's code."""
    m = Machine(record=found, policy=policy)
    pending = slots.get("pending") or None
    out: list = []
    for a in on_restart(found, slots, now_ms, policy.max_resume_age_ms,
                        policy.max_boot_attempts):
        if isinstance(a, Save):
            m = replace(m, record=a.state)
            out.append(replace(a, keep_going=True))
        elif isinstance(a, ResumeStage):
            m = replace(m, gen=m.gen + 1, progress_step=-1)
            out.append(StartDownload(gen=m.gen, state=a.state, hardware_id=policy.hardware_id,
                                     floor=floor(a.state, policy.installed_version, slots)))
        elif isinstance(a, Confirm):
            m = replace(m, confirm_deadline_ms=now_ms + int(policy.health_timeout_s * 1000))
            out.append(a)
        elif isinstance(a, RollBackSlot):
            moves = bool(pending) and slots.get("active") != pending.get("previous")
            out.append(RollBackSlot(keep_going=True, restart=moves))
        else:
            out.append(a)
    return m, out
