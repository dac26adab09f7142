"""The batch store: closed batches signed and stored on a thread of their own, in order; a
full lane refuses a batch and counts its samples; stop() stores what is queued."""

from __future__ import annotations

import threading

from agent.app.batchstore import BatchStore
from agent.core.batch import Batch


def batch(n: int) -> Batch:
    return Batch(1000 + n, 1000 + n, {"x": [[0, n]]}, n)


def test_batches_and_calls_run_in_order_on_the_store_thread():
    done: list = []
    threads: set = set()

    def sink(b):
        threads.add(threading.current_thread().name)
        done.append(b.samples)

    store = BatchStore(sink, lost=lambda n: None)
    store.start()
    for i in range(1, 6):
        store.put(batch(i))
        if i == 3:
            store.call(lambda: done.append("status"))
    store.stop()
    assert done == [1, 2, 3, "status", 4, 5]
    assert threads == {"store"}
    assert store.stored == 5 and not store.running


def test_a_full_lane_refuses_the_batch_and_counts_its_samples():
    gate = threading.Event()
    lost: list[int] = []
    stored: list[int] = []

    def sink(b):
        gate.wait(10)  # a disk that stopped answering
        stored.append(b.samples)

    store = BatchStore(sink, lost=lost.append, lane=2)
    store.start()
    store.put(batch(1))  # taken by the thread, which blocks in the sink
    while store.waiting:
        pass
    store.put(batch(2))
    store.put(batch(3))  # the lane holds two
    store.put(batch(4))  # refused: counted, not kept
    store.call(lambda: stored.append(-1))  # work redone anyway: skipped, not blocking
    assert lost == [4] and store.refused == 1
    gate.set()
    store.stop()
    assert stored == [1, 2, 3]


def test_a_failing_sink_is_counted_and_the_next_batch_still_goes():
    stored: list[int] = []

    def sink(b):
        if b.samples == 2:
            raise OSError("disk full")
        stored.append(b.samples)

    store = BatchStore(sink, lost=lambda n: None)
    store.start()
    for i in (1, 2, 3):
        store.put(batch(i))
    store.stop()
    assert stored == [1, 3] and store.failures == 1


def test_not_started_it_stores_in_the_callers_thread():
    stored: list = []
    store = BatchStore(lambda b: stored.append(threading.current_thread().name), lambda n: None)
    store.put(batch(1))
    assert stored == [threading.current_thread().name]
