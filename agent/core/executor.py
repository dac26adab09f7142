"""Executing verified commands on the vehicle, by configuration. Sans-I/O.

Verified commands go in with the current time; statuses and CAN frames to send come out.
The vehicle's state is read through `lookup` (TelemetryCore.lookup), so a confirmation is a
condition on decoded signals, never an assumption.

Rules (README "Remote commands"):
  * per actuator, one command runs at a time; up to `queue_size` more wait; beyond that a
    command is REJECTED with BUSY;
  * a newer command with a different name on the same actuator (charge.stop during
    charge.start) supersedes the running one, which ends FAILED with SUPERSEDED;
  * preconditions are checked on arrival and again when a queued command starts;
  * if the `already` conditions hold, the command SUCCEEDS at once without sending;
  * SUCCEEDED only when every `confirm` condition holds after the frames were sent;
    TIMED_OUT with NO_RESPONSE otherwise; a CAN write error: FAILED with WRITE_FAILED;
  * on a sleeping bus (`power`, core/power.py) an action with `wake` frames sends them first
    (ACCEPTED "waking the vehicle"), waits up to `wake_timeout_ms` for its buses to talk and
    its preconditions to hold, then goes on as usual (TIMED_OUT NO_RESPONSE if the vehicle
    stays asleep, REJECTED PRECONDITION_FAILED if it woke and they fail); an action without
    wake frames is REJECTED PRECONDITION_FAILED "the vehicle is asleep".
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

from agent.errors import ParamError

from .protocol import (
    ACCEPTED,
    FAILED,
    INTERNAL_ERROR,
    REJECTED,
    SUCCEEDED,
    TERMINAL_STATUSES,
    TIMED_OUT,
)
from .conditions import Condition, Lookup, Param, check_all
from .registry import Family, no_params, show


@dataclass(frozen=True)
class Send:
    """Write this frame now; report a failure with Executor.send_failed(command_id, ...)."""

    command_id: str
    bus: int
    can_id: int
    data: bytes


@dataclass(frozen=True)
class Status:
    id: str
    status: str
    reason: str | None = None
    detail: str | None = None
    result: dict | None = None
    progress: int | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


@dataclass(frozen=True)
class FramePlan:
    bus: int
    can_id: int
    message: Any  # cantools Message
    signals: Mapping[str, Any]  # values or Param
    defaults: Mapping[str, Any]
    repeat: int
    interval_ms: int
    counter: str = ""
    checksum: str = ""


@dataclass(frozen=True)
class ActionPlan:
    name: str
    actuator: str
    preconditions: tuple[Condition, ...]
    already: tuple[Condition, ...]
    confirm: tuple[Condition, ...]
    timeout_ms: int
    stale_ms: int
    frames: tuple[FramePlan, ...]
    wake: tuple[FramePlan, ...] = ()
    wake_timeout_ms: int = 3000

    @property
    def buses(self) -> tuple[int, ...]:
        return tuple(sorted({fp.bus for fp in self.frames}))


class BusPower(Protocol):
    """What the executor asks the power machine (core/power.py PowerMachine)."""

    def bus_asleep(self, bus: int, now_ms: int) -> bool: ...

    def bus_heard_since(self, bus: int, t_ms: int) -> bool: ...


@dataclass
class _Run:
    id: str
    plan: ActionPlan
    params: Mapping[str, Any]
    started_ms: int = 0
    sends: list = field(default_factory=list)  # [(due_ms, Send)], in time order
    waking_since: int | None = None  # wake frames sent at this time; not started yet


class Executor:
    def __init__(self, actions: Mapping[str, ActionPlan], lookup: Lookup,
                 last_frame: Callable[[int, int], bytes | None], queue_size: int = 8):
        self.actions = dict(actions)
        self.lookup = lookup
        self.last_frame = last_frame
        self.queue_size = queue_size
        self._running: dict[str, _Run] = {}
        self._queued: dict[str, deque[_Run]] = {}
        self._counters: dict[tuple[int, int], int] = {}  # (bus, can_id) -> last counter sent
        self.power: BusPower | None = None  # set when the agent follows the power state
        self.bus_names: list[str] = []  # for details: "bus pt", else "bus 0"

    @property
    def busy(self) -> bool:
        return bool(self._running)

    def running(self, command_id: str) -> bool:
        """Is this command running or queued here?"""
        return any(r.id == command_id for r in self._running.values()) or any(
            r.id == command_id for q in self._queued.values() for r in q)

    def submit(self, command_id: str, name: str, params: Mapping[str, Any], now_ms: int) -> list:
        """A verified, authorised command of the actions family with valid parameters."""
        plan = self.actions.get(name)
        if plan is None:
            return [Status(command_id, REJECTED, "UNKNOWN_COMMAND",
                           f"no action is configured for {name} on this vehicle")]
        sleeping = self._sleeping(plan, now_ms)
        if sleeping and not plan.wake:
            return [self._asleep(command_id, plan, sleeping)]
        if not sleeping:  # asleep, the values are old: checked once the vehicle is awake
            ok, why = check_all(plan.preconditions, self.lookup, now_ms, plan.stale_ms, params)
            if not ok:
                return [Status(command_id, REJECTED, "PRECONDITION_FAILED", why)]
        run = _Run(command_id, plan, dict(params))
        current = self._running.get(plan.actuator)
        out: list = []
        superseding = current is not None and current.plan.name != name
        if superseding:
            # The newer command wins, and so it does over everything still waiting behind the
            # old one: those were issued before it and would undo it when they ran.
            out.append(Status(current.id, FAILED, "SUPERSEDED", f"superseded by {command_id}"))
            for waiting in self._queued.pop(plan.actuator, ()):
                out.append(Status(waiting.id, FAILED, "SUPERSEDED",
                                  f"superseded by {command_id}"))
            del self._running[plan.actuator]
            current = None
        if current is not None:
            queue = self._queued.setdefault(plan.actuator, deque())
            if len(queue) >= self.queue_size:
                return out + [Status(command_id, REJECTED, "BUSY",
                                     f"{len(queue)} {plan.actuator} commands already waiting")]
            queue.append(run)
            return out + [Status(command_id, ACCEPTED, detail=f"queued behind {current.id}")]
        # After a supersede the vehicle may still be reacting to the old command's frames (a
        # START already sent, the charger not yet CHARGING): "already in that state" would be
        # read too early, so the frames are sent and the confirmation decides.
        return out + self._start(run, now_ms, announce=True, shortcut=not superseding)

    def _sleeping(self, plan: ActionPlan, now_ms: int) -> list[int]:
        if self.power is None:
            return []
        return [b for b in plan.buses if self.power.bus_asleep(b, now_ms)]

    def _asleep(self, command_id: str, plan: ActionPlan, buses: list[int]) -> Status:
        names = ", ".join(self._bus_name(b) for b in buses)
        return Status(command_id, REJECTED, "PRECONDITION_FAILED",
                      f"the vehicle is asleep ({names} silent) and {plan.name} has no wake "
                      "frames configured")

    def _bus_name(self, bus: int) -> str:
        return f"bus {self.bus_names[bus] if bus < len(self.bus_names) else bus}"

    def _wake(self, run: _Run, now_ms: int, announce: bool) -> list:
        """Send the wake frames; poll() starts the run once the buses talk."""
        try:
            run.sends = self._plan_sends(run, now_ms, run.plan.wake)
        except Exception as e:  # a wake frame that does not encode: a config error, said once
            return [Status(run.id, REJECTED, "BAD_PARAMS", f"cannot encode a wake frame: {e}")]
        run.waking_since = run.started_ms = now_ms
        self._running[run.plan.actuator] = run
        out = [Status(run.id, ACCEPTED, detail="waking the vehicle")] if announce else []
        return out + self._due(run, now_ms)

    def _poll_waking(self, run: _Run, now_ms: int) -> list:
        plan = run.plan
        out = self._due(run, now_ms)
        awake = all(self.power.bus_heard_since(b, run.waking_since) for b in plan.buses)
        ok, why = (check_all(plan.preconditions, self.lookup, now_ms, plan.stale_ms, run.params)
                   if awake else (False, ""))
        if awake and ok:
            del self._running[plan.actuator]
            run.waking_since = None
            return out + self._start(run, now_ms, announce=False)
        if now_ms - run.started_ms < plan.wake_timeout_ms:
            return out
        del self._running[plan.actuator]
        if awake:
            out.append(Status(run.id, REJECTED, "PRECONDITION_FAILED", why))
        else:
            out.append(Status(run.id, TIMED_OUT, "NO_RESPONSE",
                              f"the vehicle did not wake within {plan.wake_timeout_ms} ms"))
        return out + self._next(plan.actuator, now_ms)

    def _start(self, run: _Run, now_ms: int, announce: bool, shortcut: bool = True) -> list:
        plan = run.plan
        sleeping = self._sleeping(plan, now_ms)
        if sleeping:
            if not plan.wake:
                return [self._asleep(run.id, plan, sleeping)]
            return self._wake(run, now_ms, announce)
        if not announce:  # it waited in the queue: the vehicle may have changed meanwhile
            ok, why = check_all(plan.preconditions, self.lookup, now_ms, plan.stale_ms, run.params)
            if not ok:
                return [Status(run.id, REJECTED, "PRECONDITION_FAILED", why)]
        out = [Status(run.id, ACCEPTED)] if announce else []
        if plan.already and shortcut:
            done, _ = check_all(plan.already, self.lookup, now_ms, plan.stale_ms, run.params)
            if done:
                return out + [Status(run.id, SUCCEEDED, detail="already in that state",
                                     result=self._result(run))]
        try:
            run.sends = self._plan_sends(run, now_ms, plan.frames)
        except Exception as e:  # cantools: a value out of the signal's range, a bad choice
            return [Status(run.id, REJECTED, "BAD_PARAMS", f"cannot encode: {e}")]
        run.started_ms = now_ms
        self._running[plan.actuator] = run
        return out + self._due(run, now_ms)

    def _plan_sends(self, run: _Run, now_ms: int, frames) -> list:
        sends = []
        for fp in frames:
            values = dict(fp.defaults)
            last = self.last_frame(fp.bus, fp.can_id)
            if last is not None:  # read-modify-write: keep what the vehicle last said
                try:
                    values.update(fp.message.decode(last, decode_choices=False))
                except Exception:
                    pass
            for sig in fp.message.signals:
                values.setdefault(sig.name, sig.initial if sig.initial is not None else 0)
            for name, value in fp.signals.items():
                values[name] = run.params.get(value.name) if isinstance(value, Param) else value
            for i in range(fp.repeat):
                data = self._encode(fp, values)
                sends.append((now_ms + i * fp.interval_ms, Send(run.id, fp.bus, fp.can_id, data)))
        sends.sort(key=lambda pair: pair[0])
        return sends

    def _encode(self, fp: FramePlan, values: dict) -> bytes:
        if fp.counter:
            key = (fp.bus, fp.can_id)
            sig = fp.message.get_signal_by_name(fp.counter)
            values[fp.counter] = self._counters[key] = \
                (self._counters.get(key, -1) + 1) % (1 << sig.length)
        if not fp.checksum:
            return fp.message.encode(values, scaling=True, strict=True)
        values[fp.checksum] = 0
        data = fp.message.encode(values, scaling=True, strict=True)
        values[fp.checksum] = sum(data) & 0xFF  # the checksum field itself was zero
        return fp.message.encode(values, scaling=True, strict=True)

    @staticmethod
    def _due(run: _Run, now_ms: int) -> list:
        out = []
        while run.sends and run.sends[0][0] <= now_ms:
            out.append(run.sends.pop(0)[1])
        return out

    def poll(self, now_ms: int) -> list:
        """Send what is due, confirm or time out running commands, start queued ones."""
        out: list = []
        for actuator, run in list(self._running.items()):
            if run.waking_since is not None:
                out.extend(self._poll_waking(run, now_ms))
                continue
            out.extend(self._due(run, now_ms))
            plan = run.plan
            done, why = check_all(plan.confirm, self.lookup, now_ms, plan.stale_ms, run.params)
            if done:
                out.append(Status(run.id, SUCCEEDED, result=self._result(run)))
            elif now_ms - run.started_ms >= plan.timeout_ms:
                out.append(Status(run.id, TIMED_OUT, "NO_RESPONSE",
                                  f"not confirmed within {plan.timeout_ms} ms: {why}"))
            else:
                continue
            del self._running[actuator]
            out.extend(self._next(actuator, now_ms))
        return out

    def send_failed(self, command_id: str, detail: str, now_ms: int) -> list:
        for actuator, run in list(self._running.items()):
            if run.id == command_id:
                del self._running[actuator]
                return [Status(command_id, FAILED, "WRITE_FAILED", detail)] + \
                    self._next(actuator, now_ms)
        return []

    def abort(self, command_id: str, detail: str, now_ms: int) -> list:
        """Drop a command before it acts (its ACCEPTED could not be stored): nothing more of
        it is sent. Returns its REJECTED/INTERNAL_ERROR and what starts next on its actuator.
        A command not running or queued here: []."""
        for actuator, run in list(self._running.items()):
            if run.id == command_id:
                del self._running[actuator]
                return [Status(command_id, REJECTED, INTERNAL_ERROR, detail)] + \
                    self._next(actuator, now_ms)
        for queue in self._queued.values():
            for run in list(queue):
                if run.id == command_id:
                    queue.remove(run)
                    return [Status(command_id, REJECTED, INTERNAL_ERROR, detail)]
        return []

    def _next(self, actuator: str, now_ms: int) -> list:
        out: list = []
        queue = self._queued.get(actuator)
        while queue and actuator not in self._running:
            out.extend(self._start(queue.popleft(), now_ms, announce=False))
        return out

    def _result(self, run: _Run) -> dict:
        """The confirmed values, so the cloud sees what the vehicle reported."""
        result = {}
        for c in run.plan.confirm:
            seen = self.lookup(c.signal)
            if seen is not None:
                result[c.signal] = seen[0]
        return result


# -- the "actions" and "state" command families (core/registry.py) ---------------------------

V1_ACTIONS = ("charge.start", "charge.stop", "charge.set_limit", "doors.lock", "doors.unlock")


def _check_set_limit(name: str, params: Mapping[str, Any]) -> None:
    extra = sorted(set(params) - {"percent"})
    if extra:
        raise ParamError(f"{name} takes no parameter {show(extra[0])}")
    if "percent" not in params:
        raise ParamError(f"{name} needs parameter 'percent'")
    percent = params["percent"]
    if type(percent) is not int or not 50 <= percent <= 100:  # bool is not an int here
        raise ParamError(f"percent: must be an integer 50..100, got {show(percent)}")


def _placeholders(plan: ActionPlan) -> tuple[str, ...]:
    """The `{name}` parameters a configured action's frames and conditions read."""
    names = [v.name for fp in plan.frames for v in fp.signals.values() if isinstance(v, Param)]
    names += [c.literal.name for c in (*plan.preconditions, *plan.already, *plan.confirm)
              if isinstance(c.literal, Param)]
    return tuple(dict.fromkeys(names))


def actions_family(plans: Mapping[str, ActionPlan] = {}) -> Family:  # noqa: B006 - read only
    """The v1 charge/doors names plus every configured action. A v1 name keeps its §6
    parameters; another configured action takes exactly the `{name}` placeholders it uses,
    each a number or a text string (the frame encoding checks the range)."""
    wants = {name: _placeholders(plan) for name, plan in plans.items() if name not in V1_ACTIONS}

    def check(name: str, params: Mapping[str, Any]) -> None:
        if name == "charge.set_limit":
            return _check_set_limit(name, params)
        if name not in wants:
            return no_params(name, params)
        want = wants[name]
        extra = sorted(set(params) - set(want))
        if extra:
            raise ParamError(f"{name} takes no parameter {show(extra[0])}")
        for key in want:
            if key not in params:
                raise ParamError(f"{name} needs parameter {key!r}")
            if type(params[key]) not in (int, float, str):
                raise ParamError(f"{key}: must be a number or a text string, "
                                 f"got {show(params[key])}")

    return Family("actions", frozenset(V1_ACTIONS) | frozenset(plans), check)


STATE_FAMILY = Family("state", frozenset({"state.snapshot"}), no_params)
