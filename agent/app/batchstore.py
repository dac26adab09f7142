"""Signing and storing closed telemetry batches on a thread of their own (and the other
work of the core loop that waits for the outbox: the status file, `call`).

The core thread closes a batch; encoding, signing and the outbox's durable commit (an fsync,
milliseconds on flash, far more on a worn card) happen here, so a pass of the core loop never
waits for the disk and commands are not held behind a commit. Batches are taken in order;
the lane is bounded: when the store falls that far behind (a disk that stopped answering) a
further batch is not kept, and its samples are counted and reported in the next batch's
`drop`, as when the outbox refuses one.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

from ..core.batch import Batch

log = logging.getLogger("agent.runtime")

LANE = 32  # closed batches waiting (about half a minute of telemetry at one batch a second)


class BatchStore:
    def __init__(self, sink: Callable[[Batch], None], lost: Callable[[int], None],
                 lane: int = LANE):
        self.sink = sink  # signs and stores one batch (Publisher.batch)
        self.lost = lost  # samples of a batch not kept (Publisher.skipped)
        self._q: queue.Queue[Batch | Callable[[], None] | None] = queue.Queue(lane)
        self._thread: threading.Thread | None = None
        self.stored = 0
        self.refused = 0  # batches not kept because the lane was full
        self.failures = 0  # batches the sink raised on (the sink counts their samples)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="store", daemon=True)
        self._thread.start()

    def put(self, batch: Batch) -> None:
        """From the core thread; never blocks."""
        if self._thread is None:  # not started (tests, replay): store in the caller's thread
            self._store(batch)
            return
        try:
            self._q.put_nowait(batch)
        except queue.Full:
            self.refused += 1
            self.lost(batch.samples)
            log.error("%d closed batches wait for the outbox; batch of %d samples not kept",
                      self._q.qsize(), batch.samples)

    def call(self, fn: Callable[[], None]) -> None:
        """Run fn on the store's thread after what is queued; skipped when the lane is full
        (work that is redone anyway: the status file)."""
        try:
            self._q.put_nowait(fn)
        except queue.Full:
            pass

    @property
    def running(self) -> bool:
        return self._thread is not None

    def stop(self, timeout: float = 10.0) -> None:
        """Store what is queued, then end the thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._q.put(None)
        thread.join(timeout)
        if thread.is_alive():
            log.error("the batch store did not finish within %.0f s", timeout)

    @property
    def waiting(self) -> int:
        return self._q.qsize()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if isinstance(item, Batch):
                self._store(item)
                continue
            try:
                item()
            except Exception:  # noqa: BLE001 - the caller's own errors are its to report
                log.exception("store thread call failed")

    def _store(self, batch: Batch) -> None:
        try:
            self.sink(batch)
            self.stored += 1
        except Exception:  # noqa: BLE001 - a disk full or a bug must not end the thread
            self.failures += 1
            log.exception("batch sink failed")
