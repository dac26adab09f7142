"""The runtime: wires the bus adapters to the telemetry core and owns the threads.

Threads: one reader per bus (adapters/canbus.py) pushes lists of frames into the frames lane
(one list per burst, at most one per 100 ms and bus, per 2 ms while a command waits for the
bus: the core loop tells the readers, `BusReader.set_busy`); the
MQTT thread screens each command message (CommandService.screen) and puts what passes into the
commands lane; the serial devices (values) and the update worker (events) use the other lane.
The items are declared in messages.py. Every lane is bounded: a full one drops what arrives and
counts it (status `lanes`), so no producer ever blocks and a flood on one lane cannot starve
another -- each core-loop pass takes at most DRAIN_MAX frames, COMMANDS_PER_PASS commands and
everything on the other lane. One core thread feeds them to the sans-I/O core and the services
(CommandService, UpdateService), ticks it with the wall clock and hands closed batches to the
batch sink. The core is only ever touched by the core thread.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable

from ..adapters.canbus import BusReader, check_interface, receive_filters
from ..adapters.sdnotify import Notifier, Watchdog
from ..adapters.statusfile import write_status
from .assemble import bus_plans, telemetry_core
from .batchstore import BatchStore
from ..config import Config
from ..core.batch import Batch
from .messages import CommandMessage, Frame, Values

if TYPE_CHECKING:
    from ..core.updates import UpdateEvent
    from .messages import CoreMessage

log = logging.getLogger("agent.app.runtime")

TICK_S = 0.1
DRAIN_MAX = 2048  # frames fed per wake-up before the core thread ticks again
FRAME_LANE = 100_000  # frames waiting for the core thread (~0.5 s at 200,000 frames/s; ~17 MB)
# (the lane holds lists of frames; the bound counts frames, under _lane_lock, once per list)
OTHER_LANE = 4096  # values waiting (update events are never dropped)
COMMANDS_PER_PASS = 16  # commands checked per pass: each may cost a signature check
_WAKE = None  # put on the frames lane to wake the core thread for another lane
STATUS_EVERY_S = 1.0
GIL_SWITCH_S = 0.001
STOP_DRAIN_S = 3.0  # on SIGTERM: how long to keep publishing what is queued
FAILING_PASSES_MAX = 100  # passes failing in a row before the watchdog pings stop
RESTART_EXIT_CODE = 75  # "restart me": after an update switched slots (systemd restarts on it)


class Agent:
    """The agent process: buses + core (+ uplink, commands ... as later parts attach)."""

    def __init__(self, config: Config, publish: bool = True,
                 on_batch: Callable[[Batch], None] | None = None):
        self.config = config
        self.publish = publish
        for i, bus in enumerate(config.bus):
            check_interface(bus, f"{config.path}: bus.{i}" if config.path else f"bus.{i}")
        self.plans = bus_plans(config, cache_dir=config.storage.dir / "dbc-cache")  # fast start
        self.core = telemetry_core(self.plans, config.telemetry, live=True)
        self.publisher = None
        if publish and config.mqtt is None and config.signing is not None:
            from ..adapters.keys import load_signing_key

            load_signing_key(config.signing)  # refuse to start on a bad key all the same
        if publish and config.mqtt is not None:
            from .publisher import Publisher  # paho and SQLite only where they are used

            self.publisher = Publisher(config)
        self.store = None  # signs and stores batches off the core thread (app/batchstore.py)
        if on_batch is None and self.publisher:
            self.store = BatchStore(self.publisher.batch, self.publisher.skipped)
            on_batch = self.store.put
        self.on_batch = on_batch or self._log_batch
        self._state_only = any(s.state for s in self.core.signals)
        self.commands = None
        self._reload_trust = threading.Event()
        self._status_wanted = threading.Event()  # the control socket asks for a fresh one
        # The frames lane is also the core thread's doorbell (it blocks on it).
        self._frames: queue.SimpleQueue[Frame | None] = queue.SimpleQueue()
        self._commands_lane: queue.SimpleQueue[CommandMessage] = queue.SimpleQueue()
        self._other: queue.SimpleQueue[CoreMessage] = queue.SimpleQueue()
        self.lane_dropped = {"frames": 0, "commands": 0, "other": 0}
        self._lane_frames = 0  # frames in the frames lane
        self._lane_lock = threading.Lock()
        self._command_lane_size = config.commands.lane_size if config.commands else 256
        writes = _written_buses(config, self.plans)  # power: the rest are listen-only
        self.readers = [
            BusReader(i, bus, self._enqueue,
                      receive_filters(plan.selected) if bus.filters else None,
                      listen_only=bus.listen_only if bus.listen_only is not None
                      else i not in writes)
            for i, (bus, plan) in enumerate(zip(config.bus, self.plans))
        ]
        self._readers_busy = False
        self.simulator = None
        self.updates = None
        if self.publisher and config.commands is not None:
            from .commandservice import CommandService

            if config.updates is not None:
                from .updateservice import UpdateService

                self.updates = UpdateService(config, self.core.lookup, self._put_event,
                                             clock=self.publisher.clock)
            from .families import handlers

            family_handlers = handlers(config, self.plans, self.core, self.readers,
                                       self.state_values, self.publisher.state, self.updates,
                                       self.health, publisher=self.publisher)
            self.commands = CommandService(config.commands, config.vehicle.vin,
                                           config.storage.dir, self.publisher, family_handlers)
            self.publisher.uplink.subscribe(self.publisher.topics.commands, self._on_command)
        elif config.diagnostics is not None:  # its service is the diag command family's handler
            log.warning("[diagnostics] needs [mqtt] and [commands] to run in the agent; "
                        "`tcu-agent diag --direct` works without them")
        self.serial = []  # the modem poller and GNSS reader: values into the core via the queue
        if config.modem is not None:
            from ..adapters.modem import ModemPoller, deadbands

            self.core.value_deadbands.update(deadbands(config.modem))
            self.serial.append(ModemPoller(config.modem, self._on_values))
        if config.gnss is not None:
            from ..adapters.gnss import GnssReader

            self.serial.append(GnssReader(config.gnss, self._on_gnss))
        self.notifier = Notifier()  # systemd sd_notify; a no-op without NOTIFY_SOCKET
        self.watchdog = Watchdog.from_env(self.notifier)
        self._init_power()
        self.batches_closed = 0
        self.core_failures = 0
        self._step_failures: dict[str, int] = {}
        self._failing_passes = 0  # core loop passes in a row that raised
        self.started_at = 0.0
        self._stop = threading.Event()
        self._stop_requested = threading.Event()  # run_forever returns when set
        self.restart_requested = False
        self._core_thread: threading.Thread | None = None
        self._rates: dict[int, tuple[float, int, float]] = {}
        self.control = None  # the local control socket (app/controltopics.py), from start()
        self.last_status: dict | None = None  # taken by the core thread, read by the socket

    def _enqueue(self, frames: list[Frame]) -> None:
        """One reader's burst: put whole, or dropped whole (counted) on a full lane."""
        with self._lane_lock:
            if self._lane_frames + len(frames) <= FRAME_LANE:
                self._lane_frames += len(frames)
                self._frames.put(frames)
            else:
                self.lane_dropped["frames"] += len(frames)

    def _feed_burst(self, frames: list[Frame]) -> None:
        with self._lane_lock:
            self._lane_frames -= len(frames)
        self.core.feed_many(frames)

    def _ring(self) -> None:
        if self._frames.qsize() < FRAME_LANE:  # a full frames lane: the core is awake anyway
            self._frames.put(_WAKE)

    def _on_values(self, t: float, values: dict) -> None:
        if self._other.qsize() < OTHER_LANE:
            self._other.put(Values(t, dict(values)))
            self._ring()
        else:
            self.lane_dropped["other"] += 1

    def _put_event(self, event: UpdateEvent) -> None:
        self._other.put(event)  # a handful per update: never dropped
        self._ring()

    # -- power (app/power.py): the parked car -----------------------------------------------

    def _init_power(self) -> None:
        from .power import LinkRecovery, PowerService

        self.power = None
        self.link_recovery = None
        self._gnss_next = 0.0
        modem = next((s for s in self.serial if s.thread_name == "modem"), None)
        if self.config.power is not None:
            self.power = PowerService(self.config.power, self.core, len(self.readers),
                                      publisher=self.publisher, notifier=self.notifier,
                                      modem=modem, deliver=self._deliver, now=time.time())
            actions = next((h for h in self.commands.handlers if h.family.name == "actions"),
                           None) if self.commands is not None else None
            if actions is not None:  # commands on a sleeping bus: wake it or refuse
                actions.executor.power = self.power.machine
                actions.executor.bus_names = [b.name for b in self.config.bus]
        if modem is not None and self.publisher is not None:
            uplink = self.publisher.uplink
            self.link_recovery = LinkRecovery(self.config.modem, modem,
                                              lambda: uplink.status()["state"] == "connected")

    def _on_gnss(self, t: float, values: dict) -> None:
        # Asleep or in protect: one fix per slow interval (a parked car that moves is news).
        if self.power is not None and self.power.slow:
            if t < self._gnss_next:
                return
            self._gnss_next = t + self.config.power.slow_poll_s
        self._on_values(t, values)

    def _on_command(self, topic: str, payload: bytes) -> None:
        # From the MQTT thread: the cheap screen here (no signature check), the decisions on
        # the core thread. Never blocks the MQTT thread.
        try:
            item = self.commands.screen(payload, int(time.time() * 1000))
        except Exception:  # a bug here must not stop the MQTT thread
            log.exception("command screening failed")
            return
        if item is None:
            return
        if self._commands_lane.qsize() < self._command_lane_size:
            self._commands_lane.put(item)
            self._ring()
        else:
            self.lane_dropped["commands"] += 1

    def reload_trust(self) -> None:
        """SIGHUP: the trust store is re-read by the core thread."""
        self._reload_trust.set()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self.started_at = time.time()
        self.core.tick(self.started_at)  # the agent's clock, before the first frame arrives
        sim = self.config.simulator
        if sim is not None and sim.enabled:
            from ..sim import from_config
            from ..sim.runner import SimulatorThread

            bus = self.config.bus_named(sim.bus) if sim.bus else self.config.bus[0]
            self.simulator = SimulatorThread(from_config(sim), bus.interface, bus.channel,
                                             **dict(bus.options)).start()
        if self.publisher:
            self.publisher.start()
        if self.store is not None:
            self.store.start()
        if self.updates is not None:  # an update interrupted or waiting to be confirmed
            now_ms = int(time.time() * 1000)
            self.commands.report(self.updates.start(now_ms), now_ms, "update")
        if self.commands is not None:  # commands cut off by the last stop end FAILED
            self.commands.recover(int(time.time() * 1000))
        for r in self.readers:
            r.start()
        for service in self.serial:
            service.start()
        self._core_thread = threading.Thread(target=self._core_loop, name="core", daemon=True)
        self._core_thread.start()
        if self.publish:
            from .controltopics import start_control
            self.control = start_control(self)

    def stop(self) -> None:
        """Stop reading, feed what was read, close the open batch."""
        if self.control:
            self.control.stop()
        for r in self.readers:
            r.stop()
        for service in self.serial:
            service.stop()
        if self.simulator:
            self.simulator.stop()
        self._stop.set()
        if self._core_thread:
            self._core_thread.join(5)
        self._drain()
        self.core.flush()
        self._deliver()
        if self.commands:
            for h in self.commands.handlers:  # campaigns: open captures go out
                getattr(h, "close", lambda: None)()
            self.commands.close()
        if self.updates is not None:
            self.updates.close()
        if self.store is not None:
            self.store.stop()  # every closed batch signed and stored before the uplink stops
        if self.publisher:
            left = self.publisher.stop(STOP_DRAIN_S)
            if left:
                log.info("%d message(s) left in the outbox for the next start", left)
        self._write_status(running=False)

    def run_forever(self) -> int:
        """Run until SIGTERM or SIGINT; exit status 0 on a clean stop, RESTART_EXIT_CODE when
        an update asked for a restart (systemd starts the agent again)."""
        stop = self._stop_requested

        def handler(signum, _frame):
            log.info("signal %s: stopping", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGHUP, lambda signum, frame: self.reload_trust())
        self.start()
        # READY=1 once every bus was tried (the outbox is open since __init__). A bus that is
        # down at boot counts as tried and keeps retrying in the background: systemd's start
        # timeout must not kill an agent whose car has a dead bus.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(r.state == "closed" for r in self.readers):
            time.sleep(0.02)
        opened = sum(r.state == "open" for r in self.readers)
        self.notifier.ready(f"{opened}/{len(self.readers)} bus(es) open")
        log.info("running: vin %s, %d bus(es), %d open, %d signals selected",
                 self.config.vehicle.vin, len(self.readers), opened, len(self.core.signals))
        # The databases, decoders and config are there for good: out of the collector's scans,
        # so that a full collection no longer walks them (it stalled the core thread 13-19 ms).
        # Collected first, so that start-up garbage is not kept for good with them.
        gc.collect()
        gc.freeze()
        # The core, reader and store threads share the GIL: a thread that wants it gets it
        # after at most this long (Python's default, 5 ms, was most of the core loop's p99).
        sys.setswitchinterval(GIL_SWITCH_S)
        while not stop.wait(self.watchdog.wait_s(1.0)):
            self.watchdog.ping()  # only while the core loop kicked within the interval
        self.notifier.stopping("stopping: publishing what is queued")
        self.stop()
        log.info("stopped: %d batches, %d samples", self.batches_closed, self.core.samples)
        if self.restart_requested:
            log.info("exiting with status %d: restart requested by the update", RESTART_EXIT_CODE)
            return RESTART_EXIT_CODE
        return 0

    # -- the core thread ------------------------------------------------------------------

    def _core_loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._core_loop_body()
                return
            except Exception:  # a bug outside the guarded steps: log, keep ingesting
                failures += 1
                self.core_failures += 1
                self._failing_passes += 1
                if failures <= 10 or failures % 1000 == 0:
                    log.exception("core loop iteration failed (%d so far); continuing", failures)
                if self._failing_passes == FAILING_PASSES_MAX:
                    log.error("the core loop has failed %d times in a row: no more watchdog "
                              "pings (systemd restarts the agent)", FAILING_PASSES_MAX)
                self._write_status(running=True)
                time.sleep(0.01)

    def _core_loop_body(self) -> None:
        next_tick = next_status = 0.0
        while not self._stop.is_set():
            # A stalled loop, or one that fails every pass, stops the watchdog pings.
            if self._failing_passes < FAILING_PASSES_MAX:
                self.watchdog.kick()
            busy = self.commands is not None and self.commands.busy
            if busy is not self._readers_busy:  # a command waits for the bus: hand frames
                self._readers_busy = busy  # over every 2 ms, not every 100
                for reader in self.readers:
                    reader.set_busy(busy)
            try:
                item = self._frames.get(timeout=0.01 if busy else TICK_S)
            except queue.Empty:
                item = None
            if item is not None:
                self._take(item)
            self._drain()
            now = time.time()
            if self.commands is not None:
                self._step("commands", self.commands.tick, int(now * 1000))
                if self._reload_trust.is_set():
                    self._reload_trust.clear()
                    self.commands.reload_trust()
                for handler in self.commands.handlers:
                    self._step(handler.family.name, self.commands.poll_family, handler,
                               int(now * 1000))
                if self.updates is not None:
                    self._check_restart()
            if now >= next_tick:
                if self.power is not None:  # first: a silent car quiets the core before
                    self._step("power", self.power.poll, now)  # its timeouts run
                self.core.tick(now)
                next_tick = now + TICK_S
                if self.publisher:
                    self._step("records", self._publish_records, int(now * 1000))
            if self.core.batches.closed:
                self._deliver()
            if now >= next_status or self._status_wanted.is_set():
                self._status_wanted.clear()
                next_status = now + STATUS_EVERY_S
                if self.link_recovery is not None:
                    self._step("link recovery", self.link_recovery.poll, int(now * 1000))
                self._write_status(running=True)
            self._failing_passes = 0  # a whole pass went through

    def _step(self, name: str, fn, *args) -> None:
        """Run one part of the loop; a failure (disk full, a bug) is logged and counted but
        does not keep the rest of the loop -- ingest, batches, the status file -- from running."""
        try:
            fn(*args)
        except Exception:
            self.core_failures += 1
            n = self._step_failures[name] = self._step_failures.get(name, 0) + 1
            if n <= 3 or n % 1000 == 0:
                log.exception("%s failed (%d times so far); the agent keeps running", name, n)

    def _check_restart(self) -> None:
        if self.updates.restart_requested and not self.restart_requested:
            self.restart_requested = True
            self._stop_requested.set()

    def health(self) -> tuple[bool, str]:
        """The post-update health check: every bus open and the broker reached."""
        closed = [r.cfg.name for r in self.readers if r.state != "open"]
        if closed:
            return False, f"bus(es) not open: {', '.join(closed)}"
        if self.publisher is None or self.publisher.uplink.status()["state"] != "connected":
            return False, "broker not reached"
        return True, ""

    def _publish_records(self, now_ms: int) -> None:
        pub = self.publisher
        pub.tick()
        if pub.take_connected():
            pub.online()
            self._state_record(now_ms)
        if self.core.state_changed:
            self.core.state_changed = False
            pub.state_limit.want()
        if pub.state_limit.due(now_ms):
            self._state_record(now_ms)

    def _state_record(self, now_ms: int) -> None:
        """A §4 state record: the values taken now, signed and stored on the batch store's
        thread (a record of every signal costs as much as a batch)."""
        values = self.state_values()
        if self.store is not None and self.store.running:
            self.store.call(lambda: self.publisher.state(values, now_ms))
        else:
            self.publisher.state(values, now_ms)

    def state_values(self) -> dict:
        """The §4 values: the signals marked `state`, or every signal if none is marked."""
        return self.core.snapshot(state_only=self._state_only)

    def fresh_status(self, timeout: float = 2.0) -> dict | None:
        """From any thread (the control socket): a status taken after this call, not the
        one of up to a second ago; the last one if the core loop does not answer in time."""
        asked_ms = int(time.time() * 1000)
        self._status_wanted.set()
        self._ring()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = self.last_status
            if last is not None and last.get("taken_ms", 0) >= asked_ms:
                return last
            time.sleep(0.01)
        return self.last_status

    def _write_status(self, running: bool) -> None:
        """The status file and the control socket's copy. Built here (the core thread owns
        what it reads); the outbox's counts are added and the file written on the batch
        store's thread, where they wait for a commit in progress rather than the core loop."""
        if not self.publish:
            return
        try:
            status = self.status(running, storage=False)
            status["taken_ms"] = int(time.time() * 1000)
        except Exception as e:  # a bug behind status(): never fatal
            log.warning("cannot take the status: %s", e)
            return
        if self.store is not None and self.store.running:
            self.store.call(lambda: self._store_status(status))
        else:
            self._store_status(status)

    def _store_status(self, status: dict) -> None:
        if self.publisher:
            try:
                status.update(self.publisher.storage_status())
            except Exception as e:  # a broken outbox: the rest of the status still goes out
                status["outbox"] = {"error": str(e)[:200]}
                log.warning("status: cannot read the outbox's counts: %s", e)
        try:
            self.last_status = {**status, "pid": os.getpid(), "written_ms": int(time.time() * 1000)}
            write_status(self.config.storage.dir, status)
        except Exception as e:  # disk full, a broken outbox behind status(): never fatal
            log.warning("cannot write the status file under %s: %s", self.config.storage.dir, e)

    def _drain(self) -> None:
        """One pass over the lanes: a bounded share of each (module docstring)."""
        get = self._frames.get_nowait
        frames: list[Frame] = []  # single frames go to the core in one call
        fed = 0  # at most about DRAIN_MAX frames per pass
        while fed < DRAIN_MAX:
            try:
                item = get()
            except queue.Empty:
                break
            if type(item) is list:  # a reader's burst, fed as it is
                self._feed_burst(item)
                fed += len(item)
            elif item is not _WAKE:
                frames.append(item)
                fed += 1
        if frames:
            self.core.feed_many(frames)
        for _ in range(self._other.qsize()):
            try:
                self._take(self._other.get_nowait())
            except queue.Empty:
                break
        for _ in range(COMMANDS_PER_PASS):
            try:
                self._take(self._commands_lane.get_nowait())
            except queue.Empty:
                break

    def _take(self, item: CoreMessage | None) -> None:
        if item is _WAKE:
            return
        if type(item) is list:
            self._feed_burst(item)
        elif type(item) is tuple:
            self.core.feed(*item)
        elif type(item) is Values:
            self.core.feed_values(item.t, item.values)
            if self.publisher is not None:
                self.publisher.gnss_values(item.values, int(item.t * 1000))
        elif type(item) is CommandMessage:
            if self.commands is not None:
                try:
                    self.commands.handle(item, int(time.time() * 1000))
                except Exception:  # a bug here must not stop ingest; the gate never raises
                    log.exception("command handling failed")
        elif self.updates is not None:  # the other kind: the update worker's UpdateEvent
            now_ms = int(time.time() * 1000)
            self.commands.report(self.updates.on_event(item, now_ms), now_ms, "update")

    def _deliver(self) -> None:
        for batch in self.core.take_batches():
            self.batches_closed += 1
            if self.power is not None and self.power.dropping:  # protect: not published
                self.power.dropped_samples += batch.samples
                if self.publisher is not None:
                    self.publisher.skipped(batch.samples)
                continue
            try:
                self.on_batch(batch)
            except Exception:  # a sink bug must not stop ingest
                log.exception("batch sink failed")

    @staticmethod
    def _log_batch(batch: Batch) -> None:
        log.debug("batch t0=%d: %d samples of %d signals", batch.t0, batch.samples, len(batch.sig))

    # -- views (any thread) ---------------------------------------------------------------

    def bus_status(self) -> list[dict]:
        out = []
        now = time.monotonic()
        for r, c in zip(self.readers, self.core.counters):
            frames = c.frames
            since = max(1e-3, time.time() - self.started_at)
            t_prev, f_prev, rate = self._rates.get(r.index, (now, frames, frames / since))
            if now - t_prev >= 0.5:
                rate = (frames - f_prev) / (now - t_prev)
                t_prev, f_prev = now, frames
            self._rates[r.index] = (t_prev, f_prev, rate)
            out.append({"name": c.name, **r.status(), **c.as_dict(), "fps": rate})
        return out

    def snapshot(self) -> dict:
        return self.core.snapshot()

    def status(self, running: bool = True, storage: bool = True) -> dict:
        out = {"vin": self.config.vehicle.vin, "running": running,
               "started_ms": int(self.started_at * 1000), "buses": self.bus_status(),
               "batches": self.batches_closed, "samples": self.core.samples,
               "core_failures": self.core_failures, "failures_by_step": dict(self._step_failures),
               "internal_errors": self.core.internal_errors,
               "future_frames": self.core.future_frames,
               "lanes": {"frames": {"depth": self._lane_frames,
                                    "dropped": self.lane_dropped["frames"]},
                         "commands": {"depth": self._commands_lane.qsize(),
                                      "dropped": self.lane_dropped["commands"]},
                         "other": {"depth": self._other.qsize(),
                                   "dropped": self.lane_dropped["other"]}}}
        if self.store is not None:  # closed batches waiting to be signed and stored
            out["lanes"]["batches"] = {"depth": self.store.waiting,
                                       "dropped": self.store.refused}
        if self.publisher:
            out.update(self.publisher.status(storage))
        if self.commands:
            out.update(self.commands.status())
        for service in self.serial:
            out[service.thread_name] = service.status()  # "modem", "gnss"
        if self.power is not None:
            out["power"] = self.power.status()
        if self.link_recovery is not None:
            out["link_recovery"] = self.link_recovery.status()
        return out


def _written_buses(config: Config, plans) -> set[int]:
    """Bus indexes we send on: a command action's frames and wake frames, and diagnostic
    requests (sent through the diagnostics' own connection to the bus)."""
    if config.commands is None:  # and diagnostics run in the agent only with [commands]
        return set()
    names = [b.name for b in config.bus]
    out = {names.index(e.bus or names[0]) for e in config.diagnostics.ecu} \
        if config.diagnostics is not None and config.mqtt is not None else set()
    from .assemble import action_plans

    return out | {fp.bus for plan in action_plans(config, plans).values()
                  for fp in (*plan.frames, *plan.wake)}
