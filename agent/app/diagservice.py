"""Diagnostics on the core thread: the diag.* command family's Handler and the periodic reads.

The pure DiagScheduler (core/diag.py) decides what to ask which ECU; its requests run on one
worker thread per ECU (adapters/diag.py EcuLink.execute: a slow or silent ECU never blocks the
core thread, nor the other ECUs), and the answers come back through a queue that `poll()`
drains on the core thread. PID values go into the telemetry core (feed_values) as signals;
the retained `{prefix}/diagnostics` record is signed and queued whenever the DTCs changed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from typing import Callable

from ..config import Config
from ..core import diag as D
from ..core.conditions import parse_condition
from ..core.executor import Status
from ..core.ratelimit import RateLimit
from ..core.selection import SignalSpec
from ..errors import AgentError, ConfigError

log = logging.getLogger("agent.diag")

REOPEN_S = 5.0
BUS_DOWN = "BUS_DOWN"  # the §9 error of an ECU whose bus could not be opened
RECORD_MIN_INTERVAL_MS = 1000
STOP_WAIT_S = 0.5  # for the workers' requests in flight, at stop  # diagnostics records: at most one a second
FAMILY = D.FAMILY


def ecu_plans(config: Config) -> list[D.EcuPlan]:
    diag = config.diagnostics
    plans = []
    for e in diag.ecu:
        interval = diag.dtc_interval_s if e.dtc_interval_s is None else e.dtc_interval_s
        spacing = diag.request_spacing_ms if e.request_spacing_ms is None else e.request_spacing_ms
        pids = tuple(D.PidPlan(D.pid_number(p.pid), p.interval_ms, pid_signal_name(p))
                     for p in e.pid)
        plans.append(D.EcuPlan(e.name, e.protocol, int(interval * 1000), spacing, pids))
    return plans


def pid_signal_name(p) -> str:
    return p.name or f"OBD.{D.PIDS[D.pid_number(p.pid)].name}"


def pid_specs(config: Config) -> list[SignalSpec]:
    """The PIDs' signals with the telemetry sampling policy (defaults from [telemetry])."""
    d = config.telemetry.defaults
    out = []
    for e in config.diagnostics.ecu:
        for p in e.pid:
            name = pid_signal_name(p)
            pick = lambda own, default: default if own is None else own  # noqa: E731
            out.append(SignalSpec(message="", signal=name, out=name, scale=1.0, offset=0.0,
                                  map=None, deadband=pick(p.deadband, d.deadband),
                                  min_interval_ms=pick(p.min_interval_ms, d.min_interval_ms),
                                  heartbeat_ms=int(pick(p.heartbeat_s, d.heartbeat_s) * 1000),
                                  timeout_ms=0, state=p.state, multiplexed=False))
    return out


def record_publisher(publisher) -> Callable[[dict], None]:
    """Sign and queue a diagnostics record: retained, and a newer unsent one replaces an older
    (the outbox's "state" kind does both, per topic)."""
    topic = publisher.topics.diagnostics
    return lambda payload: publisher._append("state", topic, payload)


def diag_handlers(config: Config, core, publisher) -> list:
    """The diag family's handler when [diagnostics] is configured (families.handlers)."""
    if config.diagnostics is None:
        return []
    return [DiagService(config, core, record_publisher(publisher) if publisher else None)]


class _Worker:
    """One ECU's requests, one at a time, on its own thread."""

    def __init__(self, name: str, execute, results: queue.SimpleQueue):
        self.name = name
        self.execute = execute
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.results = results
        self.thread = threading.Thread(target=self._run, name=f"diag-{name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            req = self.inbox.get()
            if req is None:
                return
            try:
                result = self.execute(req)
            except Exception as e:  # noqa: BLE001 - never lose the answer (one outstanding)
                log.exception("diag %s: %s failed", self.name, req.op)
                result = D.Result(False, error=f"INTERNAL: {type(e).__name__}")
            self.results.put((req.token, result))

    def stop(self) -> None:
        self.inbox.put(None)

    def join(self, until: float) -> None:
        self.thread.join(max(0.0, until - time.monotonic()))


class _Local:
    """A diag.* request from another thread (the control socket): answered, never published."""

    def __init__(self, name: str, params: dict):
        self.name = name
        self.params = params
        self.done = threading.Event()
        self.status: Status | None = None


class DiagService:
    """The Handler of the diag family (agent/app/families.py)."""

    family = FAMILY

    def __init__(self, config: Config, core, publish: Callable[[dict], None] | None,
                 links: dict | None = None, now_ms: int | None = None):
        diag = config.diagnostics
        self.config = config
        self.vin = config.vehicle.vin
        self.core = core
        self.publish = publish
        conds = tuple(parse_condition(t, f"diagnostics.clear_preconditions.{i}")
                      for i, t in enumerate(diag.clear_preconditions))
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        self.scheduler = D.DiagScheduler(ecu_plans(config), core.lookup, conds, diag.stale_ms,
                                         diag.queue_size, now)
        for spec in pid_specs(config):
            core.add_value_signal(spec)
        from ..adapters.diag import diag_ids

        names = [b.name for b in config.bus]
        for i, name in enumerate(names):
            ecus = [e for e in diag.ecu if (e.bus or names[0]) == name]
            core.ignore_ids(i, diag_ids(ecus))
        self._links = links  # given: tests and the CLI; else opened on the first poll
        self._buses: list = []
        self._next_open = 0.0
        self.open_error = ""
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._workers: dict[str, _Worker] = {}
        self.counters: Counter[str] = Counter()
        self.records = 0
        self._record_limit = RateLimit(RECORD_MIN_INTERVAL_MS)  # ECUs answering one by one
        self._closed = False
        self._local_in: queue.SimpleQueue[_Local] = queue.SimpleQueue()
        self._local: dict[str, _Local] = {}
        self._local_n = 0

    @property
    def busy(self) -> bool:
        return bool(self.scheduler.jobs) or not self._local_in.empty()

    def ask(self, name: str, params: dict, timeout_s: float = 30.0) -> dict:
        """Run diag.read_dtcs / clear_dtcs / read_data for a local tool (any thread, e.g. the
        control socket's): the same scheduler, preconditions and spacing as a remote command,
        but the answer goes back to the caller only. Returns the §7-like status as a dict."""
        local = _Local(name, dict(params))
        self._local_in.put(local)
        if not local.done.wait(timeout_s):
            return {"status": "TIMED_OUT", "reason": "NO_RESPONSE",
                    "detail": f"no answer within {timeout_s:.0f} s"}
        st = local.status
        out = {"status": st.status}
        for key in ("reason", "detail", "result"):
            if getattr(st, key) is not None:
                out[key] = getattr(st, key)
        return out

    def _take_local(self, now_ms: int) -> list[Status]:
        out = []
        while True:
            try:
                local = self._local_in.get_nowait()
            except queue.Empty:
                return out
            self._local_n += 1
            cid = f"local-{self._local_n}"
            self._local[cid] = local
            try:
                D.check_params(local.name, local.params)
            except AgentError as e:
                out.append(Status(cid, "REJECTED", "BAD_PARAMS", str(e)))
                continue
            out += self.scheduler.submit(cid, local.name, local.params, now_ms)

    def _answer_local(self, statuses: list[Status]) -> list[Status]:
        """Local statuses go to their caller; the rest to the command service."""
        if not self._local:
            return statuses
        out = []
        for st in statuses:
            local = self._local.get(st.id)
            if local is None:
                out.append(st)
            elif st.terminal:
                del self._local[st.id]
                local.status = st
                local.done.set()
        return out

    # -- Handler --------------------------------------------------------------------------

    def handle(self, cmd, now_ms: int) -> list[Status]:
        out = self.scheduler.submit(cmd.id, cmd.name, dict(cmd.params), now_ms)
        self.counters[f"{cmd.name}"] += 1
        return out + self.poll(now_ms)

    def poll(self, now_ms: int) -> list[Status]:
        if self._closed:
            return []
        return self._answer_local(self._take_local(now_ms) + self._poll(now_ms))

    def _poll(self, now_ms: int) -> list[Status]:
        if not self._ready():
            # No transport (a bus that cannot be opened): every request fails at once, so
            # commands end and periodic work backs off.
            statuses: list[Status] = []
            for out in self.scheduler.poll(now_ms):
                if isinstance(out, D.Request):
                    out = self.scheduler.done(out.token, D.Result(False, error=BUS_DOWN), now_ms)
                    statuses += [s for s in out if isinstance(s, Status)]
                else:
                    statuses.append(out)
            return statuses
        statuses = []
        while True:
            try:
                token, result = self._results.get_nowait()
            except queue.Empty:
                break
            for out in self.scheduler.done(token, result, now_ms):
                if isinstance(out, D.Values):
                    self.core.feed_values(out.t_ms / 1000, out.values)
                else:
                    statuses.append(out)
        for out in self.scheduler.poll(now_ms):
            if isinstance(out, D.Request):
                self.counters["requests"] += 1
                self._workers[out.ecu].inbox.put(out)
            else:
                statuses.append(out)
        if self.scheduler.store.changed:
            self.scheduler.store.changed = False
            self._record_limit.want()
        if self._record_limit.due(now_ms) and self.publish is not None:
            self.publish(self.scheduler.store.payload(self.vin, now_ms))
            self.records += 1
        return statuses

    def running(self, command_id: str) -> bool:
        return self.scheduler.running(command_id)

    def status(self) -> dict:
        out = {"ecus": self.scheduler.status(), "records": self.records,
               "counters": {f"diag.{k}": v for k, v in sorted(self.counters.items())}}
        if self.open_error:
            out["error"] = self.open_error
        return out

    def close(self) -> None:
        self._closed = True
        while not self._local_in.empty():
            local = self._local_in.get_nowait()
            self._local[f"closed-{id(local)}"] = local
        for cid, local in self._local.items():  # nobody waits for an answer that cannot come
            local.status = Status(cid, "FAILED", "INTERNAL_ERROR", "the agent is stopping")
            local.done.set()
        self._local.clear()
        for w in self._workers.values():
            w.stop()
        until = time.monotonic() + STOP_WAIT_S  # a request in flight may take P2* or longer:
        for w in self._workers.values():  # the threads are daemons, stopping does not wait
            w.join(until)
        for b in self._buses:
            b.close()

    # -- the transport --------------------------------------------------------------------

    def _ready(self) -> bool:
        if self._workers:
            return True
        if self._links is None:
            if time.monotonic() < self._next_open:
                return False
            from ..adapters.diag import open_buses

            try:
                opened = open_buses(self.config)
            except AgentError as e:
                # A configuration that cannot work is not retried; a bus that is down is.
                self._next_open = float("inf") if isinstance(e, ConfigError) else \
                    time.monotonic() + REOPEN_S
                if str(e) != self.open_error:
                    log.error("diagnostics off: %s", e)
                self.open_error = str(e)
                return False
            self._links, self._buses = opened["links"], opened["buses"]
            self.open_error = ""
        for name, link in self._links.items():
            self._workers[name] = _Worker(name, link.execute, self._results)
        return True
