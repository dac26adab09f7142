"""SQLite plumbing shared by the durable stores (outbox, replay store).

WAL with synchronous=FULL (the car loses power), 512-byte pages and no secure_delete (fewer
bytes written per commit: flash wears), a quick_check when an existing file is
opened, one lock around one connection, and corruption handled by moving the files aside
and starting afresh rather than stopping the agent. Each store supplies its schema
(`_open_schema(conn)`) and what a recovery means for it (`_recovered(cause, aside)`).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

from ..errors import StorageError
from .atomic import fsync_dir

# Small pages for new files: a commit writes every page it touched (WAL frame = page + 24
# bytes), and these stores' rows are small or span overflow pages, so 512-byte pages write
# the least (bench/diskwrites.py). An existing file keeps the page size it was made with.
log = logging.getLogger("agent.sqlitedb")

PAGE_SIZE = 512
REBUILD_MAX_BYTES = 1 << 20  # an existing file up to this size is rebuilt with PAGE_SIZE
_CORRUPT_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


class CorruptDatabase(Exception):
    """quick_check reported damage."""


def is_corrupt(exc: BaseException) -> bool:
    if isinstance(exc, CorruptDatabase):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    return (isinstance(exc, sqlite3.DatabaseError) and code is not None
            and (code & 0xFF) in _CORRUPT_CODES)


class GuardedDb:
    """One connection behind one lock; subclasses set `_what`, `_dir`, `_db_path`."""

    _what = "database"

    def _init_db(self, directory: Path, name: str) -> None:
        self._dir = Path(directory)
        self._name = name
        self._db_path = self._dir / name
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None

    def _open(self) -> None:
        """Open (quick_check an existing file), apply the schema; CorruptDatabase if damaged."""
        existed = self._db_path.exists() and self._db_path.stat().st_size > 0
        conn = sqlite3.connect(self._db_path, isolation_level=None, check_same_thread=False,
                               timeout=10.0)
        try:
            if not existed:
                conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
            if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                raise StorageError(f"{self._what} {self._db_path}: WAL mode is unavailable on "
                                   "this filesystem; put it on a local disk")
            conn.execute("PRAGMA synchronous=FULL")
            # Debian's SQLite zeroes deleted content by default (SQLITE_SECURE_DELETE): every
            # freed overflow page would be written once more. Nothing here is secret from
            # whoever can read the file anyway.
            conn.execute("PRAGMA secure_delete=OFF")
            if existed:
                check = conn.execute("PRAGMA quick_check(1)").fetchone()
                if check is None or check[0] != "ok":
                    raise CorruptDatabase(f"quick_check: {check[0] if check else 'no result'}")
                self._small_pages(conn)
            self._open_schema(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _small_pages(self, conn: sqlite3.Connection) -> None:
        """A file made with larger pages (an earlier version) is rebuilt with PAGE_SIZE while
        it is small (VACUUM, which can change the page size only outside WAL mode; atomic
        through the rollback journal). A large one keeps its pages: rebuilding it would
        write more than it saves."""
        if conn.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE:
            return
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if self._db_path.stat().st_size > REBUILD_MAX_BYTES:
            return
        try:
            conn.execute("PRAGMA journal_mode=DELETE")
            conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
            conn.execute("VACUUM")
        except sqlite3.Error as e:  # e.g. no room for the copy: it only costs flash writes
            log.warning("%s %s keeps its larger pages (%s)", self._what, self._db_path, e)
        finally:
            conn.execute("PRAGMA journal_mode=WAL")

    def _open_or_recover(self) -> None:
        """Open at start; a corrupt file is moved aside and replaced (`_recover`)."""
        with self._lock:
            try:
                self._open()
            except (sqlite3.DatabaseError, CorruptDatabase) as e:
                if not is_corrupt(e):
                    raise self._storage_error(e) from e
                self._recover(e)

    def _open_schema(self, conn: sqlite3.Connection) -> None:
        raise NotImplementedError

    def _recover(self, cause: BaseException) -> None:
        raise NotImplementedError

    def _guarded(self, op):
        """Run `op` under the lock; recover from corruption once and retry on the fresh db."""
        with self._lock:
            if self._conn is None:
                raise StorageError(f"{self._what} {self._db_path} is closed")
            try:
                return op()
            except sqlite3.DatabaseError as e:
                if not is_corrupt(e):
                    raise self._storage_error(e) from e
                self._recover(e)
            try:
                return op()
            except sqlite3.Error as e:
                raise self._storage_error(e) from e

    def _storage_error(self, e: BaseException) -> StorageError:
        return StorageError(f"{self._what} {self._db_path} failed: {e}; check free space and "
                            f"permissions of {self._dir}")

    def _move_aside(self, cause: BaseException) -> Path:
        """Close and move the corrupt files to `<name>.corrupt-<ms>`; returns that path."""
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None
        stamp = time.time_ns() // 1_000_000
        while (self._dir / f"{self._name}.corrupt-{stamp}").exists():
            stamp += 1
        aside = self._dir / f"{self._name}.corrupt-{stamp}"
        try:
            for suffix in ("", "-wal", "-shm"):
                src = self._dir / (self._name + suffix)
                if src.exists():
                    os.replace(src, Path(str(aside) + suffix))
            fsync_dir(self._dir)
        except OSError as e:
            raise StorageError(f"{self._what} {self._db_path} is corrupt ({cause}) and could not "
                               f"be moved aside: {e}") from e
        return aside

    def _reopen_fresh(self) -> None:
        try:
            self._open()
        except (sqlite3.Error, CorruptDatabase) as e:
            raise StorageError(
                f"{self._what} {self._db_path}: a fresh database cannot be created: {e}") from e

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
