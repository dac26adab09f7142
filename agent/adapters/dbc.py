"""Loading CAN databases (DBC, KCD, ARXML, SYM) with cantools, with one-line errors."""

from __future__ import annotations

import gc
import hashlib
import logging
import marshal
import os
import pickle
import re
import sys
import zlib
from pathlib import Path
from types import CodeType

import cantools

from ..errors import DbcError

FORMATS = (".dbc", ".kcd", ".arxml", ".sym", ".cdd")  # the suffixes cantools reads
_LINE = re.compile(r"line (\d+), column (\d+)")
log = logging.getLogger("agent.dbc")
_MAGIC = b"TCUD"  # decoder cache files: magic, CRC-32 of the rest, marshal data


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
    gc.collect()  # the parser leaves cycles, and the agent starts with the collector off
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            pickle.dump(db, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, cached)
    except Exception as e:  # a full or read-only disk: the next start parses again
        log.warning("cannot write the DBC cache under %s: %s", cache_dir, e)
    return db


class DecoderCache:
    """The telemetry core's compiled decoders (core/fastdecode.py), kept next to the parsed
    databases: a warm start loads their code objects instead of compiling them again (the
    Tesla DBC's: ~35 ms of CPU). Given to the core as its `codes`; `save()` afterwards keeps
    what this start used, if that changed. Keyed by the decoder's own source text, so a
    changed database or selection only compiles what is new. Any fault: compile, carry on."""

    def __init__(self, cache_dir: Path):
        # marshal's format is the interpreter's own: one file per Python build
        tag = f"{sys.implementation.cache_tag}-{sys.hexversion:x}"
        self.path = Path(cache_dir) / f"decoders-{tag}.marshal"
        self._known: dict = {}
        self._used: dict = {}
        try:
            data = memoryview(self.path.read_bytes())  # our own storage dir, written by save()
            # A damaged code object could crash the interpreter at every start: checked first.
            if len(data) < 8 or zlib.crc32(data[8:]) != int.from_bytes(data[4:8], "little") \
                    or data[:4] != _MAGIC:
                raise ValueError("bad checksum")
            known = marshal.loads(data[8:])
            if type(known) is not dict or any(type(c) is not CodeType for c in known.values()):
                raise ValueError("not a table of code objects")
            self._known = known
        except FileNotFoundError:
            pass
        except Exception as e:  # a torn or foreign file: compile, and replace it
            log.warning("decoder cache %s unreadable (%s); compiling", self.path, e)

    def get(self, key):
        code = self._known.get(key)
        if code is not None:
            self._used[key] = code
        return code

    def __setitem__(self, key, code) -> None:
        self._used[key] = code

    def save(self) -> None:
        if self._used.keys() == self._known.keys():
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            data = marshal.dumps(self._used)
            with open(tmp, "wb") as f:
                f.write(_MAGIC + zlib.crc32(data).to_bytes(4, "little"))
                f.write(data)
            os.replace(tmp, self.path)
            self._known = dict(self._used)
        except Exception as e:  # a full or read-only disk: the next start compiles again
            log.warning("cannot write the decoder cache %s: %s", self.path, e)


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
