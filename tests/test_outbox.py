"""Tests of the SQLite outbox against real database files (no mocks)."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.adapters.outbox import Outbox, Row

ROOT = Path(__file__).resolve().parents[1]
TOPIC = "vehicles/VIN1/telemetry"


class Builder:
    """A build(seq, drop) callback that records its calls and makes a payload of a given size."""

    def __init__(self, size: int = 32):
        self.size = size
        self.calls: list[tuple[int, int]] = []

    def __call__(self, seq: int, drop: int) -> bytes:
        self.calls.append((seq, drop))
        head = b"seq=%d drop=%d;" % (seq, drop)
        return head + b"." * max(0, self.size - len(head))


def seqs(ob: Outbox) -> list[int]:
    return [r.seq for r in ob.peek(1_000_000) if r.kind == "telemetry"]


def test_files_and_pragmas(tmp_path):
    ob = Outbox(tmp_path / "new" / "dir")
    ob.append_telemetry(Builder(), 1, 0, TOPIC)
    # synchronous is per connection, so it can only be read through the outbox's own one.
    assert ob._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    ob.close()
    assert (tmp_path / "new" / "dir" / "outbox.db").is_file()
    with sqlite3.connect(tmp_path / "new" / "dir" / "outbox.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_delivery_order_is_insertion_order(tmp_path):
    with Outbox(tmp_path) as ob:
        ob.append("response", "r", b"r1", 5)
        ob.append_telemetry(Builder(), 1, 1, TOPIC)
        ob.append("state", "s", b"s1", 3)
        ob.append("status", "st", b"on", 4)
        ob.append_telemetry(Builder(), 1, 2, TOPIC)
        ob.append("response", "r", b"r2", 1)
        rows = ob.peek(100)
        assert [r.kind for r in rows] == ["response", "telemetry", "state", "status", "telemetry",
                                          "response"]
        assert [r.created_ms for r in rows] == [5, 1, 3, 4, 2, 1]
        assert [r.seq for r in rows] == [None, 1, None, None, 2, None]
        assert rows[0] == Row(rows[0].id, "response", "r", b"r1", None, 5)
        # Paging with limit and after_id walks the same order.
        first, second = ob.peek(4), ob.peek(4, after_id=ob.peek(4)[-1].id)
        assert first + second == rows
        assert ob.peek(10, after_id=rows[-1].id) == []
        with pytest.raises(ValueError):
            ob.append("telemetry", TOPIC, b"x", 0)  # telemetry needs a seq: append_telemetry


def test_seq_has_no_gaps_across_close_and_reopen(tmp_path):
    build = Builder()
    for session in range(4):
        with Outbox(tmp_path, reserve_block=3) as ob:  # small block: reserve rewritten often
            for _ in range(5):
                ob.append_telemetry(build, 1, 0, TOPIC)
    with Outbox(tmp_path, reserve_block=3) as ob:
        assert seqs(ob) == list(range(1, 21))
        assert ob.stats()["next_seq"] == 21
        assert [r.payload for r in ob.peek(2)] == [b"seq=1 drop=0;" + b"." * 19,
                                                   b"seq=2 drop=0;" + b"." * 19]
    assert [s for s, _ in build.calls] == list(range(1, 21))


def test_failed_build_consumes_no_seq(tmp_path):
    with Outbox(tmp_path) as ob:
        ob.append_telemetry(Builder(), 1, 0, TOPIC)

        def broken(seq, drop):
            raise RuntimeError("signing key unavailable")

        with pytest.raises(RuntimeError):
            ob.append_telemetry(broken, 1, 0, TOPIC)
        assert ob.append_telemetry(Builder(), 1, 0, TOPIC) == 2
        assert seqs(ob) == [1, 2]


CHILD = r"""
import sys
from agent.adapters.outbox import Outbox
ob = Outbox(sys.argv[1], max_bytes=1 << 30, reserve_block=7)
n = 0
while True:
    seq = ob.append_telemetry(lambda s, d: b"batch %d;" % s + bytes(700), 1, n, "v/V/telemetry")
    sys.stdout.write(f"{seq}\n")
    sys.stdout.flush()
    n += 1
"""


def test_kill_9_loses_no_committed_seq_and_reuses_none(tmp_path):
    printed_before: list[int] = []
    stored_before = 0
    for round_no in range(3):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        printed: list[int] = []
        try:
            while len(printed) < 150 + 41 * round_no:  # kill at a different point each round
                line = proc.stdout.readline()
                assert line, f"child died: {proc.stderr.read().decode()}"
                printed.append(int(line))
        finally:
            proc.send_signal(signal.SIGKILL)
        tail = proc.stdout.read()  # lines written before the kill are still in the pipe
        printed += [int(x) for x in tail.split(b"\n")[:-1]]  # complete lines only
        proc.wait()
        assert proc.returncode == -signal.SIGKILL

        with Outbox(tmp_path, max_bytes=1 << 30, reserve_block=7) as ob:
            stored = seqs(ob)
            # Nothing was lost, so the store is exactly 1..N: no gap, no duplicate.
            assert stored == list(range(1, len(stored) + 1))
            assert set(printed_before + printed) <= set(stored)
            assert ob.stats()["next_seq"] == stored[-1] + 1 > max(printed)
        # Each child continued right after the last seq committed before it (printed or not).
        assert printed[0] == stored_before + 1
        assert not set(printed) & set(printed_before)
        printed_before += printed
        stored_before = stored[-1]


def test_lost_database_continues_above_reserve(tmp_path):
    with Outbox(tmp_path, reserve_block=10) as ob:
        for _ in range(25):
            ob.append_telemetry(Builder(), 1, 0, TOPIC)
    for name in ("outbox.db", "outbox.db-wal", "outbox.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    with Outbox(tmp_path, reserve_block=10) as ob:
        # Reserved blocks were [1,11), [11,21), [21,31): the fresh db starts above all of them.
        assert ob.stats()["next_seq"] == 31
        assert ob.append_telemetry(Builder(), 1, 0, TOPIC) == 31


def _remove_db(path):
    for name in ("outbox.db", "outbox.db-wal", "outbox.db-shm"):
        (path / name).unlink(missing_ok=True)


def test_unreadable_reserve_and_lost_database_continue_from_the_mirror(tmp_path):
    with Outbox(tmp_path, reserve_block=10) as ob:
        for _ in range(25):
            ob.append_telemetry(Builder(), 1, 0, TOPIC)
    (tmp_path / "seq.reserve").write_text("{not json")
    _remove_db(tmp_path)
    with Outbox(tmp_path, reserve_block=10) as ob:
        assert ob.append_telemetry(Builder(), 1, 0, TOPIC) == 31  # from seq.mirror
        assert not ob.stats()["seq_from_clock"]


def test_both_marks_and_database_gone_continue_from_the_clock(tmp_path, caplog):
    """The double storage fault: no seq of an earlier run is ever reused."""
    with Outbox(tmp_path, reserve_block=10) as ob:
        for _ in range(25):
            ob.append_telemetry(Builder(), 1, 0, TOPIC)
    (tmp_path / "seq.reserve").write_text("{not json")
    (tmp_path / "seq.mirror").unlink()
    (tmp_path / "status.json").write_text("{}")  # the agent ran here
    _remove_db(tmp_path)
    before = time.time_ns() // 1_000_000
    with caplog.at_level(logging.ERROR, logger="agent.outbox"):
        with Outbox(tmp_path, reserve_block=10) as ob:
            seq = ob.append_telemetry(Builder(), 1, 0, TOPIC)
            assert seq >= before and ob.stats()["seq_from_clock"]
    assert any("continues from the clock" in r.getMessage() for r in caplog.records)
    with Outbox(tmp_path, reserve_block=10) as ob:  # and it is a mark again from then on
        assert ob.append_telemetry(Builder(), 1, 0, TOPIC) == seq + 1


def test_corrupt_database_without_marks_continues_from_the_clock(tmp_path):
    with Outbox(tmp_path, reserve_block=10) as ob:
        for _ in range(5):
            ob.append_telemetry(Builder(), 1, 0, TOPIC)
    (tmp_path / "seq.reserve").unlink()
    (tmp_path / "seq.mirror").unlink()
    for name in ("outbox.db-wal", "outbox.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    (tmp_path / "outbox.db").write_bytes(b"garbage" * 1000)
    before = time.time_ns() // 1_000_000
    with Outbox(tmp_path, reserve_block=10) as ob:
        assert ob.append_telemetry(Builder(), 1, 0, TOPIC) >= before


def test_empty_directory_is_a_first_start(tmp_path):
    with Outbox(tmp_path / "new") as ob:
        assert ob.append_telemetry(Builder(), 1, 0, TOPIC) == 1
        assert not ob.stats()["seq_from_clock"]


def test_reserve_is_written_once_per_block(tmp_path):
    reserve = tmp_path / "seq.reserve"
    writes, last_inode = 0, None
    with Outbox(tmp_path, reserve_block=10) as ob:
        for _ in range(25):
            ob.append_telemetry(Builder(), 1, 0, TOPIC)
            inode = reserve.stat().st_ino  # each atomic write replaces the inode
            writes += inode != last_inode
            last_inode = inode
    assert writes == 3  # seqs 1, 11 and 21 each reserved a block


def test_eviction_drops_oldest_telemetry_and_reports_drop(tmp_path, caplog):
    build = Builder(size=300)
    with Outbox(tmp_path, max_bytes=1000) as ob:
        for samples in (10, 11, 12):
            ob.append_telemetry(build, samples, 0, TOPIC)
        assert seqs(ob) == [1, 2, 3]  # 900 bytes: within budget
        ob.append_telemetry(build, 13, 0, TOPIC)  # 1200 bytes: seq 1 (10 samples) goes
        assert seqs(ob) == [2, 3, 4]
        ob.append_telemetry(build, 14, 0, TOPIC)  # seq 2 (11 samples) goes
        assert build.calls == [(1, 0), (2, 0), (3, 0), (4, 0), (5, 10)]
        ob.append_telemetry(build, 15, 0, TOPIC)  # seq 3 (12 samples) goes
        assert build.calls[-1] == (6, 11)
        assert seqs(ob) == [4, 5, 6]
        s = ob.stats()
        assert (s["evicted_batches"], s["dropped_samples"], s["pending_drop"]) == (3, 33, 12)
        assert s["bytes"] == 900

        # Responses are never evicted: telemetry makes room, then the outbox stays over budget.
        with caplog.at_level(logging.WARNING, logger="agent.outbox"):
            for i in range(4):
                ob.append("response", "r", bytes([i]) * 400, 0)
        assert [r.kind for r in ob.peek(100)] == ["response"] * 4
        assert [r.payload[0] for r in ob.peek(100)] == [0, 1, 2, 3]
        s = ob.stats()
        assert s["bytes"] == 1600 > s["max_bytes"]
        assert (s["evicted_batches"], s["dropped_samples"]) == (6, 33 + 13 + 14 + 15)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "over its budget" in warnings[0].getMessage()

        # The next batch reports everything lost since the last batch that was delivered:
        # the evicted batches' own samples and the drops they were carrying (seq 5 carried
        # seq 1's 10, seq 6 carried seq 2's 11), i.e. every sample of seq 1..6.
        ob.append_telemetry(build, 16, 0, TOPIC)
        assert build.calls[-1] == (7, 12 + 13 + (14 + 10) + (15 + 11))
        assert build.calls[-1][1] == 10 + 11 + 12 + 13 + 14 + 15
    with Outbox(tmp_path, max_bytes=1000) as ob:  # counters are durable
        s = ob.stats()
        # seq 7 itself did not fit beside the responses: its 16 and its 75 are pending
        assert (s["evicted_batches"], s["dropped_samples"], s["pending_drop"]) == (7, 91, 91)
        assert [r.kind for r in ob.peek(100)] == ["response"] * 4


def drop_of(payload: bytes) -> int:
    return int(payload.split(b"drop=", 1)[1].split(b";", 1)[0])


def test_samples_lost_before_the_outbox_are_carried_on_when_their_batch_is_evicted(tmp_path):
    """extra_drop (samples that never reached the outbox) is stored with its batch: when that
    batch is evicted, the loss moves on to the next batch, so nothing is lost from the count."""
    build = Builder(size=300)
    with Outbox(tmp_path, max_bytes=1000) as ob:
        ob.append_telemetry(build, 5, 0, TOPIC, extra_drop=100)  # seq 1 reports 100
        assert build.calls == [(1, 100)]
        assert ob.stats()["dropped_samples"] == 100
        delivered = 0
        for i in range(8):  # seq 1 (and others) evicted; deliver some rows on the way
            ob.append_telemetry(build, 5, 0, TOPIC, extra_drop=3 if i == 4 else 0)
            if i in (2, 6):
                row = ob.peek(1)[0]
                delivered += drop_of(row.payload)
                ob.ack(row.id)
        for row in ob.peek(100):
            delivered += drop_of(row.payload)
            ob.ack(row.id)
        s = ob.stats()
        lost = 100 + 3 + 5 * s["evicted_batches"]
        assert s["evicted_batches"] >= 3 and s["dropped_samples"] == lost
        assert delivered + s["pending_drop"] == lost
        with pytest.raises(ValueError):
            ob.append_telemetry(build, 1, 0, TOPIC, extra_drop=-1)


def test_state_and_status_replace_unsent_rows_of_same_topic(tmp_path):
    with Outbox(tmp_path) as ob:
        ob.append("state", "v/A/state", b"old", 1)
        ob.append("status", "v/A/status", b"online", 2)
        ob.append("state", "v/B/state", b"other", 3)
        ob.append("response", "v/A/responses", b"r", 4)
        ob.append("response", "v/A/responses", b"r", 5)  # responses are never merged
        ob.append("state", "v/A/state", b"new", 6)
        rows = ob.peek(10)
        assert [(r.kind, r.payload) for r in rows] == [
            ("status", b"online"), ("state", b"other"), ("response", b"r"), ("response", b"r"),
            ("state", b"new")]
        assert ob.stats()["bytes"] == 6 + 5 + 1 + 1 + 3
        assert ob.ack(rows[0].id) is True


def test_ack_deletes_and_tracks_last_acked_seq(tmp_path):
    with Outbox(tmp_path) as ob:
        for _ in range(5):
            ob.append_telemetry(Builder(), 1, 0, TOPIC)
        ob.append("response", "r", b"x", 0)
        rows = ob.peek(10)
        assert ob.ack(rows[1].id) is True
        assert ob.ack(rows[1].id) is False  # already gone
        assert ob.stats()["last_acked_seq"] == 2
        assert ob.ack_many([rows[3].id, rows[0].id, 99999]) == 2  # out of order: keep the max
        assert ob.stats()["last_acked_seq"] == 4
        assert ob.ack(rows[5].id) is True  # a response has no seq
        assert [r.id for r in ob.peek(10)] == [rows[2].id, rows[4].id]
    with Outbox(tmp_path) as ob:
        s = ob.stats()
        assert (s["last_acked_seq"], s["messages"], s["bytes"]) == (4, 2, 64)


@pytest.mark.parametrize("damage", ["garbage", "broken_pages", "index_page"])
def test_corrupt_database_is_moved_aside_and_replaced(tmp_path, caplog, damage):
    with Outbox(tmp_path, reserve_block=10) as ob:
        for _ in range(5):
            ob.append_telemetry(Builder(size=2000), 1, 0, TOPIC)
    db = tmp_path / "outbox.db"
    if damage == "garbage":
        db.write_bytes(b"this is not an sqlite database\n" * 300)
    elif damage == "broken_pages":  # valid header, every b-tree page destroyed
        data = db.read_bytes()
        db.write_bytes(data[:4096] + b"\xff" * (len(data) - 4096))
    else:  # only the index is damaged: reading the table never notices, quick_check does
        conn = sqlite3.connect(db)
        root = conn.execute("SELECT rootpage FROM sqlite_master"
                            " WHERE type = 'index' AND tbl_name = 'messages'").fetchone()[0]
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.close()
        data = bytearray(db.read_bytes())
        data[(root - 1) * page:root * page] = b"\xff" * page
        db.write_bytes(bytes(data))
    damaged = db.read_bytes()

    with caplog.at_level(logging.ERROR, logger="agent.outbox"):
        ob = Outbox(tmp_path, reserve_block=10)
    aside = list(tmp_path.glob("outbox.db.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == damaged
    errors = [r for r in caplog.records if r.name == "agent.outbox" and r.levelno == logging.ERROR]
    assert len(errors) == 1 and str(aside[0]) in errors[0].getMessage()

    s = ob.stats()
    assert (s["messages"], s["recovered_corruptions"]) == (0, 1)
    seq = ob.append_telemetry(Builder(), 1, 0, TOPIC)
    assert seq > 5 and seq == 11  # the reserve's high-water mark
    assert [r.seq for r in ob.peek(10)] == [11]
    ob.close()
    with Outbox(tmp_path) as ob:  # the fresh database is a healthy one: no second recovery
        assert seqs(ob) == [11]
        assert ob.stats()["recovered_corruptions"] == 1
    assert len(list(tmp_path.glob("outbox.db.corrupt-*"))) == 1


def test_corruption_during_use_recovers(tmp_path, caplog):
    with Outbox(tmp_path) as ob:  # ~6 MB: more than SQLite's default 2 MB page cache
        for _ in range(3000):
            ob.append_telemetry(Builder(size=2000), 1, 0, TOPIC)
    ob = Outbox(tmp_path)
    assert ob.stats()["messages"] == 3000
    last_id = ob.peek(1, after_id=2999)[0].id
    db = tmp_path / "outbox.db"
    data = db.read_bytes()
    db.write_bytes(data[:4096] + b"\xff" * (len(data) - 4096))  # damaged under a live connection

    with caplog.at_level(logging.ERROR, logger="agent.outbox"):
        rows = ob.peek(10)  # reads pages no longer cached: SQLite reports corruption
    assert rows == []
    assert len(list(tmp_path.glob("outbox.db.corrupt-*"))) == 1
    assert any("corrupt" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    build = Builder()
    assert ob.append_telemetry(build, 1, 0, TOPIC) == 3001
    assert build.calls == [(3001, 3000)]  # the 3000 samples lost with the file are reported
    new = ob.peek(10)
    assert new[0].id > last_id  # an uplink paging with after_id does not skip the new row
    assert ob.stats()["recovered_corruptions"] == 1
    ob.close()


def test_telemetry_lost_with_a_corrupt_file_is_reported_as_drop(tmp_path):
    """The queued samples and carried drops (kept up to date on append, evict, ack and
    replace) of a database lost to corruption during use become the next batch's drop."""
    build = Builder(size=200)
    with Outbox(tmp_path, max_bytes=610) as ob:
        for _ in range(6):  # seq 1..3 evicted: seq 5, 6 carry their drops, 10 pending
            ob.append_telemetry(build, 10, 0, TOPIC)
        ob.append_telemetry(build, 10, 0, TOPIC, extra_drop=4)  # seq 4 evicted, seq 7 carries
        ob.append("state", "s", b"a", 0)
        ob.append("state", "s", b"b", 0)  # replaces the first: no samples involved
        assert seqs(ob) == [5, 6, 7]
        row = ob.peek(1)[0]  # seq 5: delivered with its 10 samples and its drop
        delivered = 10 + drop_of(row.payload)
        ob.ack(row.id)
        with ob._lock:  # as _guarded does on SQLITE_CORRUPT
            ob._recover(sqlite3.DatabaseError("simulated corruption during use"))
        assert ob.append_telemetry(build, 1, 0, TOPIC) == 1001  # the reserve high-water mark
        # every sample of seq 1..7 (and the 4 lost before seq 7) is delivered or in this drop
        assert delivered + build.calls[-1][1] == 7 * 10 + 4
        assert ob.stats()["dropped_samples"] == 7 * 10 + 4 - 10


def test_stats_values(tmp_path):
    with Outbox(tmp_path, max_bytes=5000) as ob:
        s = ob.stats()
        assert s == {"messages": 0, "bytes": 0, "max_bytes": 5000, "oldest_ms": None,
                     "by_kind": {"telemetry": 0, "state": 0, "status": 0, "response": 0},
                     "next_seq": 1, "last_acked_seq": 0, "pending_drop": 0, "evicted_batches": 0,
                     "dropped_samples": 0, "recovered_corruptions": 0,
                     "seq_from_clock": False}
        ob.append_telemetry(Builder(size=100), 7, 2_000, TOPIC)
        ob.append_telemetry(Builder(size=150), 7, 3_000, TOPIC)
        ob.append("state", "s", b"s" * 10, 1_500)
        ob.append("status", "st", b"t" * 20, 4_000)
        ob.append("response", "r", b"r" * 30, 5_000)
        ob.ack(ob.peek(1)[0].id)
        s = ob.stats()
        assert s["messages"] == 4 and s["bytes"] == 150 + 10 + 20 + 30
        assert s["oldest_ms"] == 1_500
        assert s["by_kind"] == {"telemetry": 1, "state": 1, "status": 1, "response": 1}
        assert (s["next_seq"], s["last_acked_seq"]) == (3, 1)


def test_backlog_drains_in_order_with_batched_acks(tmp_path):
    payload = os.urandom(3000)
    with Outbox(tmp_path) as ob:
        for i in range(3600):  # one hour of 1 Hz batches, 1-3 KB each
            ob.append_telemetry(lambda s, d, n=1000 + (i * 37) % 2000: payload[:n], 50, i, TOPIC)
        drained, after, started = [], None, time.perf_counter()
        while rows := ob.peek(200, after):
            drained += [r.seq for r in rows]
            after = rows[-1].id
            assert ob.ack_many([r.id for r in rows]) == len(rows)
        rate = len(drained) / (time.perf_counter() - started)
        print(f"drained {len(drained)} rows at {rate:.0f} msgs/s")  # a figure, not an assertion
        assert drained == list(range(1, 3601))
        s = ob.stats()
        assert (s["messages"], s["bytes"], s["last_acked_seq"]) == (0, 0, 3600)


def test_concurrent_appends_and_drain_from_two_threads(tmp_path):
    ob = Outbox(tmp_path)
    total, done, received, failures = 1500, threading.Event(), [], []

    def producer():
        try:
            for i in range(total):
                if i % 10 == 0:
                    ob.append_telemetry(lambda s, d, i=i: b"%d" % i, 1, i, TOPIC)
                else:
                    ob.append("response", "r", b"%d" % i, i)
        except Exception as e:  # surfaced by the assertion below
            failures.append(e)
        finally:
            done.set()

    def consumer():
        after = None
        try:
            while True:
                rows = ob.peek(50, after)
                if not rows:
                    if done.is_set() and not ob.peek(1, after):
                        return
                    time.sleep(0.0005)
                    continue
                received.extend(rows)
                after = rows[-1].id
                ob.ack_many([r.id for r in rows])
        except Exception as e:
            failures.append(e)

    threads = [threading.Thread(target=producer), threading.Thread(target=consumer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not failures
    assert [int(r.payload) for r in received] == list(range(total))
    assert [r.seq for r in received if r.kind == "telemetry"] == list(range(1, total // 10 + 1))
    assert ob.stats()["messages"] == 0
    ob.close()


# -- campaign priority and quotas (PROTOCOL.md §8) ----------------------------------------------

def test_backlog_goes_lower_priority_first_with_ascending_row_ids(tmp_path):
    with Outbox(tmp_path) as ob:
        ob.append_telemetry(Builder(), 1, 0, TOPIC)  # base telemetry: priority 5
        ob.append_telemetry(Builder(), 1, 0, TOPIC, priority=9, campaign="late")
        ob.append("response", "r", b"r1", 0)
        ob.append_telemetry(Builder(), 1, 0, TOPIC, priority=0, campaign="first")
        ob.append_telemetry(Builder(), 1, 0, TOPIC)
        urgent = ob.peek(10, urgent=True)
        assert [r.kind for r in urgent] == ["response"]
        rows = ob.peek(10)
        # the response handed out by the urgent pass keeps its place; then 0, the 5s, the 9
        assert [r.seq for r in rows] == [None, 3, 1, 4, 2]
        ids = [r.id for r in rows]
        assert ids == sorted(ids) and len(set(ids)) == 5  # the uplink's cursor keeps working
        assert ob.peek(10, after_id=ids[-1]) == []
        assert ob.peek(10, after_id=ids[1]) == rows[2:]
        assert ob.ack_many([r.id for r in rows]) == 5
        assert ob.stats()["messages"] == 0 and ob.stats()["last_acked_seq"] == 4


def test_a_row_appended_while_paging_is_handed_out_once(tmp_path):
    """The uplink pages with after_id; rows of any priority appended meanwhile are all
    handed out, each once, under ascending numbers."""
    import random

    rnd = random.Random(3)
    with Outbox(tmp_path) as ob:
        seen: list[int] = []
        after = 0
        for step in range(400):
            for _ in range(rnd.randint(0, 3)):
                ob.append_telemetry(Builder(), 1, 0, TOPIC, priority=rnd.randint(0, 9),
                                    campaign=rnd.choice([None, "a", "b"]))
            rows = ob.peek(rnd.randint(1, 4), after)
            for r in rows:
                assert r.id > after
                after = r.id
                seen.append(r.seq)
            if rows and rnd.random() < 0.5:
                ob.ack_many([r.id for r in rows])
        while rows := ob.peek(50, after):
            after = rows[-1].id
            seen += [r.seq for r in rows]
        assert sorted(seen) == list(range(1, ob.stats()["next_seq"]))


def test_a_campaign_quota_evicts_its_own_oldest_and_counts_the_drop(tmp_path):
    with Outbox(tmp_path) as ob:
        base = ob.append_telemetry(Builder(size=1000), 10, 0, TOPIC)
        for _ in range(4):
            ob.append_telemetry(Builder(size=1000), 7, 0, TOPIC, campaign="q", max_bytes=2500)
        assert ob.campaign_bytes() == {"q": 2000}
        assert seqs(ob) == [base, 4, 5]  # q's seq 2 and 3 evicted, base telemetry kept
        build = Builder()
        ob.append_telemetry(build, 1, 0, TOPIC)
        # seq 5 reported seq 2's 7 samples (evicted by seq 4), the next batch seq 3's
        assert [r.payload for r in ob.peek(10) if r.seq == 5] == [b"seq=5 drop=7;" + b"." * 987]
        assert build.calls == [(6, 7)]
        assert ob.stats()["evicted_batches"] == 2 and ob.stats()["dropped_samples"] == 14
        # a single batch over the quota goes too (the new row is included)
        ob.append_telemetry(Builder(size=3000), 3, 0, TOPIC, campaign="tiny", max_bytes=100)
        assert "tiny" not in ob.campaign_bytes()


def test_an_outbox_from_before_campaigns_is_migrated(tmp_path):
    with Outbox(tmp_path) as ob:
        ob.append_telemetry(Builder(), 1, 0, TOPIC)
    with sqlite3.connect(tmp_path / "outbox.db") as conn:
        conn.execute("DROP INDEX messages_priority")
        conn.execute("DROP INDEX messages_campaign")
        conn.execute("ALTER TABLE messages DROP COLUMN priority")
        conn.execute("ALTER TABLE messages DROP COLUMN campaign")
    with Outbox(tmp_path) as ob:
        ob.append_telemetry(Builder(), 1, 0, TOPIC, priority=0, campaign="c")
        assert seqs(ob) == [2, 1]
