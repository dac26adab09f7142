"""Durable, bounded store-and-forward queue between signing and MQTT publishing.

Signed payloads go into ``outbox.db`` (SQLite, WAL, ``synchronous=FULL`` because the car loses
power) and stay there until the broker acknowledged them. Delivery order is insertion order.

Decisions worth knowing:

* Flash writes (issue 18): every append is committed with an fsync before it returns, so a
  row is durable before the uplink can see it. Acks are not: ``ack_many`` deletes the rows in
  the open transaction and leaves it open ("held"); the next append commits them with its own
  rows (group commit: the table leaf, index, meta and freelist pages both touch are written
  once), or the first call after ``ack_hold_s`` (5 s) does, or ``flush``/``close``. A held ack
  lost to kill -9 or a power cut only means its row is sent again; the cloud de-duplicates by
  seq. Nothing else is ever held. Telemetry rows stay out of the indexes they do not need
  (partial indexes), and pages are 512 bytes (``sqlitedb.py``): about 1.3x the payload reaches
  the WAL per batch, 1.8x counting the re-written last page of each fsync and checkpoints.

* Threads: ONE connection (``check_same_thread=False``) guarded by ONE lock. The main thread
  appends, the MQTT thread peeks and acks; every call is short, so a second connection would buy
  nothing and would make the in-memory counters (bytes, meta mirror) harder to keep exact.
* Telemetry ``seq``: assigned inside the insert transaction, so a crash before commit consumes no
  seq. To survive losing the database, a high-water mark is kept in ``seq.reserve`` beside it
  and in a second, independent copy ``seq.mirror`` (JSON, each written atomically, one block of
  ``reserve_block`` seqs ahead, before the commit that needs it); the larger readable one wins.
  A fresh or recovered database continues at the high-water mark: the gap is truthful.
  The file also counts corruption recoveries, because that count must outlive the database.
  When the database AND both marks are gone but the directory shows an earlier run (files the
  agent writes there: replay.db, status.json, ...), seq continues from the wall clock in ms,
  a value no earlier run can have reached at 1 batch/ms; logged, and ``seq_from_clock`` in
  ``stats()``. An empty directory is a first start: seq 1.
* ``state`` / ``status`` rows (retained topics, only the newest matters) REPLACE any unsent row of
  the same kind and topic; the new row goes to the back of the queue. Replaced rows are not
  counted as dropped.
* Budget: ``max_bytes`` counts payload bytes. Only telemetry is evicted (oldest first, the new
  row included); response, state and status rows are kept even over budget, with one warning per
  over-budget episode. Evicted samples, plus the ``drop`` an evicted batch was carrying, become
  the ``drop`` of the next telemetry batch, so the drops a consumer receives add up to every
  sample lost. Samples lost before reaching the outbox (``extra_drop``, e.g. a full disk) are
  carried the same way. A row
  already published but not yet acked may be evicted: drop is then over-reported, never under.
* Corruption (``SQLITE_CORRUPT``, ``SQLITE_NOTADB`` or a failed ``PRAGMA quick_check`` on open)
  moves the files aside to ``outbox.db.corrupt-<ms>`` and starts a fresh database, on open and
  during use. Other SQLite errors (disk full, permissions) raise StorageError: moving a healthy
  database aside would not fix them. Row ids of a database recovered during use continue above
  the old ones, so an uplink holding ``after_id`` does not skip new rows. The samples and
  carried drops of the telemetry lost with the corrupt file (kept as in-memory totals) are
  added to ``pending_drop`` (its samples to ``dropped_samples`` too).
* Campaign priority (PROTOCOL.md §8): every row has a ``priority`` (0 first; base telemetry,
  responses, state and status have ``DEFAULT_PRIORITY``, 5) and campaign batches name their
  ``campaign``. Which row goes next is decided when ``peek`` hands it out, not when it is
  stored: rows not handed out yet are taken by (priority, id), so when the link is scarce the
  backlog drains lower numbers first. The uplink pages with ``after_id``; to keep that working
  unchanged, a row is handed out under an order number (``Row.id``) that is larger than every
  number handed out before: its own id when that is larger (rows handed out in insertion order
  keep their ids), else the next free number. Without campaigns the order is insertion order,
  as before. ``ack`` takes those numbers. The uplink's urgent pass (responses, state, status
  first) is unchanged; the in-order pass returns the rows it already handed out first.
* Campaign quota: a campaign batch stored with ``max_bytes`` evicts that campaign's own oldest
  rows (the new one included) until the campaign holds at most that much; the loss is counted
  in ``drop`` like any eviction.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from agent.errors import StorageError

from .atomic import atomic_write
from .sqlitedb import GuardedDb

log = logging.getLogger("agent.outbox")

DB_NAME = "outbox.db"
RESERVE_NAME = "seq.reserve"
MIRROR_NAME = "seq.mirror"
# Files the agent itself writes beside the outbox: any of them means "not a first start".
EARLIER_RUN_FILES = ("replay.db", "replay.mark", "status.json", "update", RESERVE_NAME,
                     MIRROR_NAME, DB_NAME + "-wal")
KINDS = ("telemetry", "state", "status", "response")
_REPLACEABLE = ("state", "status")
DEFAULT_PRIORITY = 5  # base telemetry and every record that is not a campaign's
ACK_HOLD_S = 5.0  # held acks are committed by then at the latest
_META_KEYS = ("next_seq", "pending_drop", "last_acked_seq", "evicted_batches", "dropped_samples")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids are never reused
        kind TEXT NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL,
        seq INTEGER, samples INTEGER NOT NULL DEFAULT 0,
        created_ms INTEGER NOT NULL, size INTEGER NOT NULL,
        carried_drop INTEGER NOT NULL DEFAULT 0,
        priority INTEGER NOT NULL DEFAULT 5, campaign TEXT)""",
    # Every index a telemetry row is in costs a page write at its insert and at its delete,
    # so the indexes that telemetry does not need leave it out (partial indexes). Oldest
    # telemetry for eviction: the rowid order itself.
    # (priority, rowid): the next rows to hand out.
    "CREATE INDEX IF NOT EXISTS messages_priority ON messages(priority)",
    # The urgent rows, and the state/status row a new one replaces.
    "CREATE INDEX IF NOT EXISTS messages_urgent ON messages(kind, topic)"
    " WHERE kind IN ('response', 'state', 'status')",
    # One campaign's rows (quota); base telemetry has none.
    "CREATE INDEX IF NOT EXISTS messages_campaign ON messages(campaign)"
    " WHERE campaign IS NOT NULL",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
)


@dataclass(frozen=True, slots=True)
class Row:
    """One queued message, as returned by :meth:`Outbox.peek`."""

    id: int
    kind: str
    topic: str
    payload: bytes
    seq: int | None
    created_ms: int


class Outbox(GuardedDb):
    """The durable outbox in ``directory``; see the module docstring for the design."""

    _what = "outbox"

    def __init__(self, directory: str | os.PathLike, max_bytes: int = 64 * 1024 * 1024,
                 *, reserve_block: int = 1000, ack_hold_s: float = ACK_HOLD_S):
        """Open (or create) ``directory/outbox.db``; a corrupt database is moved aside.

        Raises StorageError when the directory or database cannot be used at all.
        """
        if max_bytes <= 0 or reserve_block <= 0:
            raise ValueError("max_bytes and reserve_block must be positive")
        self._init_db(Path(directory), DB_NAME)
        self._reserve_path = self._dir / RESERVE_NAME
        self._mirror_path = self._dir / MIRROR_NAME
        self.seq_from_clock = False
        self._max_bytes = max_bytes
        self._block = reserve_block
        self._carry: dict[str, int] = {}  # counters that outlive a corrupt database
        self._meta: dict[str, int] = {}  # mirror of the meta table; equal to it under the lock
        self._bytes = 0
        self._queued_samples = self._queued_drop = 0  # of the telemetry rows in the database
        self._max_id = 0
        self._over_budget = False
        self._held_since: float | None = None  # monotonic s since acks are held uncommitted
        self._ack_hold_s = ack_hold_s
        # Order numbers handed out by peek (see the module docstring): row id <-> number.
        self._ord_of: dict[int, int] = {}
        self._id_of: dict[int, int] = {}
        self._ord_hi = 0
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"outbox directory {self._dir} cannot be created: {e}") from e
        earlier_run = any((self._dir / n).exists() for n in EARLIER_RUN_FILES) or \
            any(self._dir.glob(DB_NAME + ".corrupt-*"))
        db_found = self._db_path.exists() and self._db_path.stat().st_size > 0
        self._seq_high, self._recovered = self._read_reserve()
        if not db_found and self._seq_high == 0 and earlier_run:
            self._start_seq_from_clock("is gone")
        self._open_or_recover()

    # ---- public API -------------------------------------------------------------------------

    def append_telemetry(self, build: Callable[[int, int], bytes], samples: int, now_ms: int,
                         topic: str, extra_drop: int = 0, *, priority: int = DEFAULT_PRIORITY,
                         campaign: str | None = None, max_bytes: int | None = None) -> int:
        """Queue one telemetry batch and return its seq.

        ``build(seq, drop)`` returns the signed payload; it runs inside the insert transaction
        (it may run twice if the database is recovered from corruption meanwhile). If it raises,
        nothing is stored and no seq is consumed. ``extra_drop``: samples lost before they
        reached the outbox; added to ``drop`` (and carried on if this batch is evicted) and to
        ``dropped_samples``. ``priority``, ``campaign`` and ``max_bytes``: a campaign's batch
        (see the module docstring). Raises StorageError.
        """
        for name, value in (("samples", samples), ("extra_drop", extra_drop)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, not {value!r}")

        def op() -> int:
            with self._txn():
                # The lock makes the mirror equal to the committed meta rows.
                seq, drop = self._meta["next_seq"], self._meta["pending_drop"] + extra_drop
                payload = bytes(build(seq, drop))
                if seq >= self._seq_high:  # reserve before the commit that uses the seq
                    self._write_reserve(seq + self._block, self._recovered)
                meta = {"next_seq": seq + 1, "pending_drop": 0}
                if extra_drop:
                    meta["dropped_samples"] = self._meta["dropped_samples"] + extra_drop
                row_id = self._insert("telemetry", topic, payload, seq, samples, now_ms, drop,
                                      priority, campaign)
                queued = [samples, drop]
                total = self._bytes + len(payload)
                if campaign is not None and max_bytes is not None:
                    total = self._evict_campaign(campaign, max_bytes, total, meta, queued)
                total = self._evict(total, meta, queued)
                self._put_meta(meta)
            self._committed(row_id, total, meta, queued)
            return seq

        return self._guarded(op)

    def append(self, kind: str, topic: str, payload: bytes, now_ms: int) -> int:
        """Queue a state, status or response payload and return its row id.

        A state/status row replaces any unsent row of the same kind and topic. Response rows
        are never evicted. Raises ValueError for an unknown kind, StorageError.
        """
        if kind not in KINDS or kind == "telemetry":
            raise ValueError(f"outbox kind must be one of state, status, response, not {kind!r}")
        payload = bytes(payload)

        def op() -> int:
            meta: dict[str, int] = {}
            with self._txn():
                total = self._bytes
                if kind in _REPLACEABLE:
                    for (size, old_id) in self._conn.execute(
                            "DELETE FROM messages WHERE kind IN ('response', 'state', 'status')"
                            " AND kind = ? AND topic = ?"
                            " RETURNING size, id", (kind, topic)).fetchall():
                        total -= size
                        self._forget(old_id)
                row_id = self._insert(kind, topic, payload, None, 0, now_ms)
                # (replaced state/status rows carry no samples: only eviction changes `queued`)
                queued = [0, 0]
                total = self._evict(total + len(payload), meta, queued)
                self._put_meta(meta)
            self._committed(row_id, total, meta, queued)
            return row_id

        return self._guarded(op)

    def peek(self, limit: int, after_id: int | None = None, urgent: bool = False) -> list[Row]:
        """Return up to ``limit`` queued rows whose ``Row.id`` is > ``after_id``, in the order
        to send them: rows handed out before first (by their number), then new ones by
        (priority, id); with ``urgent``, only the rows that are not telemetry (responses,
        state, status). Without campaigns that is insertion order."""
        def op() -> list[Row]:
            after = after_id or 0
            rows: list[Row] = []
            kinds = ("response", "state", "status") if urgent else None
            # 1. rows handed out before, above the cursor (re-sent after a reconnect)
            for number in sorted(o for o in self._id_of if o > after):
                if len(rows) >= limit:
                    break
                row = self._row(self._id_of[number], number, kinds)
                if row is not None:
                    rows.append(row)
            # 2. new rows, best first
            if len(rows) < limit:
                where = []
                args: list = []
                if kinds:
                    where.append("kind IN ('response', 'state', 'status')")
                if after > self._ord_hi:  # a cursor from elsewhere: plain id paging
                    where.append("id > ?")
                    args.append(after)
                sql = "SELECT id FROM messages" + (" WHERE " + " AND ".join(where) if where
                                                   else "") + " ORDER BY priority, id"
                picked = []
                for (row_id,) in self._conn.execute(sql, args):
                    if row_id in self._ord_of:
                        continue
                    picked.append(row_id)
                    if len(rows) + len(picked) >= limit:
                        break
                for row_id in picked:
                    number = max(row_id, self._ord_hi + 1)
                    self._ord_hi = number
                    self._ord_of[row_id] = number
                    self._id_of[number] = row_id
                    row = self._row(row_id, number, None)
                    if row is not None:
                        rows.append(row)
                        self._max_id = max(self._max_id, row_id)
            return rows

        return self._guarded(op)

    def _row(self, row_id: int, number: int, kinds) -> Row | None:
        """The row handed out as `number`, or None (and forgotten) when it is gone."""
        r = self._conn.execute("SELECT kind, topic, payload, seq, created_ms FROM messages"
                               " WHERE id = ?", (row_id,)).fetchone()
        if r is None:
            self._forget(row_id)
            return None
        if kinds is not None and r[0] not in kinds:
            return None
        return Row(number, *r)

    def _forget(self, row_id: int) -> None:
        number = self._ord_of.pop(row_id, None)
        if number is not None:
            self._id_of.pop(number, None)

    def ack(self, row_id: int) -> bool:
        """Delete a row the broker acknowledged; False if it was already gone."""
        return self.ack_many([row_id]) == 1

    def ack_many(self, row_ids: Iterable[int]) -> int:
        """Delete many acknowledged rows in one transaction; return how many existed.

        Unknown ids (already acked, replaced or evicted) are ignored. Raises StorageError.
        """
        numbers = list(row_ids)

        def op() -> int:
            ids = []
            for number in numbers:  # numbers from peek -> row ids
                row_id = self._id_of.get(number)
                if row_id is None and number in self._ord_of:
                    continue  # that row was handed out under another number
                ids.append(number if row_id is None else row_id)
            deleted = freed = 0
            meta: dict[str, int] = {}
            queued = [0, 0]
            # Held, not committed (group commit, module docstring): losing an ack only means
            # sending its row again, and the cloud de-duplicates by seq.
            with self._txn(durable=False):
                last = self._meta["last_acked_seq"]
                for row_id in ids:
                    # fetchall: a RETURNING statement left unfinished would block COMMIT.
                    for seq, size, samples, drop in self._conn.execute(
                            "DELETE FROM messages WHERE id = ?"
                            " RETURNING seq, size, samples, carried_drop", (row_id,)).fetchall():
                        deleted += 1
                        freed += size
                        queued[0] -= samples
                        queued[1] -= drop
                        if seq is not None and seq > last:
                            last = meta["last_acked_seq"] = seq
                self._put_meta(meta)
            for row_id in ids:
                self._forget(row_id)
            self._committed(None, self._bytes - freed, meta, queued)
            return deleted

        return self._guarded(op) if numbers else 0

    def stats(self) -> dict:
        """Counts for status display: messages, bytes, oldest_ms, by_kind, seq and drop counters."""
        def op() -> dict:
            by_kind = dict.fromkeys(KINDS, 0)
            messages = size = 0
            oldest = None
            for kind, count, total, first in self._conn.execute(
                    "SELECT kind, COUNT(*), SUM(size), MIN(created_ms)"
                    " FROM messages GROUP BY kind"):
                by_kind[kind] = count
                messages += count
                size += total
                oldest = first if oldest is None else min(oldest, first)
            return {"messages": messages, "bytes": size, "max_bytes": self._max_bytes,
                    "oldest_ms": oldest, "by_kind": by_kind,
                    "next_seq": self._meta["next_seq"],
                    "last_acked_seq": self._meta["last_acked_seq"],
                    "pending_drop": self._meta["pending_drop"],
                    "evicted_batches": self._meta["evicted_batches"],
                    "dropped_samples": self._meta["dropped_samples"],
                    "recovered_corruptions": self._recovered,
                    "seq_from_clock": self.seq_from_clock}

        return self._guarded(op)

    def campaign_bytes(self) -> dict[str, int]:
        """Bytes each campaign holds in the outbox (its quota counts these)."""
        return self._guarded(lambda: dict(self._conn.execute(
            "SELECT campaign, SUM(size) FROM messages WHERE campaign IS NOT NULL"
            " GROUP BY campaign").fetchall()))

    def flush(self) -> None:
        """Commit held acks now, with an fsync (e.g. before the power goes). Raises
        StorageError."""
        def op() -> None:
            if self._conn.in_transaction:
                self._commit()

        self._guarded(op)

    def close(self) -> None:
        """Commit held acks and close the database (idempotent)."""
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.in_transaction:
                        self._commit()
                except sqlite3.Error as e:
                    log.warning("outbox %s: acks not stored at close (%s); those rows will be "
                                "sent again", self._db_path, e)
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- transactions and bookkeeping -------------------------------------------------------

    @contextmanager
    def _txn(self, durable: bool = True):
        """One operation's changes, committed with an fsync (``durable``), or held: left in
        the open transaction, which the next durable operation commits with its own (group
        commit: the pages both touch are written once), or `_guarded` after ACK_HOLD_S.
        Held changes are lost with the process; only acks are held (module docstring)."""
        conn = self._conn
        began = not conn.in_transaction  # else acks are held in the open one
        if began:
            conn.execute("BEGIN IMMEDIATE")
        conn.execute("SAVEPOINT op")
        try:
            yield
            conn.execute("RELEASE op")
        except BaseException:
            try:
                if began:
                    conn.execute("ROLLBACK")
                else:  # undo this operation only: held acks stay
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
            except sqlite3.Error:
                pass  # the transaction may already be gone; the original error matters
            if not began and not conn.in_transaction:
                self._held_since = None  # SQLite rolled it all back (e.g. disk full)
                try:
                    self._load_counters(conn)
                except sqlite3.Error:
                    pass  # a broken database: the original error is the one to handle
            raise
        if not durable:
            if self._held_since is None:
                self._held_since = time.monotonic()
            return
        self._commit()

    def _commit(self) -> None:
        """COMMIT (fsync); on failure roll back everything, held acks included, and take the
        counters from the database again."""
        held, self._held_since = self._held_since, None
        try:
            self._conn.execute("COMMIT")
        except BaseException:
            try:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if held is not None:  # the held acks are undone: their rows are queued again
                try:
                    self._load_counters(self._conn)
                except sqlite3.Error:
                    pass  # a broken database: the original error is the one to handle
            raise

    def _guarded(self, op):
        with self._lock:
            result = super()._guarded(op)
            if self._held_since is not None and \
                    time.monotonic() - self._held_since >= self._ack_hold_s:
                try:
                    super()._guarded(lambda: self._conn.in_transaction and self._commit())
                except StorageError as e:  # the acked rows are sent again: what a lost ack means
                    log.warning("%s", e)
            return result

    def _insert(self, kind, topic, payload, seq, samples, now_ms, carried_drop=0,
                priority=DEFAULT_PRIORITY, campaign=None) -> int:
        cur = self._conn.execute(
            "INSERT INTO messages (kind, topic, payload, seq, samples, created_ms, size,"
            " carried_drop, priority, campaign) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (kind, topic, payload, seq, samples, now_ms, len(payload), carried_drop, priority,
             campaign))
        return cur.lastrowid

    def _evict(self, total: int, meta: dict[str, int], queued: list[int]) -> int:
        """Delete oldest telemetry until within budget; record the loss in ``meta`` and take
        it off ``queued`` ([samples, carried drops] delta of this transaction)."""
        return self._evict_where("kind = 'telemetry'", (), total, total, self._max_bytes,
                                 meta, queued)

    def _evict_campaign(self, campaign: str, max_bytes: int, total: int,
                        meta: dict[str, int], queued: list[int]) -> int:
        """Delete the campaign's oldest rows until it holds at most ``max_bytes``."""
        held = self._conn.execute("SELECT COALESCE(SUM(size), 0) FROM messages"
                                  " WHERE campaign = ?", (campaign,)).fetchone()[0]
        return self._evict_where("campaign = ?", (campaign,), total, held, max_bytes, meta,
                                 queued)

    def _evict_where(self, where: str, args: tuple, total: int, held: int, budget: int,
                     meta: dict[str, int], queued: list[int]) -> int:
        """Delete the oldest rows matching ``where`` while ``held`` (their bytes) is over
        ``budget``; returns the new ``total``."""
        batches = samples = carried = 0
        while held > budget:
            oldest = self._conn.execute(
                f"SELECT id, size, samples, carried_drop FROM messages WHERE {where}"
                " ORDER BY id LIMIT 64", args
            ).fetchall()
            if not oldest:
                break  # only rows we must never drop are left: stay over budget
            for row_id, size, count, drop in oldest:
                if held <= budget:
                    break
                self._conn.execute("DELETE FROM messages WHERE id = ?", (row_id,))
                self._forget(row_id)
                total -= size
                held -= size
                batches += 1
                samples += count
                carried += drop  # the loss this batch was reporting is not reported now
        if batches:
            meta["pending_drop"] = (meta.get("pending_drop", self._meta["pending_drop"])
                                    + samples + carried)
            meta["evicted_batches"] = (meta.get("evicted_batches", self._meta["evicted_batches"])
                                       + batches)
            meta["dropped_samples"] = (meta.get("dropped_samples", self._meta["dropped_samples"])
                                       + samples)
            queued[0] -= samples
            queued[1] -= carried
        return total

    def _put_meta(self, meta: dict[str, int]) -> None:
        if meta:
            self._conn.executemany("UPDATE meta SET value = ? WHERE key = ?",
                                   [(v, k) for k, v in meta.items()])

    def _committed(self, row_id: int | None, total: int, meta: dict[str, int],
                   queued: list[int]) -> None:
        """Apply a committed transaction to the in-memory mirror."""
        self._meta.update(meta)
        self._bytes = total
        self._queued_samples += queued[0]
        self._queued_drop += queued[1]
        if row_id is not None:
            self._max_id = max(self._max_id, row_id)
        if total > self._max_bytes and not self._over_budget:
            log.warning("outbox %s holds %d bytes, over its budget of %d, and only rows that are "
                        "never evicted (responses, state, status) are left", self._db_path, total,
                        self._max_bytes)
        self._over_budget = total > self._max_bytes

    # ---- opening, recovery, reserve file ----------------------------------------------------

    def _open_schema(self, conn: sqlite3.Connection) -> None:
        carry = self._carry
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(_SCHEMA[0])
        columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
        if "carried_drop" not in columns:  # a database from before the column existed
            conn.execute("ALTER TABLE messages ADD COLUMN carried_drop INTEGER NOT NULL"
                         " DEFAULT 0")
        if "priority" not in columns:  # from before campaigns
            conn.execute("ALTER TABLE messages ADD COLUMN priority INTEGER NOT NULL DEFAULT 5")
            conn.execute("ALTER TABLE messages ADD COLUMN campaign TEXT")
        # Full indexes of earlier versions (the campaign one is partial now).
        conn.execute("DROP INDEX IF EXISTS messages_kind")
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'messages_campaign'"
                        " AND sql NOT LIKE '%WHERE%'").fetchone():
            conn.execute("DROP INDEX messages_campaign")
        for statement in _SCHEMA[1:]:
            conn.execute(statement)
        # A fresh database starts at the reserve's high-water mark (INSERT OR IGNORE keeps
        # the values of an existing one).
        defaults = {k: carry.get(k, 0) for k in _META_KEYS}
        defaults["next_seq"] = max(self._seq_high, defaults["next_seq"], 1)
        conn.executemany("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                         defaults.items())
        if self._max_id:  # recovered during use: keep ids above those the uplink has seen
            conn.execute("INSERT INTO sqlite_sequence (name, seq) SELECT 'messages', ?"
                         " WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence"
                         " WHERE name = 'messages')", (self._max_id,))
        conn.execute("COMMIT")
        self._held_since = None
        self._load_counters(conn)

    def _load_counters(self, conn: sqlite3.Connection) -> None:
        """The in-memory mirror, from the database."""
        self._meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        self._bytes = conn.execute("SELECT COALESCE(SUM(size), 0) FROM messages").fetchone()[0]
        self._queued_samples, self._queued_drop = conn.execute(
            "SELECT COALESCE(SUM(samples), 0), COALESCE(SUM(carried_drop), 0) FROM messages"
            " WHERE kind = 'telemetry'").fetchone()
        last_id = conn.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
        self._max_id = max(self._max_id, last_id[0] if last_id else 0)

    def _recover(self, cause: BaseException) -> None:
        """Move the corrupt database aside and open a fresh one; StorageError if impossible."""
        self._carry = dict(self._meta)  # counters known in memory outlive the corrupt file
        if self._carry:  # the queued telemetry is lost with the file: report it as dropped
            self._carry["pending_drop"] += self._queued_samples + self._queued_drop
            self._carry["dropped_samples"] += self._queued_samples
        self._queued_samples = self._queued_drop = 0
        aside = self._move_aside(cause)
        self._recovered += 1
        if max(self._seq_high, self._carry.get("next_seq", 0)) == 0:  # no mark, no memory
            self._start_seq_from_clock("is corrupt")
        try:
            self._write_reserve(self._seq_high, self._recovered)
        except StorageError as e:
            raise StorageError(f"outbox {self._db_path} is corrupt ({cause}); {e}") from e
        log.error("outbox database %s is corrupt (%s); moved it to %s and started a fresh one; its "
                  "unsent messages are lost, telemetry seq continues at %d", self._db_path,
                  " ".join(str(cause).split()),  # quick_check output spans lines: keep one
                  aside, max(self._seq_high, self._carry.get("next_seq", 0), 1))
        self._reopen_fresh()

    def _start_seq_from_clock(self, what: str) -> None:
        self._seq_high = time.time_ns() // 1_000_000
        self.seq_from_clock = True
        log.error("outbox %s %s and neither seq mark (%s, %s) is readable, but the agent has "
                  "run here before: telemetry seq continues from the clock at %d so that no seq "
                  "is reused", self._db_path, what, RESERVE_NAME, MIRROR_NAME, self._seq_high)

    def _read_reserve(self) -> tuple[int, int]:
        """(seq_high, recovered_corruptions): the larger of the two marks' values."""
        best = (0, 0)
        for path in (self._reserve_path, self._mirror_path):
            try:
                data = json.loads(path.read_text())
                found = int(data["seq_high"]), int(data.get("recovered_corruptions", 0))
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                # Not fatal while the other mark or the database is intact.
                log.error("seq mark %s is unreadable (%s); telemetry seq continues from the "
                          "other mark or the database", path, e)
                continue
            best = max(best[0], found[0]), max(best[1], found[1])
        return best

    def _write_reserve(self, seq_high: int, recovered: int) -> None:
        """Atomically persist the high-water mark in both places: temp file, fsync, rename,
        fsync directory."""
        data = json.dumps({"seq_high": seq_high, "recovered_corruptions": recovered}).encode()
        for path in (self._reserve_path, self._mirror_path):
            try:
                atomic_write(path, data)
            except OSError as e:
                raise StorageError(f"seq reserve {path} cannot be written: {e}") from e
        self._seq_high = seq_high
