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
  Deleting replay.db by hand is not detected: do not.
* Time is wall-clock ms passed in; a clock stepped far forward purges ids early.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

from agent.errors import StorageError

from .sqlitedb import GuardedDb

log = logging.getLogger("agent.replaystore")

DB_NAME = "replay.db"
PURGE_INTERVAL_MS = 60_000  # record() purges expired ids at most this often

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS seen (
        id TEXT PRIMARY KEY, digest BLOB NOT NULL, exp_ms INTEGER NOT NULL,
        recorded_ms INTEGER NOT NULL, status BLOB) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS seen_exp ON seen(exp_ms)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
)


class ReplayStore(GuardedDb):
    """Seen command ids in `directory/replay.db`; see the module docstring."""

    _what = "replay store"

    def __init__(self, directory: str | os.PathLike[str],
                 on_loss: Callable[[int], None] | None = None):
        """Open (or create) the database; a corrupt one is moved aside and replaced.

        `on_loss(lost_at_ms)` is called whenever seen ids are lost to corruption, including
        during this constructor. Raises StorageError when the directory cannot be used.
        """
        self._init_db(Path(directory), DB_NAME)
        self._on_loss = on_loss
        self._lost_at_ms: int | None = None
        self._last_purge_ms: int | None = None
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"replay store directory {self._dir} cannot be created: {e}") from e
        self._open_or_recover()

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
        def op():
            cur = self._conn.execute(
                "INSERT INTO seen (id, digest, exp_ms, recorded_ms) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(id) DO NOTHING", (command_id, bytes(digest), exp_ms, now_ms))
            return cur.rowcount == 1
        added = self._guarded(op)
        if self._last_purge_ms is None or now_ms - self._last_purge_ms >= PURGE_INTERVAL_MS:
            self.purge(now_ms)
        return added

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
        """Forget ids whose exp has passed (exp_ms <= now_ms); return how many."""
        def op():
            return self._conn.execute("DELETE FROM seen WHERE exp_ms <= ?", (now_ms,)).rowcount
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

    def _open_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        for statement in _SCHEMA:
            conn.execute(statement)
        if self._lost_at_ms is not None:  # a fresh db after a loss: remember when
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('lost_at_ms', ?)",
                         (self._lost_at_ms,))
        conn.execute("COMMIT")
        row = conn.execute("SELECT value FROM meta WHERE key = 'lost_at_ms'").fetchone()
        self._lost_at_ms = None if row is None else row[0]

    def _recover(self, cause: BaseException) -> None:
        """Move the corrupt database aside and open a fresh one; StorageError if impossible."""
        # Never move the loss time backwards (a wall clock stepped back meanwhile).
        self._lost_at_ms = max(time.time_ns() // 1_000_000, self._lost_at_ms or 0)
        aside = self._move_aside(cause)
        log.error("replay store %s is corrupt (%s); moved it to %s and started a fresh one; "
                  "commands issued before now are refused as REPLAYED until they expire",
                  self._db_path, " ".join(str(cause).split()), aside)
        self._reopen_fresh()
        if self._on_loss is not None:
            self._on_loss(self._lost_at_ms)
