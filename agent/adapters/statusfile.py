"""The running agent's status, written as JSON under storage.dir for `tcu-agent status`.

A file rather than a socket: it works under systemd's ProtectSystem/PrivateTmp hardening with
no extra listener, and it still tells a field engineer what the agent last saw after it died.

Rewritten in place, not replaced: a new file every second would be a fresh page of flash
written every second, while the same page rewritten stays in the page cache and reaches the
disk once per writeback (about every 30 s). The text is padded with spaces to the file's
length (JSON allows trailing white space), so a shorter status never leaves old text behind,
and one pwrite replaces it; the writer holds an exclusive flock meanwhile and `read_status`
a shared one, so the CLI never reads half of each. Not fsynced: it is volatile by nature.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

NAME = "status.json"
STALE_S = 5.0  # the agent rewrites it every second


def write_status(directory: Path, status: dict) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    data = json.dumps({**status, "pid": os.getpid(), "written_ms": int(time.time() * 1000)},
                      default=str, indent=1).encode() + b"\n"
    fd = os.open(Path(directory) / NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _lock(fd, fcntl.LOCK_EX):
            return  # a reader stuck holding it: this second's status is skipped, not waited for
        size = os.fstat(fd).st_size
        if size > 2 * len(data) + 4096:  # once much larger (many buses then): start afresh
            os.ftruncate(fd, 0)
            size = 0
        if len(data) > size:  # room first: a full disk must not leave half a new status
            os.posix_fallocate(fd, 0, len(data))
        os.pwrite(fd, data.ljust(size, b" "), 0)
    finally:
        os.close(fd)  # releases the lock


def _lock(fd: int, how: int) -> bool:
    """flock without ever blocking for long: the core thread writes this file."""
    for _ in range(20):
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.001)
    return False


def read_status(directory: Path) -> tuple[dict | None, str]:
    """(status, why-not): status is None when no agent is running there."""
    path = Path(directory) / NAME
    try:
        with open(path, "rb") as f:
            _lock(f.fileno(), fcntl.LOCK_SH)  # else read anyway: a stopped writer holds it
            status = json.loads(f.read())
    except FileNotFoundError:
        return None, f"no agent has run with storage.dir {directory} (no {NAME})"
    except (OSError, ValueError) as e:
        return None, f"{path}: unreadable: {e}"
    age = time.time() - status.get("written_ms", 0) / 1000
    if not _alive(status.get("pid")) or age > STALE_S:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.get("written_ms", 0) / 1000))
        return None, f"no agent is running (pid {status.get('pid')} last wrote status at {when})"
    return status, ""


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True
