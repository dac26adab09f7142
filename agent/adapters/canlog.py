"""Reading CAN log files: candump -L text fast, everything else through python-can's LogReader.

Frames come out as (t seconds, channel, can_id, data) with can_id carrying SocketCAN's
EFF flag for 29-bit ids. Remote and error frames are skipped (they carry no signal data).
A file that holds no frame at all is an error: it is almost always the wrong file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import can

from ..core.selection import EFF_FLAG
from ..errors import LogFormatError

Frame = tuple[float, str, int, bytes]
_CAN_ERR_FLAG = 0x20000000


SKIPPED_SHOWN = 5  # line numbers of skipped lines kept for the summary


def read_frames(path: str | Path, stats: dict | None = None,
                strict: bool = False) -> Iterator[Frame]:
    """Yield the frames of a log. Raises LogFormatError naming the file and line.

    `stats`, if given, gets "skipped_lines" (lines that are not a complete frame, skipped) and,
    for candump logs, "skipped_at" (the first few of their line numbers). `strict`: the first
    such line is an error instead."""
    path = Path(path)
    if path.is_dir():
        raise LogFormatError(f"{path}: is a directory, not a log file")
    if not path.is_file():
        raise LogFormatError(f"{path}: no such log file")
    if path.stat().st_size == 0:
        raise LogFormatError(f"{path}: empty log file, no CAN frames")
    if stats is None:
        stats = {}
    stats["skipped_lines"] = 0
    stats["skipped_at"] = []
    if path.suffix.lower() == ".log":
        return _read_candump(path, stats, strict)
    return _read_python_can(path, stats)


def supported_formats() -> str:
    return ".log (candump -L), " + ", ".join(
        s for s in sorted(can.io.player.MESSAGE_READERS) if s != ".log") + " (optionally .gz)"


def _no_frames(path: Path, kind: str, why: str = "") -> LogFormatError:
    article = "an" if kind[:1] in "AEFHILMNORSX" else "a"  # as spoken: an ASC, a BLF
    return LogFormatError(f"{path}: no CAN frames could be read: not {article} {kind} log?{why}")


def parse_candump_line(line: str) -> Frame | None:
    """One `(time) channel ID#DATA` line as a frame; None for a remote or error frame.
    Raises ValueError unless the whole line parses (a line cut short is not a frame)."""
    ts, channel, frame = line.split()  # ValueError unless exactly three fields
    if len(ts) < 3 or ts[0] != "(" or ts[-1] != ")":
        raise ValueError("timestamp not in parentheses")
    t = float(ts[1:-1])
    ident, sep, payload = frame.partition("#")
    if not sep:
        raise ValueError("no '#' between the id and the data")
    if len(ident) not in (3, 8):
        raise ValueError(f"id {ident!r}: 3 or 8 hex digits")
    can_id = int(ident, 16)
    if payload.startswith("R"):
        return None  # remote frame
    if len(ident) == 8:
        if can_id & _CAN_ERR_FLAG:
            return None  # error frame
        can_id = (can_id & 0x1FFFFFFF) | EFF_FLAG
    if payload.startswith("#"):
        int(payload[1:2], 16)  # CAN FD: "##<flags nibble><data>"
        payload = payload[2:]
    if len(payload) % 2 or len(payload) > 128:
        raise ValueError("data: an even number of hex digits, at most 64 bytes")
    return t, channel, can_id, bytes.fromhex(payload)


def _read_candump(path: Path, stats: dict, strict: bool) -> Iterator[Frame]:
    # python-can's CanutilsLogReader costs ~7 us/frame; this reads the same format in ~1 us.
    try:
        f = open(path, encoding="ascii", errors="surrogateescape")
    except OSError as e:
        raise LogFormatError(f"{path}: cannot open: {e.strerror}") from None
    parse = parse_candump_line
    skipped_at = stats["skipped_at"]
    frames = 0
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip() or line.startswith("#"):
                continue
            try:
                frame = parse(line)
            except ValueError as e:
                binary = not line.isascii()  # undecodable bytes, kept as surrogates
                if strict or (binary and not frames):
                    what = "not a text candump log" if binary else (
                        f"not a candump -L line '(time) channel ID#DATA': {e}")
                    raise LogFormatError(f"{path}:{lineno}: {what}") from None
                stats["skipped_lines"] += 1
                if len(skipped_at) < SKIPPED_SHOWN:
                    skipped_at.append(lineno)
                continue
            frames += 1
            if frame is not None:
                yield frame
    if not frames:
        raise _no_frames(path, "candump -L")


class _CountSkipped(logging.Filter):
    """Counts (and silences) python-can's per-line "Failed to parse" warnings."""

    def __init__(self, stats: dict):
        super().__init__()
        self.stats = stats

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        if "Failed to parse" in text:
            self.stats["skipped_lines"] += 1
            return False
        return "No file version was found" not in text  # INFO noise on any headerless .trc


def _read_python_can(path: Path, stats: dict) -> Iterator[Frame]:
    kind = (path.with_suffix("") if path.suffix == ".gz" else path).suffix[1:].upper()
    counter = _CountSkipped(stats)
    trc_log = logging.getLogger("can.io.trc")
    trc_log.addFilter(counter)
    try:
        yield from _python_can_frames(path, kind)
    finally:
        trc_log.removeFilter(counter)


def _python_can_frames(path: Path, kind: str) -> Iterator[Frame]:
    try:
        reader = can.LogReader(str(path))
    except OSError as e:
        raise LogFormatError(f"{path}: cannot open: {e.strerror or e}") from None
    except ValueError as e:
        if "No read support" in str(e):  # unknown suffix
            raise LogFormatError(f"{path}: unknown log format {path.suffix or '(no suffix)'}; "
                                 f"supported: {supported_formats()}") from None
        raise _no_frames(path, kind, f" ({e})") from None
    except Exception as e:  # BLF header: struct.error, BLFParseError; others: ImportError...
        raise _no_frames(path, kind, f" ({type(e).__name__}: {e})") from None
    count = 0
    try:
        for msg in reader:
            count += 1
            if msg.is_error_frame or msg.is_remote_frame:
                continue
            can_id = msg.arbitration_id | EFF_FLAG if msg.is_extended_id else msg.arbitration_id
            yield msg.timestamp, str(msg.channel or ""), can_id, bytes(msg.data)
    except Exception as e:  # python-can's readers raise assorted types on bad input
        why = f"{type(e).__name__}: {e}"
        if not count:
            raise _no_frames(path, kind, f" ({why})") from None
        raise LogFormatError(f"{path}: unreadable after {count} frames: {why}") from None
    finally:
        stop = getattr(reader, "stop", None)
        if stop:
            stop()
    if not count:
        raise _no_frames(path, kind)
