"""Durable memory of command ids seen, and their latest status (PROTOCOL.md §6).

`replay.db` (SQLite, WAL, synchronous=FULL) holds one row per command id: the digest of its
signed payload, its `exp`, and the latest signed status message sent for it. A row is kept
until its `exp` has passed, so a replay is refused across restarts; after `exp` the command
is refused as EXPIRED anyway.

* `record()` commits before it returns (autocommit + synchronous=FULL): the runtime calls it
  BEFORE executing a command, so a power cut can never let the same command run twice.
* One connection guarded by one lock, like the outbox: every call is short.
* Corruption (SQLITE_CORRUPT / SQLITE_NOTADB, or a failed quick_check on open) moves the files
  aside to `replay.db.corrupt-<ms>` with one log line and starts a fresh database. That
  forgets the seen ids, so a command received before the loss could be replayed inside its
  lifetime. Mitigation: the time of the loss is kept (`lost_at_ms`, in the fresh database)
  and reported through `on_loss`; CommandGate.note_replay_loss then refuses every command
  issued before it (plus the allowed clock skew). Those expire within max_lifetime_ms, so
  only commands in flight at the moment of the loss are refused, never a replay accepted.
* Loss and rollback of the file are detected too. Every record() increments a counter kept in
  the database (meta `records`) and, after the commit, in `replay.mark` beside it (JSON, written
  atomically). At open, a database whose counter is below the mark -- deleted, truncated to 0
  bytes, or an older copy restored -- is treated like a corrupt one: loss time now, commands
  issued before it refused. (A crash between the commit and the mark leaves the database one
  ahead, which is fine.) Deleting both files together is not detected: that is a new vehicle.
* Purging needs two clocks to agree: an id is forgotten only when its `exp` is past on the wall
  clock AND the agent has run (monotonic time, accumulated across restarts in meta
  `elapsed_ms`) for the command's whole lifetime since recording it. A wall clock stepped
  forward therefore cannot open the window for a replay once it is stepped back. Time the agent
  is off does not count, so an id may be kept longer than its lifetime, never shorter.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

from agent.errors import StorageError

from .atomic import atomic_write
from .sqlitedb import GuardedDb

log = logging.getLogger("agent.replaystore")

DB_NAME = "replay.db"
MARK_NAME = "replay.mark"
PURGE_INTERVAL_MS = 60_000  # record() purges expired ids at most this often

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS seen (
        id TEXT PRIMARY KEY, digest BLOB NOT NULL, exp_ms INTEGER NOT NULL,
        recorded_ms INTEGER NOT NULL, status BLOB,
        elapsed_ms INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS seen_exp ON seen(exp_ms)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
)


class ReplayStore(GuardedDb):
    """Seen command ids in `directory/replay.db`; see the module docstring."""

    _what = "replay store"

    def __init__(self, directory: str | os.PathLike[str],
                 on_loss: Callable[[int], None] | None = None,
                 monotonic: Callable[[], float] = time.monotonic,
                 wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000):
        """Open (or create) the database; a corrupt, missing or rolled-back one is replaced.

        `on_loss(lost_at_ms)` is called whenever seen ids are lost (corruption, or a database
        behind its mark), including during this constructor. `monotonic` (seconds) and
        `wall_ms` are the clocks, injectable for tests. Raises StorageError when the directory
        cannot be used.
        """
        self._init_db(Path(directory), DB_NAME)
        self._mark_path = self._dir / MARK_NAME
        self._on_loss = on_loss
        self._monotonic = monotonic
        self._wall_ms = wall_ms
        self._lost_at_ms: int | None = None
        self._last_purge_ms: int | None = None
        self._records = 0  # meta `records`, mirrored
        self._elapsed_base = 0  # meta `elapsed_ms` at open
        self._mono_at_open = monotonic()
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"replay store directory {self._dir} cannot be created: {e}") from e
        self._mark = mark = self._read_mark()
        self._open_or_recover()
        if mark is not None and self._records < mark:
            self._lost(f"it holds {self._records} record(s) but {self._mark_path.name} says "
                       f"{mark}: it was deleted, truncated or restored from an older copy")
        elif mark is None:
            self._write_mark()  # the first start (or a lost mark): from now on, checked

    # ---- public API -------------------------------------------------------------------------

    @property
    def lost_at_ms(self) -> int | None:
        """When seen ids were last lost to corruption (wall-clock ms), or None if never."""
        return self._lost_at_ms

    def seen(self, command_id: str) -> bytes | None:
        """The digest recorded for `command_id`, or None. Raises StorageError."""
        def op():
            row = self._conn.execute("SELECT digest FROM seen WHERE id = ?", (command_id,)).fetchone()
            return None if row is None else bytes(row[0])
        return self._guarded(op)

    def record(self, command_id: str, digest: bytes, exp_ms: int, now_ms: int) -> bool:
        """Remember `command_id` until `exp_ms`, durably, before the command runs.

        The first record of an id wins: False if it was already recorded. Also purges expired
        ids, at most once per PURGE_INTERVAL_MS. Raises StorageError.
        """
        elapsed = self.elapsed_ms()

        def op():
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                cur = conn.execute(
                    "INSERT INTO seen (id, digest, exp_ms, recorded_ms, elapsed_ms)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT(id) DO NOTHING",
                    (command_id, bytes(digest), exp_ms, now_ms, elapsed))
                added = cur.rowcount == 1
                if added:
                    self._set_meta(conn, "records", self._records + 1)
                    self._set_meta(conn, "elapsed_ms", elapsed)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return added
        added = self._guarded(op)
        if added:
            self._records += 1
            self._write_mark()  # after the commit: the database is never behind its mark
        self.maybe_purge(now_ms)
        return added

    def maybe_purge(self, now_ms: int) -> int:
        """Purge expired ids if the last purge is PURGE_INTERVAL_MS old (call it periodically,
        not only when commands arrive). Returns how many were forgotten."""
        if self._last_purge_ms is None or abs(now_ms - self._last_purge_ms) >= PURGE_INTERVAL_MS:
            return self.purge(now_ms)
        return 0

    def elapsed_ms(self) -> int:
        """Monotonic ms the agent has run with this store, accumulated across restarts."""
        return self._elapsed_base + int((self._monotonic() - self._mono_at_open) * 1000)

    def set_status(self, command_id: str, payload: bytes) -> bool:
        """Keep `payload` (a signed status message) as the id's latest; False if not recorded."""
        def op():
            return self._conn.execute("UPDATE seen SET status = ? WHERE id = ?",
                                      (bytes(payload), command_id)).rowcount == 1
        return self._guarded(op)

    def latest_status(self, command_id: str) -> bytes | None:
        """The latest status message stored for `command_id`, or None."""
        def op():
            row = self._conn.execute("SELECT status FROM seen WHERE id = ?", (command_id,)).fetchone()
            return None if row is None or row[0] is None else bytes(row[0])
        return self._guarded(op)

    def recorded(self) -> list[tuple[str, bytes | None]]:
        """(id, latest status or None) of every id still remembered (expired ones too, until
        the next purge), oldest first."""
        def op():
            rows = self._conn.execute("SELECT id, status FROM seen ORDER BY "
                                      "recorded_ms").fetchall()
            return [(r[0], None if r[1] is None else bytes(r[1])) for r in rows]
        return self._guarded(op)

    def purge(self, now_ms: int) -> int:
        """Forget ids whose exp has passed (exp_ms <= now_ms) AND whose lifetime has also
        passed in the agent's running time (see the module docstring); return how many."""
        elapsed = self.elapsed_ms()

        def op():
            conn = self._conn
            self._set_meta(conn, "elapsed_ms", elapsed)
            return conn.execute(
                "DELETE FROM seen WHERE exp_ms <= ? AND ? - elapsed_ms >= exp_ms - recorded_ms",
                (now_ms, elapsed)).rowcount
        deleted = self._guarded(op)
        self._last_purge_ms = now_ms
        return deleted

    def count(self) -> int:
        """How many ids are remembered."""
        return self._guarded(lambda: self._conn.execute("SELECT COUNT(*) FROM seen").fetchone()[0])

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals --------------------------------------------------------------------------

    @staticmethod
    def _set_meta(conn: sqlite3.Connection, key: str, value: int) -> None:
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _open_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        for statement in _SCHEMA:
            conn.execute(statement)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(seen)")}
        if "elapsed_ms" not in columns:  # a database from before the column existed
            conn.execute("ALTER TABLE seen ADD COLUMN elapsed_ms INTEGER NOT NULL DEFAULT 0")
        if self._lost_at_ms is not None:  # a fresh db after a loss: remember when
            self._set_meta(conn, "lost_at_ms", self._lost_at_ms)
            self._set_meta(conn, "records", self._records)  # the counter never goes back
        conn.execute("COMMIT")
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        self._lost_at_ms = meta.get("lost_at_ms")
        self._records = meta.get("records", 0)
        self._elapsed_base = meta.get("elapsed_ms", 0)
        self._mono_at_open = self._monotonic()

    def _recover(self, cause: BaseException) -> None:
        """Move the corrupt database aside and open a fresh one; StorageError if impossible."""
        self._note_loss()
        self._records = max(self._records, self._mark or 0)  # the counter never goes back
        aside = self._move_aside(cause)
        log.error("replay store %s is corrupt (%s); moved it to %s and started a fresh one; "
                  "commands issued before now are refused as REPLAYED until they expire",
                  self._db_path, " ".join(str(cause).split()), aside)
        self._reopen_fresh()
        if self._on_loss is not None:
            self._on_loss(self._lost_at_ms)

    def _note_loss(self) -> None:
        # Never move the loss time backwards (a wall clock stepped back meanwhile).
        self._lost_at_ms = max(self._wall_ms(), self._lost_at_ms or 0)

    def _lost(self, why: str) -> None:
        """The open database is behind its mark: keep it (its ids still count) but record a
        loss, as for a corrupt file, and bring the counter up to the mark."""
        self._note_loss()
        mark = self._mark or 0
        log.error("replay store %s lost ids: %s; commands issued before now are refused as "
                  "REPLAYED until they expire", self._db_path, why)

        def op():
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            self._set_meta(conn, "lost_at_ms", self._lost_at_ms)
            self._set_meta(conn, "records", mark)
            conn.execute("COMMIT")
        self._guarded(op)
        self._records = mark
        if self._on_loss is not None:
            self._on_loss(self._lost_at_ms)

    def _read_mark(self) -> int | None:
        """The record count in replay.mark; None when absent. An unreadable mark is a loss
        of unknown size: it counts as larger than any database."""
        try:
            return int(json.loads(self._mark_path.read_text())["records"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("replay mark %s is unreadable (%s)", self._mark_path, e)
            return 1 << 62

    def _write_mark(self) -> None:
        try:
            atomic_write(self._mark_path, json.dumps({"records": self._records}).encode())
        except OSError as e:
            raise StorageError(f"replay mark {self._mark_path} cannot be written: {e}") from e
