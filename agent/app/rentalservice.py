"""rental.revoke and rental.end (PROTOCOL.md §11) on the core thread.

rental.revoke: the rental's grants are refused from now on (revocations.json, durable before
the answer). rental.end: the configured end conditions must hold (else REJECTED
PRECONDITION_FAILED naming the first that fails), then the rental is revoked, the immobilizer
action (if configured) runs like any action (frames, confirmation), and SUCCEEDED carries the
end-of-rental report as `result`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..adapters.revocations import RevocationFile
from ..config import RentalConfig
from ..core import rental as R
from ..core.commands import Command, CommandGate
from ..core.conditions import Lookup, check_all, parse_condition
from ..core.executor import ActionPlan, Executor, Send, Status
from ..core.protocol import (
    FAILED,
    INTERNAL_ERROR,
    PRECONDITION_FAILED,
    REJECTED,
    SUCCEEDED,
    UNKNOWN_COMMAND,
)
from ..errors import AgentError, BusError, ConfigError, StorageError

log = logging.getLogger("agent.rental")

POSITION = ("Vehicle.CurrentLocation.Latitude", "Vehicle.CurrentLocation.Longitude")


class RentalHandler:
    family = R.FAMILY

    def __init__(self, cfg: RentalConfig | None, storage_dir: Path, now_ms: int, lookup: Lookup,
                 immobilizer: ActionPlan | None = None,
                 send: Callable[[int, int, bytes], None] | None = None,
                 last_frame: Callable[[int, int], bytes | None] | None = None,
                 position: bool = False, dtcs: Callable[[], Any] | None = None):
        """immobilizer: the plan of cfg.immobilizer_on; send(bus, can_id, data) its frames;
        position: GNSS is configured; dtcs() -> {ecu: [DTC codes last read]} with diagnostics."""
        self.cfg = cfg
        self.lookup = lookup
        self.position = position
        self.dtcs = dtcs
        self._send = send
        self.file = RevocationFile(storage_dir, now_ms) if cfg is not None else None
        self.conditions = tuple(parse_condition(text, f"rental.end_conditions.{i}")
                                for i, text in enumerate(cfg.end_conditions)) if cfg else ()
        self.executor = (Executor({immobilizer.name: immobilizer}, lookup,
                                  last_frame or (lambda bus, can_id: None), 1)
                         if immobilizer is not None else None)
        self.immobilizer = immobilizer
        self._pending: dict[str, dict] = {}  # command id -> report, while immobilizing
        self._gate: CommandGate | None = None
        # CommandService sets it: each status committed before the next output, so no frame
        # is written before the command's ACCEPTED is durable (as ActionsHandler does).
        self.commit: Callable[[Status, int], None] | None = None
        self.counters: dict[str, int] = {"rentals_ended": 0, "rentals_revoked": 0}

    def bind_gate(self, gate: CommandGate) -> None:
        self._gate = gate

    def revoked(self, rental: str, nbf_ms: int) -> bool:
        return self.file.revoked(rental, nbf_ms)

    @property
    def busy(self) -> bool:
        return self.executor is not None and self.executor.busy

    def handle(self, cmd: Command, now_ms: int) -> list[Status]:
        if self.cfg is None:
            return [Status(cmd.id, REJECTED, UNKNOWN_COMMAND,
                           f"no [rental] configured on this vehicle for {cmd.name}")]
        rental = cmd.params["rental"]
        if cmd.name == "rental.end":
            ok, why = check_all(self.conditions, self.lookup, now_ms, self.cfg.stale_ms)
            if not ok:
                return [Status(cmd.id, REJECTED, PRECONDITION_FAILED, why)]
        try:
            self._revoke(rental, now_ms)
        except AgentError as e:
            log.error("rental %s not revoked: %s", rental, e)
            return [Status(cmd.id, FAILED, INTERNAL_ERROR, str(e)[:200])]
        log.info("rental %s %s by %s", rental,
                 "ended" if cmd.name == "rental.end" else "revoked", cmd.key_name)
        if cmd.name == "rental.revoke":
            self.counters["rentals_revoked"] += 1
            return [Status(cmd.id, SUCCEEDED, result={"rental": rental})]
        self.counters["rentals_ended"] += 1
        if self.executor is None:
            return [Status(cmd.id, SUCCEEDED, result=self._report(rental, now_ms))]
        self._pending[cmd.id] = {"rental": rental}
        return self._apply(self.executor.submit(cmd.id, self.immobilizer.name, {}, now_ms),
                           now_ms)

    def _revoke(self, rental: str, now_ms: int) -> None:
        until = now_ms + self.cfg.max_grant_ms
        if self._gate is not None:  # a grant of it seen with a later exp: keep until then
            until = max(until, self._gate.grants.latest_exp(rental) or 0)
        self.file.revoke(rental, until, now_ms)

    def _report(self, rental: str, now_ms: int, immobilized: bool | None = None) -> dict:
        extra: dict[str, Any] = {}
        if immobilized is not None:
            extra["immobilized"] = immobilized
        if self.position:
            lat, lon = (self.lookup(s) for s in POSITION)
            extra["position"] = (None if lat is None or lon is None
                                 else {"lat": lat[0], "lon": lon[0]})
        if self.dtcs is not None:
            try:
                extra["dtcs"] = self.dtcs()
            except AgentError as e:
                extra["dtcs"] = None
                log.warning("end-of-rental report without DTCs: %s", e)
        return R.report(rental, now_ms, self.lookup, self.cfg.report, extra)

    def poll(self, now_ms: int) -> list[Status]:
        return self._apply(self.executor.poll(now_ms), now_ms) if self.busy else []

    def _apply(self, outputs: list, now_ms: int) -> list[Status]:
        out: list[Status] = []
        aborted: set[str] = set()
        for item in outputs:
            if isinstance(item, Send):
                if item.command_id in aborted:
                    continue
                try:
                    self._send(item.bus, item.can_id, item.data)
                except BusError as e:
                    out += self._apply(self.executor.send_failed(item.command_id, str(e), now_ms),
                                       now_ms)
            elif isinstance(item, Status):
                s = self._finish(item, now_ms)
                if self.commit is None:
                    out.append(s)
                    continue
                try:
                    self.commit(s, now_ms)
                except StorageError as e:  # its ACCEPTED is not durable: no frame for it
                    aborted.add(s.id)
                    out += self._apply(self.executor.abort(
                        s.id, f"cannot store its status, not executed: {e}"[:200], now_ms), now_ms)
        return out

    def _finish(self, s: Status, now_ms: int) -> Status:
        """The immobilizer's terminal status becomes rental.end's, with the report."""
        if not s.terminal:
            return s
        rental = self._pending.pop(s.id, {}).get("rental", "")
        report = self._report(rental, now_ms, immobilized=s.status == SUCCEEDED)
        if s.status == SUCCEEDED:
            return Status(s.id, SUCCEEDED, result=report)
        return Status(s.id, s.status, s.reason,
                      f"rental ended, but {self.immobilizer.name}: {s.detail}"[:200], result=report)

    def running(self, command_id: str) -> bool:
        return self.executor is not None and self.executor.running(command_id)

    def status(self) -> dict:
        if self.cfg is None:
            return {}
        return {"revoked_rentals": len(self.file.state), "counters": dict(self.counters)}


def immobilizer_plan(cfg: RentalConfig | None, actions: Mapping[str, ActionPlan],
                     where: str) -> ActionPlan | None:
    """The configured action rental.end runs, or None; ConfigError when it is not an action."""
    if cfg is None or not cfg.immobilizer_on:
        return None
    plan = actions.get(cfg.immobilizer_on)
    if plan is None:
        raise ConfigError(f"{where}rental.immobilizer_on: {cfg.immobilizer_on!r} is not a "
                          "configured [[commands.action]]")
    return plan
