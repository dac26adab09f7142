"""The running agent's status, written as JSON under storage.dir for `tcu-agent status`.

A file rather than a socket: it works under systemd's ProtectSystem/PrivateTmp hardening with
no extra listener, and it still tells a field engineer what the agent last saw after it died.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .atomic import atomic_write

NAME = "status.json"
STALE_S = 5.0  # the agent rewrites it every second


def write_status(directory: Path, status: dict) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    data = json.dumps({**status, "pid": os.getpid(), "written_ms": int(time.time() * 1000)},
                      default=str, indent=1).encode()
    atomic_write(Path(directory) / NAME, data, durable=False)


def read_status(directory: Path) -> tuple[dict | None, str]:
    """(status, why-not): status is None when no agent is running there."""
    path = Path(directory) / NAME
    try:
        status = json.loads(path.read_text())
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
