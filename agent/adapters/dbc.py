"""Loading CAN databases (DBC, KCD, ARXML, SYM) with cantools, with one-line errors."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
from pathlib import Path

import cantools

from ..errors import DbcError

FORMATS = (".dbc", ".kcd", ".arxml", ".sym", ".cdd")  # the suffixes cantools reads
_LINE = re.compile(r"line (\d+), column (\d+)")
log = logging.getLogger("agent.dbc")


def load_database(path: str | Path, cache_dir: Path | None = None) -> cantools.database.can.Database:
    """Parse one CAN database file. Raises DbcError naming the file and, where known, the line.

    With `cache_dir` (the agent's own storage), the parsed database is kept there, keyed by
    the file's content and the cantools version: a start then unpickles it (the Tesla DBC:
    0.05 s of CPU instead of 0.28 s). Any cache fault falls back to parsing."""
    if cache_dir is None:
        return _parse(Path(path))
    path = Path(path)
    try:
        key = hashlib.sha256(path.read_bytes() + cantools.__version__.encode()).hexdigest()[:32]
    except OSError:
        return _parse(path)  # _parse says what is wrong with the file
    cached = Path(cache_dir) / f"{key}.pickle"
    try:
        with open(cached, "rb") as f:
            return pickle.load(f)  # our own storage dir, written by this code
    except FileNotFoundError:
        pass
    except Exception as e:  # a torn or foreign file: parse again and replace it
        log.warning("DBC cache %s unreadable (%s); parsing %s", cached, e, path)
    db = _parse(path)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            pickle.dump(db, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, cached)
    except Exception as e:  # a full or read-only disk: the next start parses again
        log.warning("cannot write the DBC cache under %s: %s", cache_dir, e)
    return db


def _parse(path: Path) -> cantools.database.can.Database:
    if path.is_dir():
        raise DbcError(f"{path}: is a directory, not a CAN database file")
    if not path.is_file():
        raise DbcError(f"{path}: no such CAN database file")
    _check_text(path)
    if path.suffix.lower() not in FORMATS:  # cantools' own text for this is a Python repr
        raise DbcError(f"{path}: not a CAN database file name (supported: "
                       f"{', '.join(FORMATS)})")
    try:
        # strict=False: real-world DBCs often have overlapping signals that cantools' strict
        # mode rejects though every decoder in the field accepts them.
        db = cantools.database.load_file(str(path), strict=False)
    except Exception as e:  # cantools raises many types (its own, textparser, lxml, ValueError)
        why = _describe(e)
        if why.startswith("line 1, "):  # the very first line: not this format at all
            why = f"not a valid {path.suffix[1:].upper()} file? {why}"
        raise DbcError(f"{path}: {why}") from e
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


def load_databases(paths) -> list[cantools.database.can.Database]:
    return [load_database(p) for p in paths]


def _describe(e: Exception) -> str:
    text = " ".join(str(e).split())
    m = _LINE.search(text)
    if m:
        near = text.split(">>!<<", 1)[1].strip(" \"'") if ">>!<<" in text else ""
        near = f" near {near[:40]!r}" if near else ""
        return f"line {m.group(1)}, column {m.group(2)}: invalid syntax{near}"
    return text or type(e).__name__
