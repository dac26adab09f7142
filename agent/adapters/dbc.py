"""Loading CAN databases (DBC, KCD, ARXML, SYM) with cantools, with one-line errors.

With a cache directory, a parsed database is kept there as a pickle named by the SHA-256 of
the file's bytes (plus the cantools and Python versions): a warm start skips the parse, which
for a large DBC costs more than the rest of start-up on a slow CPU. A changed file has another
hash, so it is parsed afresh; an unreadable cache entry is parsed afresh and rewritten; a cache
that cannot be written only costs the parse. The directory is the agent's own (storage.dir):
a pickle is loaded only from where the agent itself writes.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
import sys
from pathlib import Path

import cantools

from .atomic import atomic_write

from ..errors import DbcError

log = logging.getLogger("agent.dbc")

_LINE = re.compile(r"line (\d+), column (\d+)")
CACHE_VERSION = 1  # bump when what is cached changes meaning


def load_database(path: str | Path, cache_dir: str | Path | None = None
                  ) -> cantools.database.can.Database:
    """Parse one CAN database file (or take it from `cache_dir`, keyed by the file's hash).
    Raises DbcError naming the file and, where known, the line."""
    path = Path(path)
    if cache_dir is None:
        return _parse(path)
    try:
        raw = path.read_bytes()
    except OSError:
        return _parse(path)  # for its error message
    entry = Path(cache_dir) / f"{cache_key(raw)}.pickle"
    try:
        db = pickle.loads(entry.read_bytes())
        if isinstance(db, cantools.database.can.Database):
            return db
    except FileNotFoundError:
        pass
    except Exception as e:  # a truncated or foreign entry: parse again, rewrite it
        log.warning("DBC cache entry %s unreadable (%s); parsing %s again", entry, e, path)
    db = _parse(path)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(entry, pickle.dumps(db, protocol=pickle.HIGHEST_PROTOCOL), durable=False)
    except (OSError, pickle.PicklingError, TypeError, AttributeError) as e:
        log.warning("cannot cache the parsed %s under %s: %s", path, cache_dir, e)
    return db


def cache_key(raw: bytes) -> str:
    """The cache entry's name: what the pickle depends on (the bytes, cantools, Python)."""
    h = hashlib.sha256(raw)
    h.update(f"|{CACHE_VERSION}|{cantools.__version__}|{sys.version_info[:2]}|strict=False"
             .encode())
    return h.hexdigest()


def _parse(path: Path) -> cantools.database.can.Database:
    if path.is_dir():
        raise DbcError(f"{path}: is a directory, not a CAN database file")
    if not path.is_file():
        raise DbcError(f"{path}: no such CAN database file")
    _check_text(path)
    try:
        # strict=False: real-world DBCs often have overlapping signals that cantools' strict
        # mode rejects though every decoder in the field accepts them.
        db = cantools.database.load_file(str(path), strict=False)
    except Exception as e:  # cantools raises many types (its own, textparser, lxml, ValueError)
        raise DbcError(f"{path}: {_describe(e)}") from e
    if not isinstance(db, cantools.database.can.Database):
        raise DbcError(f"{path}: not a CAN database (cantools read it as {type(db).__name__})")
    return db


def _check_text(path: Path) -> None:
    # Every format cantools reads is text; its parser would echo binary garbage back.
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise DbcError(f"{path}: cannot read: {e.strerror or e}") from None
    if not head:
        raise DbcError(f"{path}: empty file, not a CAN database")
    if b"\0" in head and not head.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 XML is fine
        raise DbcError(f"{path}: binary file, not a CAN database (DBC/KCD/ARXML/SYM text)")


def load_databases(paths, cache_dir: str | Path | None = None
                   ) -> list[cantools.database.can.Database]:
    return [load_database(p, cache_dir) for p in paths]


def _describe(e: Exception) -> str:
    text = " ".join(str(e).split())
    m = _LINE.search(text)
    if m:
        near = text.split(">>!<<", 1)[1].strip(" \"'") if ">>!<<" in text else ""
        near = f" near {near[:40]!r}" if near else ""
        return f"line {m.group(1)}, column {m.group(2)}: invalid syntax{near}"
    return text or type(e).__name__
