"""The replay store (agent.adapters.replaystore): real SQLite files in tmp_path."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.adapters.replaystore import PURGE_INTERVAL_MS, ReplayStore
from agent.core.commands import (
    Accepted,
    CommandGate,
    GateLimits,
    Redelivery,
    Rejected,
    TrustedKey,
    TrustStore,
)
from agent.core.cose import Signer
from agent.core.executor import actions_family
from agent.core.registry import Registry
from agent.errors import StorageError

NOW = 1_700_000_000_000
D1, D2 = b"\x01" * 32, b"\x02" * 32


def test_record_seen_count(tmp_path):
    with ReplayStore(tmp_path) as store:
        assert store.seen("a") is None and store.count() == 0
        assert store.record("a", D1, NOW + 1000, NOW) is True
        assert store.seen("a") == D1 and store.seen("b") is None
        assert store.record("a", D2, NOW + 5000, NOW) is False  # the first record wins
        assert store.seen("a") == D1 and store.count() == 1


def test_latest_status(tmp_path):
    with ReplayStore(tmp_path) as store:
        assert store.set_status("a", b"accepted") is False  # not recorded: nothing to attach to
        store.record("a", D1, NOW + 1000, NOW)
        assert store.latest_status("a") is None
        assert store.set_status("a", b"accepted") is True
        assert store.set_status("a", b"succeeded") is True
        assert store.latest_status("a") == b"succeeded"
        assert store.latest_status("b") is None


def test_survives_close_and_reopen(tmp_path):
    store = ReplayStore(tmp_path)
    store.record("a", D1, NOW + 1000, NOW)
    store.set_status("a", b"status-a")
    store.close()
    store.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        store.seen("a")
    with ReplayStore(tmp_path) as again:
        assert again.seen("a") == D1 and again.latest_status("a") == b"status-a"
        assert again.lost_at_ms is None


def test_record_is_committed_durably_when_it_returns(tmp_path):
    with ReplayStore(tmp_path) as store:
        store.record("a", D1, NOW + 1000, NOW)
        # Another connection (as after a crash) sees it without close() or any flush.
        other = sqlite3.connect(tmp_path / "replay.db")
        assert other.execute("SELECT digest FROM seen WHERE id = 'a'").fetchone() == (D1,)
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        other.close()
        assert store._conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL


def test_purge_forgets_expired_ids(tmp_path):
    with ReplayStore(tmp_path) as store:
        store.record("old", D1, NOW - 1, NOW - 10_000)
        store.record("edge", D1, NOW, NOW - 10_000)
        store.record("live", D2, NOW + 1, NOW - 10_000)
        assert store.purge(NOW) == 2
        assert store.seen("old") is None and store.seen("edge") is None
        assert store.seen("live") == D2 and store.count() == 1


def test_record_purges_at_most_once_per_interval(tmp_path):
    with ReplayStore(tmp_path) as store:
        store.record("a", D1, NOW + 1000, NOW)  # first record purges (nothing yet)
        store.record("b", D1, NOW + 60_000_000, NOW + 2000)  # a is expired, but too soon to purge
        assert store.seen("a") == D1
        store.record("c", D1, NOW + 60_000_000, NOW + PURGE_INTERVAL_MS)
        assert store.seen("a") is None and store.count() == 2


def test_thread_safe(tmp_path):
    with ReplayStore(tmp_path) as store:
        def work(n):
            for i in range(50):
                store.record(f"t{n}-{i}", D1, NOW + 1000, NOW)
                assert store.seen(f"t{n}-{i}") == D1
        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert store.count() == 200


def test_corrupt_database_at_open_is_moved_aside(tmp_path, caplog):
    with ReplayStore(tmp_path) as store:
        store.record("a", D1, NOW + 1000, NOW)
    db = tmp_path / "replay.db"
    db.write_bytes(b"this is not an sqlite database\n" * 300)
    damaged = db.read_bytes()
    losses = []
    before = time.time_ns() // 1_000_000
    with caplog.at_level(logging.ERROR, logger="agent.replaystore"):
        store = ReplayStore(tmp_path, on_loss=losses.append)
    aside = list(tmp_path.glob("replay.db.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == damaged
    errors = [r for r in caplog.records if r.name == "agent.replaystore"]
    assert len(errors) == 1 and str(aside[0]) in errors[0].getMessage()
    assert store.seen("a") is None and store.count() == 0  # forgotten: hence lost_at_ms
    assert losses == [store.lost_at_ms] and store.lost_at_ms >= before
    store.record("b", D2, NOW + 1000, NOW)
    store.close()
    with ReplayStore(tmp_path, on_loss=losses.append) as again:  # healthy now, loss remembered
        assert again.seen("b") == D2 and again.lost_at_ms == losses[0]
    assert len(losses) == 1 and len(list(tmp_path.glob("replay.db.corrupt-*"))) == 1


def test_corruption_during_use_recovers(tmp_path, caplog):
    ReplayStore(tmp_path).close()
    bulk = sqlite3.connect(tmp_path / "replay.db")  # ~6 MB of b-tree: more than the page cache
    with bulk:
        bulk.executemany("INSERT INTO seen (id, digest, exp_ms, recorded_ms) VALUES (?, ?, ?, ?)",
                         ((f"c{i}-{'x' * 50}", D1, NOW + 1000, NOW) for i in range(60_000)))
    bulk.close()
    losses = []
    store = ReplayStore(tmp_path, on_loss=losses.append)
    assert store.count() == 60_000
    db = tmp_path / "replay.db"
    data = db.read_bytes()
    db.write_bytes(data[:4096] + b"\xff" * (len(data) - 4096))  # damaged under a live connection
    with caplog.at_level(logging.ERROR, logger="agent.replaystore"):
        assert store.seen(f"c0-{'x' * 50}") is None  # a page read again: SQLite notices
    assert len(list(tmp_path.glob("replay.db.corrupt-*"))) == 1
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    assert losses == [store.lost_at_ms] and store.lost_at_ms is not None
    assert store.record("c1", D2, NOW + 1000, NOW) is True and store.seen("c1") == D2
    store.close()


def test_unusable_directory_is_a_storage_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError):
        ReplayStore(tmp_path / "file" / "sub")


# -- with the gate, as the runtime wires them --------------------------------------------------------

def test_gate_and_store_across_restart_and_corruption(tmp_path):
    key = Ed25519PrivateKey.generate()
    limits, registry = GateLimits(), Registry([actions_family()])
    gate = CommandGate(TrustStore([TrustedKey("ops", key.public_key(), ("*",))]), "VIN1", limits,
                       registry)
    message = Signer(key).sign({"v": 1, "id": "c-1", "vin": "VIN1", "name": "doors.lock",
                                "params": {}, "iat": NOW, "exp": NOW + 60_000})

    with ReplayStore(tmp_path, on_loss=gate.note_replay_loss) as store:
        outcome = gate.check(message, NOW, store.seen)
        assert isinstance(outcome, Accepted)
        store.record("c-1", outcome.command.digest, outcome.command.exp, NOW)
    with ReplayStore(tmp_path, on_loss=gate.note_replay_loss) as store:  # after a restart
        assert gate.check(message, NOW + 1000, store.seen) == Redelivery("c-1")

    (tmp_path / "replay.db").write_bytes(b"garbage" * 1000)
    fresh_gate = CommandGate(gate.trust, "VIN1", limits, registry)  # a restarted agent
    with ReplayStore(tmp_path, on_loss=fresh_gate.note_replay_loss) as store:
        assert store.seen("c-1") is None
        # The id is forgotten, but the command was issued before the loss: still refused.
        outcome = fresh_gate.check(message, NOW + 1000, store.seen)
        assert isinstance(outcome, Rejected) and outcome.reason == "REPLAYED"
    restarted = CommandGate(gate.trust, "VIN1", limits, registry)  # and again, from the persisted loss time
    with ReplayStore(tmp_path) as store:
        restarted.note_replay_loss(store.lost_at_ms)
        outcome = restarted.check(message, NOW + 1000, store.seen)
        assert isinstance(outcome, Rejected) and outcome.reason == "REPLAYED"
