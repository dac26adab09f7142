"""The command families this agent runs: one Handler per family, built from the config.

A family's pure part (its `Family`: names and parameter checks) lives in its core module; its
Handler here executes Accepted commands on the core thread and returns the statuses to sign.
CommandService (commandservice.py) dispatches each Accepted command to the handler of its
family and signs, stores and publishes what comes back. Adding a capability = a core module,
a handler class, and one line in `handlers()`.

Besides the Handler protocol a handler may have:
  busy: bool                 -- true while it wants polling every few ms (actions in flight)
  reported(statuses) -> None -- called once statuses it returned are signed and in the outbox
  commit                     -- set by CommandService: commit(status, now_ms) signs and stores
                                one status at once, raising StorageError when an ACCEPTED could
                                not be committed (the handler must then not act on the command);
                                a handler with it returns no statuses
and its `status()` dict may carry "counters" ({name: int}), shown as `commands.<name>`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from ..core import updates as U
from ..core.commands import Command
from ..core.executor import STATE_FAMILY, Executor, Send, Status, actions_family
from ..core.protocol import REJECTED, SUCCEEDED, UNKNOWN_COMMAND
from ..core.registry import Family, Registry
from ..errors import BusError, ConfigError, StorageError
from .diagservice import diag_handlers

if TYPE_CHECKING:
    from ..adapters.canbus import BusReader
    from ..config import Config
    from ..core.selection import BusPlan
    from ..core.telemetry import TelemetryCore
    from .updateservice import UpdateService

Health = Callable[[], "tuple[bool, str]"]


class Handler(Protocol):
    family: Family

    def handle(self, cmd: Command, now_ms: int) -> list[Status]:
        """An Accepted, recorded command."""

    def poll(self, now_ms: int) -> list[Status]:
        """Called every core-loop pass."""

    def running(self, command_id: str) -> bool:
        """Is this command still in progress here? (for re-deliveries and recovery)"""

    def status(self) -> dict:
        """Shown by `tcu-agent status`."""


class ActionsHandler:
    """charge.*, doors.* and every configured action: the Executor, its frames onto the bus.

    The executor's outputs are taken in order, and each status is committed before the next
    output: no frame of a command is written before its ACCEPTED is durable. If that commit
    fails, the command is aborted (Executor.abort) before anything reached the bus.
    """

    def __init__(self, family: Family, executor: Executor, send: Callable[[int, int, bytes], None]):
        self.family = family
        self.executor = executor
        self._send = send  # (bus index, can id, data); raises BusError
        self.counters: Counter[str] = Counter()
        self.commit: Callable[[Status, int], None] | None = None

    @property
    def busy(self) -> bool:
        return self.executor.busy

    def handle(self, cmd: Command, now_ms: int) -> list[Status]:
        return self._apply(self.executor.submit(cmd.id, cmd.name, cmd.params, now_ms), now_ms)

    def poll(self, now_ms: int) -> list[Status]:
        return self._apply(self.executor.poll(now_ms), now_ms) if self.executor.busy else []

    def running(self, command_id: str) -> bool:
        return self.executor.running(command_id)

    def status(self) -> dict:
        return {"counters": dict(self.counters)}

    def _apply(self, outputs: list, now_ms: int) -> list[Status]:
        statuses: list[Status] = []
        aborted: set[str] = set()
        for out in outputs:
            if isinstance(out, Send):
                if out.command_id in aborted:
                    continue
                try:
                    self._send(out.bus, out.can_id, out.data)
                    self.counters["frames_sent"] += 1
                except BusError as e:
                    self.counters["write_failed"] += 1
                    statuses += self._apply(self.executor.send_failed(out.command_id, str(e),
                                                                      now_ms), now_ms)
            elif isinstance(out, Status):
                if self.commit is None:
                    statuses.append(out)
                    continue
                try:
                    self.commit(out, now_ms)
                except StorageError as e:  # an ACCEPTED not durable: it must not run
                    aborted.add(out.id)
                    self.counters["aborted"] += 1
                    statuses += self._apply(self.executor.abort(
                        out.id, f"cannot store its status, not executed: {e}"[:200], now_ms),
                        now_ms)
        return statuses


class StateHandler:
    """state.snapshot: publish the state record (§4) and answer with its values."""

    family = STATE_FAMILY

    def __init__(self, state_values: Callable[[], dict], publish_state: Callable[[dict, int], None]):
        self._values = state_values
        self._publish = publish_state

    def handle(self, cmd: Command, now_ms: int) -> list[Status]:
        values = self._values()
        self._publish(values, now_ms)
        return [Status(cmd.id, SUCCEEDED, result=values)]

    def poll(self, now_ms: int) -> list[Status]:
        return []

    def running(self, command_id: str) -> bool:
        return False  # answered at once

    def status(self) -> dict:
        return {}


class UpdateHandler:
    """update.stage / activate / cancel through the UpdateService; without [updates] they are
    answered REJECTED UNKNOWN_COMMAND (the names are v1 protocol, the vehicle lacks them)."""

    family = U.FAMILY

    def __init__(self, service: UpdateService | None, health: Health):
        self.service = service
        self._health = health

    def handle(self, cmd: Command, now_ms: int) -> list[Status]:
        if self.service is None:
            return [Status(cmd.id, REJECTED, UNKNOWN_COMMAND,
                           f"no [updates] configured on this vehicle for {cmd.name}")]
        return self.service.handle(cmd.id, cmd.name, dict(cmd.params), now_ms)

    def poll(self, now_ms: int) -> list[Status]:
        return [] if self.service is None else self.service.poll(now_ms, self._health)

    def running(self, command_id: str) -> bool:
        return self.service is not None and self.service.running(command_id)

    def status(self) -> dict:
        return {} if self.service is None else self.service.status()

    def reported(self, statuses: list[Status]) -> None:
        if self.service is not None:
            self.service.mark_reported(statuses)


def handlers(config: Config, plans: Sequence[BusPlan], core: TelemetryCore,
             readers: Sequence[BusReader], state_values: Callable[[], dict],
             publish_state: Callable[[dict, int], None], updates: UpdateService | None,
             health: Health, publisher=None) -> list[Handler]:
    """Every family's handler for this config. Raises ConfigError (a configured action whose
    name another family owns)."""
    from .assemble import action_plans
    from .campaignservice import CampaignHandler

    actions = action_plans(config, plans)
    cfg = config.commands
    executor = Executor(actions, core.lookup, core.last_frame, cfg.queue_size if cfg else 8)
    out: list[Handler] = [
        ActionsHandler(actions_family(actions), executor,
                       lambda bus, can_id, data: readers[bus].send(can_id, data)),
        StateHandler(state_values, publish_state),
        UpdateHandler(updates, health),
        *diag_handlers(config, core, publisher),
    ]
    if config.campaigns is not None:
        out.append(CampaignHandler(config, plans, core, readers,
                                   publisher.batch if publisher is not None else None))
    from .trustservice import TrustHandler

    out.append(TrustHandler(config, frozenset().union(*(h.family.commands for h in out))))
    try:  # refuse a name claimed twice now, in the config's words
        Registry(h.family for h in out)
    except ValueError as e:
        where = f"{config.path}: " if config.path else ""
        raise ConfigError(f"{where}commands.action: {e}") from None
    return out
