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


def read_frames(path: str | Path, stats: dict | None = None) -> Iterator[Frame]:
    """Yield the frames of a log. Raises LogFormatError naming the file and line.

    `stats`, if given, gets "skipped_lines": lines the reader could not parse and skipped
    (counted where python-can reports them; candump lines that do not parse are fatal)."""
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
    if path.suffix.lower() == ".log":
        return _read_candump(path)
    return _read_python_can(path, stats)


def _no_frames(path: Path, kind: str, why: str = "") -> LogFormatError:
    article = "an" if kind[:1] in "AEFHILMNORSX" else "a"  # as spoken: an ASC, a BLF
    return LogFormatError(f"{path}: no CAN frames could be read: not {article} {kind} log?{why}")


def _read_candump(path: Path) -> Iterator[Frame]:
    # python-can's CanutilsLogReader costs ~7 us/frame; this reads the same format in ~1 us.
    try:
        f = open(path, encoding="ascii")
    except OSError as e:
        raise LogFormatError(f"{path}: cannot open: {e.strerror}") from None
    with f:
        lineno = 0
        frames = 0
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip() or line.startswith("#"):
                    continue
                ts, channel, frame = line.split()
                if ts[0] != "(" or ts[-1] != ")":
                    raise ValueError("timestamp not in parentheses")
                frames += 1
                ident, _, payload = frame.partition("#")
                if payload.startswith("R") or not ident:
                    continue  # remote frame
                can_id = int(ident, 16)
                if len(ident) > 3:
                    if can_id & _CAN_ERR_FLAG:
                        continue  # error frame
                    can_id = (can_id & 0x1FFFFFFF) | EFF_FLAG
                if payload.startswith("#"):
                    payload = payload[2:]  # CAN FD: "##<flags nibble><data>"
                yield float(ts[1:-1]), channel, can_id, bytes.fromhex(payload)
        except UnicodeDecodeError:
            raise LogFormatError(f"{path}:{lineno + 1}: not a text candump log") from None
        except ValueError as e:
            raise LogFormatError(f"{path}:{lineno}: not a candump -L line "
                                 f"'(time) channel ID#DATA': {e}") from None
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
            raise LogFormatError(f"{path}: {e}") from None
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
