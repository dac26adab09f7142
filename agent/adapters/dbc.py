"""Loading CAN databases (DBC, KCD, ARXML, SYM) with cantools, with one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import cantools

from ..errors import DbcError

FORMATS = (".dbc", ".kcd", ".arxml", ".sym", ".cdd")  # the suffixes cantools reads
_LINE = re.compile(r"line (\d+), column (\d+)")


def load_database(path: str | Path) -> cantools.database.can.Database:
    """Parse one CAN database file. Raises DbcError naming the file and, where known, the line."""
    path = Path(path)
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
