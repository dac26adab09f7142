"""Software updates (PROTOCOL.md §6 update.stage / update.activate / update.cancel). Sans-I/O.

Every decision about an update lives here; app/updateservice.py runs the actions this module
returns and feeds their results back as events, and the adapters (`adapters/tuf.py`,
`adapters/slots.py`, `adapters/updatestate.py`) only move bytes. Where each decision is:

- `parse_version` / `is_newer` (core/protocol.py): dotted numeric versions, compared
  numerically. `accept_target`: the TUF target's custom fields against this vehicle (called by
  the worker inside the fetch, before the artifact is downloaded, with the hardware id and the
  floor that `StartDownload` carries). `floor`: the anti-rollback floor (configured, last
  committed, or the confirmed active slot's metadata). `check_repository`: allowed prefixes.
- `UpdateState` and `TRANSITIONS`: the persisted record and its state machine, one lookup
  table; an illegal transition raises `IllegalTransition` (h11 style: nothing else changes
  the state).

      IDLE -stage-> DOWNLOADING -downloaded-> VERIFYING -verified-> STAGED -activate-> ACTIVATING
      DOWNLOADING, VERIFYING, STAGED  -stage->  DOWNLOADING   (a new update.stage supersedes)
      DOWNLOADING, VERIFYING          -fail->   FAILED
      DOWNLOADING, VERIFYING, STAGED  -cancel-> IDLE
      ACTIVATING -switched-> CONFIRMING -confirmed-> COMMITTED
      ACTIVATING -fail-> FAILED (active slot unchanged);  CONFIRMING -roll_back-> ROLLED_BACK
  COMMITTED, FAILED and ROLLED_BACK are final for their command; a new stage starts from them
  as from IDLE. `cancel` is allowed up to STAGED and returns to IDLE.

- The live machine (`updatemachine.Machine`: the record, the job generation, the progress step, the
  confirmation deadline, "marked good"): `on_command` (typed Stage / Activate / Cancel:
  repository, BUSY, what is staged, updates.preconditions), `on_event` (typed worker results:
  progress every 10 %, install after the download, the hash and the preconditions checked
  again after hashing, the switch, failures REJECTED when the vehicle refuses the target; and
  the executor's own: a failed save -> FAILED/INTERNAL_ERROR and the switch undone, a commit
  retried), `poll` (health within updates.health_timeout_s -> mark good and COMMITTED, else
  roll back and restart; a confirmed slot is never rolled back over a failed save) and
  `on_reported` (the terminal status reached the outbox: never sent again). Each returns the
  new machine and a list of actions (Save, Report, StartDownload, Install, Verify, Switch,
  Abort, Discard, Confirm, MarkGood, RollBackSlot, UndoSwitch, RequestRestart).
- `on_restart`: given the record found on disk at start and the slot backend's report, what to
  do (resume, clean up, confirm with max_boot_attempts, report which status for which command
  id, the terminal status kept once across restarts); `start` makes that executable.

Choices where the protocol is silent (documented here, to copy into the issue note):
- A new update.stage while DOWNLOADING or VERIFYING supersedes the one in flight: that command
  ends FAILED/SUPERSEDED. While STAGED the staged artifact is discarded (its stage command had
  already SUCCEEDED). While ACTIVATING or CONFIRMING a stage is refused (BUSY).
- "1.2" and "1.2.0" are the same version; a target must be strictly newer than the installed
  version, so re-installing the running version is refused too.
- VERIFYING covers checking the custom fields and installing into the inactive slot; an
  install failure is INSTALL_FAILED, a refused target VERIFICATION_FAILED.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from urllib.parse import urlsplit as _urlsplit

from agent.errors import IllegalTransition, TargetRefused, UpdateError  # noqa: F401 - re-raised here
from agent.errors import ParamError as _ParamError

from .registry import Family as _Family
from .registry import show as _show
from .protocol import (
    BAD_PARAMS,
    BUSY,
    CANCELLED,
    DOWNLOAD_FAILED,
    FAILED,
    IN_PROGRESS,
    INSTALL_FAILED,
    PRECONDITION_FAILED,
    REASONS,
    REJECTED,
    STATUSES,
    SUCCEEDED,
    SUPERSEDED,
    VERIFICATION_FAILED,
    is_newer,
)


# -- targets --------------------------------------------------------------------------------

def accept_target(target: str, custom: Any, hardware_id: str, installed_version: str) -> str:
    """Check a TUF target's custom fields against this vehicle; return its version.

    Raises UpdateError(VERIFICATION_FAILED) naming the problem: custom fields missing, a
    different hardware_id, a version that does not parse or is not newer than the installed one.
    """
    if not isinstance(custom, Mapping):
        raise UpdateError(VERIFICATION_FAILED,
                          f"target {target!r} has no custom fields (hardware_id, version)")
    hw = custom.get("hardware_id")
    if hw != hardware_id:
        raise UpdateError(VERIFICATION_FAILED,
                          f"target {target!r} is for hardware {hw!r}, this vehicle is "
                          f"{hardware_id!r}")
    version = custom.get("version")
    if not is_newer(version, installed_version):  # parse errors raise VERIFICATION_FAILED
        raise UpdateError(VERIFICATION_FAILED,
                          f"target {target!r} version {version} is not newer than the "
                          f"installed {installed_version} (rollback refused)")
    return version


# -- the state machine ----------------------------------------------------------------------

IDLE, DOWNLOADING, VERIFYING, STAGED = "IDLE", "DOWNLOADING", "VERIFYING", "STAGED"
ACTIVATING, CONFIRMING, COMMITTED = "ACTIVATING", "CONFIRMING", "COMMITTED"
FAILED_STATE, ROLLED_BACK = "FAILED", "ROLLED_BACK"
STATES = frozenset({IDLE, DOWNLOADING, VERIFYING, STAGED, ACTIVATING, CONFIRMING, COMMITTED,
                    FAILED_STATE, ROLLED_BACK})
FINAL_STATES = frozenset({IDLE, COMMITTED, FAILED_STATE, ROLLED_BACK})

# events
STAGE, DOWNLOADED, VERIFIED, FAIL, CANCEL = "stage", "downloaded", "verified", "fail", "cancel"
ACTIVATE, SWITCHED, CONFIRMED, ROLL_BACK = "activate", "switched", "confirmed", "roll_back"
ABORT = "abort"

TRANSITIONS: Mapping[str, Mapping[str, str]] = {
    IDLE: {STAGE: DOWNLOADING},
    DOWNLOADING: {DOWNLOADED: VERIFYING, FAIL: FAILED_STATE, CANCEL: IDLE, STAGE: DOWNLOADING},
    VERIFYING: {VERIFIED: STAGED, FAIL: FAILED_STATE, CANCEL: IDLE, STAGE: DOWNLOADING},
    STAGED: {ACTIVATE: ACTIVATING, CANCEL: IDLE, STAGE: DOWNLOADING},
    # A failed switch leaves the active slot as it was.
    # ABORT: the vehicle stopped being safe before the switch; the artifact stays staged.
    ACTIVATING: {SWITCHED: CONFIRMING, FAIL: FAILED_STATE, ABORT: STAGED},
    CONFIRMING: {CONFIRMED: COMMITTED, ROLL_BACK: ROLLED_BACK},
    COMMITTED: {STAGE: DOWNLOADING},
    FAILED_STATE: {STAGE: DOWNLOADING},
    ROLLED_BACK: {STAGE: DOWNLOADING},
}


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateState:
    """The persisted update record. `command_id` is the command whose outcome is pending or
    was last reported (the stage command up to STAGED, then the activate command)."""

    state: str = IDLE
    command_id: str | None = None
    target: str | None = None
    version: str | None = None
    sha256: str | None = None
    slot: str | None = None
    started_ms: int | None = None
    detail: str | None = None
    reason: str | None = None
    repository: str | None = None  # where the stage command fetches from (to resume it)
    installed: str | None = None  # the last committed version (anti-rollback); None: the config's
    # The terminal status decided for command_id, and whether it reached the outbox: a
    # restart re-sends it only when it did not (one terminal status per command, ever).
    final_status: str | None = None
    reported: bool = False

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"unknown update state {self.state!r}")
        for f in ("command_id", "target", "version", "sha256", "slot", "detail", "reason",
                  "repository", "installed", "final_status"):
            value = getattr(self, f)
            if value is not None and type(value) is not str:
                raise ValueError(f"update state: {f} must be a string or null, not {value!r}")
        if self.final_status not in (None, SUCCEEDED, FAILED, REJECTED):
            raise ValueError(f"update state: final_status {self.final_status!r}")
        if type(self.reported) is not bool:
            raise ValueError(f"update state: reported must be true or false")
        if self.started_ms is not None and (type(self.started_ms) is not int
                                            or self.started_ms < 0):
            raise ValueError(f"update state: started_ms must be a uint, not {self.started_ms!r}")

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> UpdateState:
        """Parse a record written by to_json; raises ValueError for anything else."""
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"update state is not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError("update state must be a JSON object")  # noqa: TRY004 - contract
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"update state: unknown field {unknown[0]!r}")
        return cls(**raw)

    @property
    def cancellable(self) -> bool:
        return CANCEL in TRANSITIONS[self.state]


def transition(current: UpdateState, event: str, **changes: Any) -> UpdateState:
    """The record after `event`, with `changes` applied; raises IllegalTransition."""
    new = TRANSITIONS[current.state].get(event)
    if new is None:
        raise IllegalTransition(BUSY if event == STAGE else PRECONDITION_FAILED,
                                current.state, event)
    return replace(current, state=new, **changes)


# -- command-level helpers: what each update command does to the record ----------------------

def installed_version(current: UpdateState | None, configured: str) -> str:
    """The version running now: the last committed one, else `updates.installed_version`."""
    return (current.installed if current is not None and current.installed else configured)


def check_repository(url: str, allowed: tuple[str, ...]) -> None:
    """The command's repository must start with one of `updates.allowed_repositories`.

    Raises UpdateError(BAD_PARAMS) otherwise: the parameter fails this vehicle's validation
    before anything is fetched."""
    base = url.rstrip("/") + "/"
    # Prefixes match whole path segments: ".../fleet" does not allow ".../fleetX".
    if not any(base.startswith(p if p.endswith("/") else p + "/") for p in allowed):
        raise UpdateError(BAD_PARAMS, f"repository {url[:120]!r} is not an allowed update "
                                      "repository on this vehicle")


def stage(current: UpdateState, command_id: str, target: str, now_ms: int,
          repository: str | None = None) -> tuple[UpdateState, list[Report]]:
    """Start an update.stage. Returns the new DOWNLOADING record and the reports for a
    superseded stage command (FAILED/SUPERSEDED when one was still in flight).

    The runtime must abort the download in flight and discard a staged artifact (old record's
    target/slot) when `current` was DOWNLOADING, VERIFYING or STAGED.
    Raises IllegalTransition (reason BUSY) while ACTIVATING or CONFIRMING.
    """
    new = transition(current, STAGE, command_id=command_id, target=target, version=None,
                     sha256=None, slot=None, started_ms=now_ms, detail=None, reason=None,
                     repository=repository, final_status=None, reported=False)
    reports = []
    if current.state in (DOWNLOADING, VERIFYING) and current.command_id:
        reports.append(Report(command_id=current.command_id, status=FAILED, reason=SUPERSEDED,
                              detail=f"superseded by command {command_id}"))
    return new, reports


def cancel(current: UpdateState, command_id: str) -> tuple[UpdateState, list[Report]]:
    """update.cancel: back to IDLE. The cancelled stage command (if still in flight) ends
    FAILED/CANCELLED; the cancel command itself SUCCEEDS. Raises IllegalTransition
    (PRECONDITION_FAILED) after STAGED or when there is nothing to cancel."""
    new = transition(current, CANCEL, command_id=command_id, detail="cancelled",
                     reason=None, slot=None, final_status=SUCCEEDED, reported=False)
    reports = []
    if current.state in (DOWNLOADING, VERIFYING) and current.command_id:
        reports.append(Report(command_id=current.command_id, status=FAILED, reason=CANCELLED,
                              detail=f"cancelled by command {command_id}"))
    reports.append(Report(command_id=command_id, status=SUCCEEDED))
    return new, reports


def fail(current: UpdateState, reason: str, detail: str, status: str = FAILED
         ) -> tuple[UpdateState, list[Report]]:
    """A step failed (download, verification, install, switch): FAILED with that reason
    (REJECTED when this vehicle refuses the target)."""
    new = transition(current, FAIL, reason=reason, detail=detail, final_status=status,
                     reported=False)
    return new, ([Report(command_id=current.command_id, status=status, reason=reason,
                         detail=detail)] if current.command_id else [])


def final_report(current: UpdateState) -> Report | None:
    """The terminal status recorded for the record's command, to send (again) if it has not
    reached the outbox; None when there is none or it was sent."""
    if not current.command_id or current.reported:
        return None
    status = current.final_status
    if status is None:  # a record written before final_status existed: infer it
        status = {STAGED: SUCCEEDED, COMMITTED: SUCCEEDED, FAILED_STATE: FAILED,
                  ROLLED_BACK: FAILED}.get(current.state)
        if status is None:
            return None
    if status == SUCCEEDED:
        result = (staged_result(current) if current.state == STAGED else
                  {"target": current.target, "version": current.version}
                  if current.state == COMMITTED else None)
        return Report(command_id=current.command_id, status=SUCCEEDED, result=result)
    return Report(command_id=current.command_id, status=status,
                  reason=current.reason or INSTALL_FAILED, detail=current.detail)


def check_activate(current: UpdateState, target: str) -> None:
    """update.activate's own precondition: `target` is the one staged.

    Raises UpdateError(PRECONDITION_FAILED) otherwise.
    """
    if current.state != STAGED:
        raise UpdateError(PRECONDITION_FAILED,
                          f"nothing staged to activate (update {current.state})")
    if current.target != target:
        raise UpdateError(PRECONDITION_FAILED,
                          f"target {target!r} is not staged; staged is {current.target!r}")


def staged_result(current: UpdateState) -> dict:
    """The `result` of a SUCCEEDED update.stage (§6: target, version, sha256)."""
    return {"target": current.target, "version": current.version, "sha256": current.sha256}


# -- restart --------------------------------------------------------------------------------

def on_restart(found: UpdateState | None, slots: Mapping[str, Any], now_ms: int,
               max_resume_age_ms: int = 6 * 3600 * 1000, max_boot_attempts: int = 3
               ) -> list[Any]:
    """What to do with the update record found at start (pure).

    `slots` is SlotBackend.report(): {"active": slot, "pending": {"slot", "previous",
    "boots"} or None}. Returns a list of Save / Report / ResumeStage / Discard / Confirm /
    RollBackSlot actions, to be executed in order.

    - nothing, or a final state: clean leftovers only; the terminal status recorded for the
      command is re-sent only if it never reached the outbox (`reported` false).
    - DOWNLOADING/VERIFYING: resume if the stage started less than max_resume_age_ms ago,
      else FAILED/DOWNLOAD_FAILED.
    - STAGED: keep it; re-send the stage command's SUCCEEDED if it never went out.
    - ACTIVATING: the switch either happened (pending marker names our slot and it is
      active -> CONFIRMING, then Confirm) or not (active slot untouched -> FAILED/INSTALL_FAILED).
    - CONFIRMING: running our slot with boots <= max_boot_attempts -> Confirm; our slot
      active with no pending marker -> it was marked good just before the cut: COMMITTED;
      otherwise the bootloader fell back or we keep crashing -> roll back,
      FAILED/INSTALL_FAILED.
    - a pending trial slot with no activation of ours under way -> RollBackSlot.
    """
    pending = slots.get("pending") or None
    active = slots.get("active")
    actions: list[Any] = []
    if found is None or found.state in (IDLE, COMMITTED, FAILED_STATE, ROLLED_BACK):
        # No activation of ours is under way, so a trial slot cannot be confirmed (its record
        # was lost or the switch was undone): go back to the slot that worked.
        if pending:
            actions.append(RollBackSlot())
        actions.append(Discard(what="downloads"))
        final = final_report(found) if found is not None else None
        return actions + ([final] if final else [])
    cid = found.command_id

    def report(status: str, reason: str | None = None, detail: str | None = None,
               result: Mapping | None = None) -> None:
        if cid:
            actions.append(Report(command_id=cid, status=status, reason=reason, detail=detail,
                                  result=result))

    state = found.state
    if state in (DOWNLOADING, VERIFYING):
        age = now_ms - (found.started_ms or 0)
        if 0 <= age <= max_resume_age_ms:
            actions.append(ResumeStage(state=found))
            report(IN_PROGRESS, detail="resuming after a restart")
        else:
            new, reports = fail(found, DOWNLOAD_FAILED,
                                "interrupted by a restart and too old to resume")
            actions += [Save(state=new), Discard(what="downloads"), *reports]
    elif state == STAGED:
        final = final_report(found)
        if final:
            actions.append(final)
    elif state == ACTIVATING:
        if pending and pending.get("slot") == found.slot and active == found.slot:
            new = transition(found, SWITCHED)
            actions += [Save(state=new), Confirm(state=new)]
            report(IN_PROGRESS, detail="confirming the new version")
        else:
            new, reports = fail(found, INSTALL_FAILED, "activation interrupted before the "
                                "switch; the active slot is unchanged")
            actions.append(Save(state=new))
            if pending:
                actions.append(RollBackSlot())  # drop the half-written marker
            actions += reports
    elif state == CONFIRMING:
        running_ours = active == found.slot and pending and pending.get("slot") == found.slot
        if active == found.slot and not pending:
            # Cut between mark_good and saving COMMITTED: the slot was confirmed.
            new = commit(found)
            actions += [Save(state=new), final_report(new)]
        elif running_ours and int(pending.get("boots", 0)) <= max_boot_attempts:
            actions.append(Confirm(state=found))
            report(IN_PROGRESS, detail="confirming the new version")
        else:
            detail = ("the new version did not come up; rolled back" if running_ours
                      else "the previous slot is running again; rolled back")
            new = roll_back(found, detail)
            if pending:
                actions.append(RollBackSlot())
            actions += [Save(state=new), final_report(new)]
    return actions


def commit(current: UpdateState) -> UpdateState:
    """CONFIRMING -> COMMITTED: the new version is the anti-rollback floor from now on."""
    return transition(current, CONFIRMED, installed=current.version, detail=None, reason=None,
                      final_status=SUCCEEDED, reported=False)


def roll_back(current: UpdateState, detail: str) -> UpdateState:
    """CONFIRMING -> ROLLED_BACK, FAILED/INSTALL_FAILED."""
    return transition(current, ROLL_BACK, reason=INSTALL_FAILED, detail=detail,
                      final_status=FAILED, reported=False)


# -- typed commands, events and actions -----------------------------------------------------
#
# The live machine, h11 style: `on_command`, `on_event` and `poll` take the `Machine` and
# return the new one with a list of actions; `start` does the same with `on_restart`'s answer.
# The executor (app/updateservice.py) runs the actions in order and feeds what happened back
# as events. Its rules, fixed here so that it decides nothing:
# - a Save that fails: without `keep_going` the rest of the list is dropped, the machine stays
#   as it was before the step and `SaveFailed` comes back to `on_event`; with `keep_going`
#   the failure is logged and the rest runs (the machine is the new one: at start and after a
#   rollback the slots, not the record, are the truth).
# - MarkGood / RollBackSlot that fail: the same, with `SlotFailed`.
# - MarkGood that succeeds: `MarkedGood` comes back at once.
# - StartDownload, Install, Verify, Switch and Discard run on the worker thread, in order;
#   their results come back through the core thread's queue as `UpdateEvent(gen, event)`.

_HINTS: dict[type, list[tuple[str, tuple[type, ...], bool]]] = {}


def _kinds(hint: Any) -> tuple[tuple[type, ...], bool]:
    """(types, None allowed) for a field annotation: a class, `X | Y`, `X | None`."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    kinds = tuple(typing.get_origin(a) or a for a in args if a is not type(None))
    return (kinds + (int,) if float in kinds else kinds), type(None) in args


def _check_fields(self: Any) -> None:
    cls = type(self)
    if cls not in _HINTS:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = [(f.name, *_kinds(hints[f.name])) for f in fields(cls)]
    for name, kinds, optional in _HINTS[cls]:
        value = getattr(self, name)
        if value is None and optional:
            continue
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ValueError(f"{cls.__name__}.{name}: {value!r} is not "
                             f"{' or '.join(k.__name__ for k in kinds)}")
    validate = getattr(self, "_validate", None)
    if validate is not None:
        validate()


def typed(cls: type) -> type:
    """A frozen, slotted, keyword-only dataclass that checks its fields' types on creation
    (and runs its `_validate` for the values a type does not say)."""
    cls.__post_init__ = _check_fields
    return dataclass(frozen=True, slots=True, kw_only=True)(cls)


def _need_id(self: Any) -> None:
    if not self.command_id:
        raise ValueError(f"{type(self).__name__}.command_id: empty")


@typed
class Stage:
    command_id: str
    target: str
    repository: str
    _validate = _need_id


@typed
class Activate:
    command_id: str
    target: str
    _validate = _need_id


@typed
class Cancel:
    command_id: str
    _validate = _need_id


Command = Stage | Activate | Cancel
COMMANDS = frozenset({"update.stage", "update.activate", "update.cancel"})


def parse_command(name: str, command_id: str, params: Mapping) -> Command | None:
    """The typed command for a gate-accepted update.* command; None for another name."""
    if name == "update.stage":
        return Stage(command_id=command_id, target=params["target"],
                     repository=params["repository"])
    if name == "update.activate":
        return Activate(command_id=command_id, target=params["target"])
    if name == "update.cancel":
        return Cancel(command_id=command_id)
    return None


# events from the worker thread

@typed
class DownloadProgress:
    pct: int

    def _validate(self) -> None:
        if not 0 <= self.pct <= 100:
            raise ValueError(f"DownloadProgress.pct: {self.pct} is not 0..100")


@typed
class Downloaded:
    """Fetched and verified by TUF, its custom fields accepted (`version`)."""

    path: str
    name: str
    sha256: str
    version: str


@typed
class Installed:
    slot: str


@typed
class Hashed:
    """The staged artifact hashed again (before a switch)."""

    sha256: str


@typed
class Switched:
    """The slot backend made the staged slot active on trial."""


@typed
class Failed:
    """A worker job failed; `refused`: this vehicle refuses the target (REJECTED)."""

    reason: str
    detail: str
    refused: bool = False


# results of the actions run on the core thread

@typed
class SaveFailed:
    state: UpdateState
    detail: str


@typed
class MarkedGood:
    """mark_good went through: the new slot stays, whatever happens next."""


@typed
class SlotFailed:
    detail: str


Event = (DownloadProgress | Downloaded | Installed | Hashed | Switched | Failed | SaveFailed
         | MarkedGood | SlotFailed)


@typed
class UpdateEvent:
    """An event tagged with the job generation it belongs to: the worker's through the core
    thread's queue, the executor's own at once. Another generation's is stale and ignored."""

    gen: int
    event: Event


# actions

@typed
class Save:
    """Persist this record (write, fsync, rename) before the rest of the list happens."""

    state: UpdateState
    keep_going: bool = False


@typed
class Report:
    """Send this status for this command id."""

    command_id: str
    status: str
    reason: str | None = None
    detail: str | None = None
    result: Mapping | None = None
    progress: int | None = None

    def _validate(self) -> None:
        _need_id(self)
        if self.status not in STATUSES:
            raise ValueError(f"Report.status: {self.status!r} is not a §7 status")
        if self.reason is not None and self.reason not in REASONS:
            raise ValueError(f"Report.reason: {self.reason!r} is not a §7 reason")


@typed
class StartDownload:
    """Worker: fetch `target` through TUF, accepting it only for `hardware_id` and newer than
    `floor` (accept_target, before any byte of it is downloaded); then `Downloaded`."""

    gen: int
    state: UpdateState
    hardware_id: str
    floor: str


@typed
class Install:
    """Worker: install the downloaded file into the inactive slot; then `Installed`."""

    gen: int
    path: str
    meta: Mapping


@typed
class Verify:
    """Worker: hash the staged artifact of `slot` again; then `Hashed`."""

    gen: int
    slot: str


@typed
class Switch:
    """Worker: make `slot` active on trial (or leave the slots as they were); `Switched`."""

    gen: int
    slot: str


@typed
class Abort:
    """Stop the job in flight (its later events are stale already: the generation moved)."""


@typed
class ResumeStage:
    """Run the stage again (download, verify, install); the TUF cache makes it cheap.
    (on_restart's answer; `start` turns it into a StartDownload.)"""

    state: UpdateState


@typed
class Discard:
    """Worker: remove download leftovers ("downloads"), or also what the inactive slot holds
    ("inactive": a cancelled or superseded stage). Failures are logged only."""

    what: str

    def _validate(self) -> None:
        if self.what not in ("downloads", "inactive"):
            raise ValueError(f"Discard.what: {self.what!r} is not downloads or inactive")


@typed
class Confirm:
    """The new slot is running: the health check starts (`poll` decides)."""

    state: UpdateState


@typed
class MarkGood:
    """Tell the slot backend the pending activation is good."""


@typed
class RollBackSlot:
    """Tell the slot backend to go back to the previous slot; `restart`: then run the
    previous slot's code (only once the roll-back went through)."""

    keep_going: bool = False
    restart: bool = False


@typed
class UndoSwitch:
    """Drop a trial switch to `slot` if one is pending (errors are logged only)."""

    slot: str | None


@typed
class RequestRestart:
    """Ask the runtime to exit for a restart (RESTART_EXIT_CODE)."""


Action = (Save | Report | StartDownload | Install | Verify | Switch | Abort | Discard
          | Confirm | MarkGood | RollBackSlot | UndoSwitch | RequestRestart)


# -- the "update" command family (core/registry.py): names and parameter checks -------------
# Where the protocol is silent: `target` is 1-255 printable characters; `repository` is an
# http(s) URL with a host and no query or fragment (`{repository}/metadata/` must stay under it).

_UPDATE_PARAMS = {"update.stage": ("repository", "target"), "update.activate": ("target",),
                  "update.cancel": ()}
_MAX_TARGET = 255
_MAX_URL = 2048


def check_update_params(name: str, params: Mapping) -> None:
    """Parameters of update.stage / update.activate / update.cancel; raises ParamError."""
    want = _UPDATE_PARAMS[name]
    extra = sorted(set(params) - set(want))
    if extra:
        raise _ParamError(f"{name} takes no parameter {_show(extra[0])}")
    missing = [k for k in want if k not in params]
    if missing:
        raise _ParamError(f"{name} needs parameter {missing[0]!r}")
    if "target" in want:
        target = params["target"]
        if (type(target) is not str or not 0 < len(target) <= _MAX_TARGET
                or not target.isprintable()):
            raise _ParamError(f"target: must be 1-{_MAX_TARGET} printable characters")
    if "repository" in want and not _is_http_url(params["repository"]):
        raise _ParamError("repository: must be an http:// or https:// URL with a host "
                          "and no query or fragment")


def _is_http_url(value: Any) -> bool:
    if type(value) is not str or len(value) > _MAX_URL or not value.isprintable() or " " in value:
        return False
    try:
        parts = _urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return False
    # No query or fragment: `{repository}/metadata/` must still be a path under it. No dot
    # segments or encoded dots and slashes either: ".../fleet/../evil" would leave the prefix
    # that updates.allowed_repositories checked.
    segments = parts.path.split("/")
    return (parts.scheme in ("http", "https") and bool(parts.hostname)
            and not parts.query and not parts.fragment
            and "." not in segments and ".." not in segments
            and not any(e in parts.path.lower() for e in ("%2e", "%2f", "%5c", "\\")))


FAMILY = _Family("update", COMMANDS, check_update_params)
assert set(_UPDATE_PARAMS) == COMMANDS
