"""Carrying out the power machine's actions (core/power.py) and the link recovery's steps
(core/recovery.py). Called from the runtime's core thread only.

PowerService: each pass, `poll(now)` turns the bus counters into frame events, reads the 12 V
signal, ticks the machine and does what a change asks: close the batch, sign the status with
`power` and a state record, quiet the core, slow the modem and GNSS, tell systemd, run the
on-sleep command. While in protect, closed batches are not published; their samples are
reported as dropped in the next batch that is.

LinkRecovery: once a second, the uplink's state and the modem's registration go into the
policy; a step it returns goes to the modem thread (or runs the power-cycle command).
"""

from __future__ import annotations

import logging
import subprocess
import threading
from typing import Callable, Sequence

from ..config import ModemConfig, PowerConfig
from ..core import power as P
from ..core.recovery import POWER_CYCLE, RecoveryPolicy

log = logging.getLogger("agent.app.power")


def run_detached(argv: Sequence[str], timeout_s: float, what: str, result: dict) -> None:
    """Run a configured command in a thread (never blocking the core loop); its outcome goes
    into `result` and the log. A failure is logged, never raised."""
    def run():
        try:
            done = subprocess.run(list(argv), timeout=timeout_s, capture_output=True, check=False)
            if done.returncode:
                err = done.stderr.decode(errors="replace").strip().splitlines()
                text = f"exit {done.returncode}" + (f": {err[-1][:200]}" if err else "")
                log.error("%s %s failed: %s", what, argv[0], text)
            else:
                text = "ok"
                log.info("%s %s: ok", what, argv[0])
        except subprocess.TimeoutExpired:
            text = f"timed out after {timeout_s:g} s"
            log.error("%s %s %s", what, argv[0], text)
        except OSError as e:
            text = f"cannot run: {e}"
            log.error("%s %s: %s", what, argv[0], text)
        result["last"] = text
        result["runs"] = result.get("runs", 0) + 1

    threading.Thread(target=run, name=what.replace(" ", "-"), daemon=True).start()


class PowerService:
    def __init__(self, cfg: PowerConfig, core, buses: int, *, publisher=None, notifier=None,
                 modem=None, deliver: Callable[[], None] | None = None, now: float):
        self.cfg = cfg
        self.deliver = deliver  # hands closed batches on (the runtime's _deliver)
        self.core = core
        self.publisher = publisher
        self.notifier = notifier
        self.modem = modem
        self.machine = P.PowerMachine(P.PowerPolicy(
            sleep_after_ms=int(cfg.sleep_after_s * 1000), buses=buses,
            heartbeat_ms=int(cfg.heartbeat_s * 1000),
            protect_below_v=cfg.protect_below_v if cfg.battery_signal else None,
            protect_resume_v=cfg.protect_resume_v, quiet_after_ms=cfg.quiet_after_ms),
            int(now * 1000))
        self.slow = False  # asleep or protect: modem and GNSS at cfg.slow_poll_s
        self.dropping = False  # protect: batches are not published
        self.dropped_samples = 0
        self.heartbeats = 0
        self.on_sleep: dict = {}  # the on-sleep command's last outcome
        self._frames = [0] * buses
        self._volts_ms = -1  # observed time of the last 12 V reading taken
        self._first_batch = True  # the first batch after start/wake closes early
        self.listeners: list[Callable[[P.Change], None]] = []

    @property
    def state(self) -> str:
        return self.machine.state

    def poll(self, now: float) -> list[P.Change]:
        now_ms = int(now * 1000)
        m = self.machine
        changes: list[P.Change] = []
        for i, c in enumerate(self.core.counters):
            frames = c.frames
            if frames != self._frames[i]:
                self._frames[i] = frames
                changes += m.frame(i, now_ms)
        if self.cfg.battery_signal:
            seen = self.core.lookup(self.cfg.battery_signal)
            if seen is not None and seen[1] > self._volts_ms and isinstance(seen[0], (int, float)):
                self._volts_ms = seen[1]
                changes += m.voltage(float(seen[0]), now_ms)
        changes += m.tick(now_ms)
        for change in changes:
            self._apply(change, now)
        if self._first_batch:
            b = self.core.batches
            if b.t0 >= 0 and now_ms - b.t0 >= self.cfg.first_batch_ms:
                b.close()  # data on the broker soon after the start or the wake
                self._first_batch = False
        return changes

    def _apply(self, change: P.Change, now: float) -> None:
        now_ms = int(now * 1000)
        if change.state != change.previous:
            log.info("power: %s -> %s (%s)", change.previous, change.state, change.reason)
            if self.notifier is not None:
                self.notifier.power(change.state, change.reason)
        pub = self.publisher
        for action in change.actions:
            if action == P.CLOSE_BATCH:
                self.core.flush()
                if self.deliver is not None:
                    self.deliver()  # before DROP_BATCHES: this data was taken while awake
            elif action == P.PUBLISH_STATE and pub is not None:
                pub.state(self.core.snapshot(state_only=any(s.state for s in self.core.signals)),
                          now_ms)
            elif action in (P.PUBLISH_STATUS, P.HEARTBEAT) and pub is not None:
                pub.power_status(change.state, now_ms)
                self.heartbeats += action == P.HEARTBEAT
            elif action == P.FLUSH_OUTBOX and pub is not None:
                pub.uplink.wake()
            elif action == P.QUIET:
                self.core.set_quiet(True, now)
            elif action == P.RESUME:
                self.core.set_quiet(False, now)
                self._first_batch = True
            elif action in (P.SLOW_POLLING, P.FAST_POLLING):
                self._polling(slow=action == P.SLOW_POLLING)
            elif action == P.ON_SLEEP and self.cfg.on_sleep_command:
                run_detached(self.cfg.on_sleep_command, self.cfg.on_sleep_timeout_s,
                             "on-sleep command", self.on_sleep)
            elif action == P.DROP_BATCHES:
                self.dropping = True
            elif action == P.KEEP_BATCHES:
                self.dropping = False
        for listener in self.listeners:
            listener(change)

    def _polling(self, slow: bool) -> None:
        self.slow = slow
        if self.modem is not None:
            self.modem.set_poll_interval(self.cfg.slow_poll_s if slow
                                         else self.modem.cfg.poll_interval_s)
        if self.publisher is not None:
            self.publisher.set_keepalive(self.cfg.keepalive_s if slow else None)

    def status(self) -> dict:
        out = self.machine.status()
        out.update(heartbeats=self.heartbeats, dropped_samples=self.dropped_samples)
        if self.on_sleep:
            out["on_sleep"] = dict(self.on_sleep)
        return out


class LinkRecovery:
    """Brings the cellular link back: the policy decides, the modem thread acts."""

    def __init__(self, cfg: ModemConfig, modem, link_up: Callable[[], bool]):
        self.cfg = cfg
        self.modem = modem
        self.link_up = link_up
        self.enabled = cfg.recovery_after_s > 0 and not cfg.modemmanager
        self.policy = RecoveryPolicy(int(cfg.recovery_after_s * 1000),
                                     int(cfg.recovery_backoff_s * 1000),
                                     cfg.recovery_max_per_hour, bool(cfg.power_cycle_command))
        self.power_cycle: dict = {}
        self.taken: list[str] = []  # the steps, in order (for tests and the status)

    def poll(self, now_ms: int) -> str | None:
        if not self.enabled or self.modem.recovering:  # let the last step show its effect
            return None
        step = self.policy.poll(now_ms, self.link_up(), self.modem.registered(),
                                self.modem.bearer)
        if step is None:
            return None
        self.taken = (self.taken + [step])[-20:]
        log.warning("link recovery: broker unreachable, modem registered %s, bearer %s: %s",
                    self.modem.registered(), self.modem.bearer, step)
        if step == POWER_CYCLE:
            run_detached(self.cfg.power_cycle_command, self.cfg.power_cycle_timeout_s,
                         "modem power cycle", self.power_cycle)
        else:
            self.modem.recover(step)
        return step

    def status(self) -> dict:
        if not self.enabled:
            why = "ModemManager owns the modem: observing only" if self.cfg.modemmanager \
                else "off (modem.recovery_after_s = 0)"
            return {"state": why}
        out = {"state": "escalating" if self.policy.level else "idle", **self.policy.status()}
        if self.power_cycle:
            out["power_cycle"] = dict(self.power_cycle)
        return out
