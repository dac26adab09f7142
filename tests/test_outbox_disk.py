"""What the outbox writes to flash, and that writing less kept its guarantees (real files)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from agent.adapters.outbox import Outbox
from agent.adapters.statusfile import read_status, write_status

ROOT = Path(__file__).resolve().parents[1]
TOPIC = "vehicles/VIN1/telemetry"
PAYLOAD = os.urandom(11_000)  # one batch at 4,000 frames/s: signed, compressed, incompressible


def build(seq: int, drop: int) -> bytes:
    return b"%d;" % seq + PAYLOAD


def committed(tmp_path: Path) -> list[int]:
    """Seqs a second connection sees: what is committed, not what the outbox holds open."""
    with sqlite3.connect(f"file:{tmp_path / 'outbox.db'}?mode=ro", uri=True) as db:
        return [s for (s,) in db.execute("SELECT seq FROM messages ORDER BY id")]


def test_new_database_small_pages_no_secure_delete_partial_indexes(tmp_path):
    with Outbox(tmp_path) as ob:
        assert ob._conn.execute("PRAGMA page_size").fetchone()[0] == 512
        assert ob._conn.execute("PRAGMA secure_delete").fetchone()[0] == 0
        assert ob._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        indexes = dict(ob._conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'"
                                        " AND tbl_name = 'messages'").fetchall())
    assert set(indexes) == {"messages_priority", "messages_urgent", "messages_campaign"}
    assert "WHERE" in indexes["messages_urgent"] and "WHERE" in indexes["messages_campaign"]


def test_full_indexes_of_an_earlier_outbox_are_replaced(tmp_path):
    with Outbox(tmp_path) as ob:
        ob.append_telemetry(build, 1, 0, TOPIC, campaign="c1", priority=2, max_bytes=1 << 20)
        ob.append("state", "vehicles/VIN1/state", b"s1", 0)
    with sqlite3.connect(tmp_path / "outbox.db") as db:  # as the earlier version made them
        db.execute("DROP INDEX messages_urgent")
        db.execute("DROP INDEX messages_campaign")
        db.execute("CREATE INDEX messages_kind ON messages(kind)")
        db.execute("CREATE INDEX messages_campaign ON messages(campaign)")
    with Outbox(tmp_path) as ob:
        indexes = dict(ob._conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'"
                                        " AND tbl_name = 'messages'").fetchall())
        assert set(indexes) == {"messages_priority", "messages_urgent", "messages_campaign"}
        assert "WHERE" in indexes["messages_campaign"]
        assert ob.campaign_bytes() == {"c1": len(PAYLOAD) + 2}
        ob.append("state", "vehicles/VIN1/state", b"s2", 0)  # replaces s1 through the index
        assert [r.payload for r in ob.peek(10, urgent=True)] == [b"s2"]


def test_wal_bytes_per_batch_stay_near_the_payload(tmp_path):
    """One batch appended, handed out and acked, like the live agent: the WAL grows by less
    than 1.4x the payload per batch (4 KiB pages, secure_delete and the full indexes made it
    about 9x)."""
    wal = tmp_path / "outbox.db-wal"
    with Outbox(tmp_path) as ob:
        for _ in range(5):  # pages allocated, freelist in use
            ob.append_telemetry(build, 1, 0, TOPIC)
            ob.ack_many([r.id for r in ob.peek(10)])
        ob.flush()
        ob._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert wal.stat().st_size == 0
        n = 20
        for _ in range(n):
            ob.append_telemetry(build, 1, 0, TOPIC)
            assert ob.ack_many([r.id for r in ob.peek(10)]) == 1
        grown = wal.stat().st_size
    assert grown / (n * len(PAYLOAD)) < 1.4, grown


def test_acks_are_held_until_the_next_durable_write(tmp_path):
    with Outbox(tmp_path) as ob:
        for _ in range(3):
            ob.append_telemetry(build, 1, 0, TOPIC)
        rows = ob.peek(10)
        assert ob.ack_many([rows[0].id]) == 1
        assert committed(tmp_path) == [1, 2, 3]  # held: not committed yet
        assert [r.seq for r in ob.peek(10)] == [2, 3]  # but gone for this outbox
        assert ob.stats()["messages"] == 2
        ob.append_telemetry(build, 1, 0, TOPIC)  # the next write commits the ack with it
        assert committed(tmp_path) == [2, 3, 4]
        assert ob.ack_many([rows[1].id]) == 1
    assert committed(tmp_path) == [3, 4]  # close commits held acks


def test_held_acks_are_committed_after_the_hold_time(tmp_path):
    with Outbox(tmp_path, ack_hold_s=0.05) as ob:
        ob.append_telemetry(build, 1, 0, TOPIC)
        ob.ack_many([r.id for r in ob.peek(10)])
        assert committed(tmp_path) == [1]
        time.sleep(0.1)
        ob.stats()  # any call after the hold time commits them
        assert committed(tmp_path) == []
        assert not ob._conn.in_transaction


def test_a_failed_write_keeps_the_held_acks(tmp_path):
    def broken(seq, drop):
        raise RuntimeError("signing failed")

    with Outbox(tmp_path) as ob:
        try:
            ob.append_telemetry(broken, 1, 0, TOPIC)
        except RuntimeError:
            pass
        assert not ob._conn.in_transaction  # nothing held, nothing left open
        for _ in range(2):
            ob.append_telemetry(build, 1, 0, TOPIC)
        first = ob.peek(10)[0]
        ob.ack_many([first.id])
        try:
            ob.append_telemetry(broken, 1, 0, TOPIC)
        except RuntimeError:
            pass
        assert [r.seq for r in ob.peek(10)] == [2]
        assert ob.stats()["last_acked_seq"] == 1
    with Outbox(tmp_path) as ob:
        assert [r.seq for r in ob.peek(10)] == [2]
        assert ob.append_telemetry(build, 1, 0, TOPIC) == 3  # the failed one consumed no seq


CHILD = r"""
import sys
from agent.adapters.outbox import Outbox
ob = Outbox(sys.argv[1], max_bytes=1 << 30)
n = 0
while True:
    n += 1
    seq = ob.append_telemetry(lambda s, d: b"x" * 3000, 1, 0, "t")
    if n % 3 == 0:  # acks held in the open transaction when the kill comes
        ob.ack_many([r.id for r in ob.peek(2)])
    print(seq, flush=True)
"""


def test_kill_9_with_held_acks_loses_no_batch(tmp_path):
    """A kill -9 undoes held acks only: their rows are sent again; every batch stored before
    the kill is still there, and no seq is used twice."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    printed: list[int] = []
    try:
        while len(printed) < 200:
            line = proc.stdout.readline()
            assert line, f"child died: {proc.stderr.read().decode()}"
            printed.append(int(line))
    finally:
        proc.send_signal(signal.SIGKILL)
    printed += [int(x) for x in proc.stdout.read().split(b"\n")[:-1]]
    proc.wait()
    with Outbox(tmp_path) as ob:
        stored = [r.seq for r in ob.peek(10_000)]
        last_acked = ob.stats()["last_acked_seq"]
        # Acked rows are the oldest ones; what is left is every later seq, none missing.
        assert stored == list(range(stored[0], stored[-1] + 1))
        assert set(printed) - set(range(1, stored[0])) <= set(stored)
        assert stored[0] <= last_acked + 1
        assert ob.append_telemetry(build, 1, 0, TOPIC) == stored[-1] + 1


def test_status_file_is_rewritten_in_place_and_always_whole(tmp_path):
    big = {"buses": [{"name": f"bus{i}", "frames": i} for i in range(40)]}
    write_status(tmp_path, big)
    path = tmp_path / "status.json"
    inode, size = path.stat().st_ino, path.stat().st_size
    write_status(tmp_path, {"buses": []})  # shorter: padded, no old text left behind
    assert path.stat().st_ino == inode and path.stat().st_size == size
    status, why = read_status(tmp_path)
    assert why == "" and status["buses"] == [] and status["pid"] == os.getpid()
    assert json.loads(path.read_text())["buses"] == []
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temp files


def test_a_small_outbox_with_large_pages_is_rebuilt_with_small_ones(tmp_path):
    db = sqlite3.connect(tmp_path / "outbox.db")  # as an earlier version made it
    db.execute("PRAGMA page_size=4096")
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    with Outbox(tmp_path) as ob:
        ob.append_telemetry(build, 1, 0, TOPIC)
        ob.append("response", "vehicles/VIN1/responses", b"r1", 0)
    db = sqlite3.connect(tmp_path / "outbox.db")
    db.execute("PRAGMA page_size=4096")
    db.execute("PRAGMA journal_mode=DELETE")
    db.execute("VACUUM")  # back to 4 KiB pages, rows kept
    assert db.execute("PRAGMA page_size").fetchone()[0] == 4096
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    with Outbox(tmp_path) as ob:
        assert ob._conn.execute("PRAGMA page_size").fetchone()[0] == 512
        assert ob._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert [(r.seq, r.payload[:2]) for r in ob.peek(10)] == [(1, b"1;"), (None, b"r1")]
        assert ob.append_telemetry(build, 1, 0, TOPIC) == 2


def test_a_reader_holding_the_status_lock_never_blocks_the_writer(tmp_path):
    import fcntl

    write_status(tmp_path, {"n": 1})
    with open(tmp_path / "status.json", "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_SH)  # a `tcu-agent status` stopped mid-read
        started = time.monotonic()
        write_status(tmp_path, {"n": 2})  # skipped, not waited for
        assert time.monotonic() - started < 1.0
    assert json.loads((tmp_path / "status.json").read_text())["n"] == 1
    write_status(tmp_path, {"n": 3})
    assert read_status(tmp_path)[0]["n"] == 3
