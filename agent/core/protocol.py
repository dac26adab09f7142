"""The wire protocol's vocabulary, in one place (PROTOCOL.md §1, §4, §5, §7). Pure.

Topic names, the §7 statuses and reasons, the payloads of the records the vehicle signs
(status, state, command status) and the version strings of update targets. Every other
module takes these names from here, so a reason is spelled once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from agent import __version__
from agent.errors import UpdateError

# -- §7 statuses and reasons ---------------------------------------------------------------

ACCEPTED, IN_PROGRESS = "ACCEPTED", "IN_PROGRESS"
SUCCEEDED, FAILED, REJECTED, TIMED_OUT = "SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT"
STATUSES = frozenset({ACCEPTED, IN_PROGRESS, SUCCEEDED, FAILED, REJECTED, TIMED_OUT})
TERMINAL_STATUSES = frozenset({SUCCEEDED, FAILED, REJECTED, TIMED_OUT})
_WITH_REASON = frozenset({FAILED, REJECTED, TIMED_OUT})

BAD_ENVELOPE = "BAD_ENVELOPE"
BAD_SIGNATURE = "BAD_SIGNATURE"
UNKNOWN_KEY = "UNKNOWN_KEY"
UNAUTHORIZED = "UNAUTHORIZED"
WRONG_VEHICLE = "WRONG_VEHICLE"
EXPIRED = "EXPIRED"
REPLAYED = "REPLAYED"
UNKNOWN_COMMAND = "UNKNOWN_COMMAND"
BAD_PARAMS = "BAD_PARAMS"
PRECONDITION_FAILED = "PRECONDITION_FAILED"
BUSY = "BUSY"
WRITE_FAILED = "WRITE_FAILED"
NO_RESPONSE = "NO_RESPONSE"
DOWNLOAD_FAILED = "DOWNLOAD_FAILED"
VERIFICATION_FAILED = "VERIFICATION_FAILED"
INSTALL_FAILED = "INSTALL_FAILED"
CANCELLED = "CANCELLED"
SUPERSEDED = "SUPERSEDED"
INTERNAL_ERROR = "INTERNAL_ERROR"
REASONS = frozenset({
    BAD_ENVELOPE, BAD_SIGNATURE, UNKNOWN_KEY, UNAUTHORIZED, WRONG_VEHICLE, EXPIRED, REPLAYED,
    UNKNOWN_COMMAND, BAD_PARAMS, PRECONDITION_FAILED, BUSY, WRITE_FAILED, NO_RESPONSE,
    DOWNLOAD_FAILED, VERIFICATION_FAILED, INSTALL_FAILED, CANCELLED, SUPERSEDED, INTERNAL_ERROR,
})


class Topics:
    """The topic names of one vehicle (§1)."""

    def __init__(self, prefix: str):
        self.telemetry = f"{prefix}/telemetry"
        self.state = f"{prefix}/state"
        self.status = f"{prefix}/status"
        self.commands = f"{prefix}/commands"
        self.responses = f"{prefix}/responses"
        self.diagnostics = f"{prefix}/diagnostics"


POWER_STATES = frozenset({"awake", "asleep", "protect"})


def status_record(vin: str, t_ms: int, online: bool, power: str | None = None, *,
                  clock: str | None = None, key: dict | None = None) -> dict:
    """§5: the online/offline record (the offline one is the MQTT will). `power` (§10) is
    left out when awake or unknown: absent means awake. clock: "ok" or "behind"
    (core/clock.py); key: {"kid", "prev", "proof"} after a key rotation."""
    out = {"v": 1, "vin": vin, "t": t_ms, "online": online, "agent": __version__}
    if power is not None and power != "awake":
        if power not in POWER_STATES:
            raise ValueError(f"unknown power state {power!r}")
        out["power"] = power
    if clock is not None:
        if clock not in ("ok", "behind"):
            raise ValueError(f"clock must be 'ok' or 'behind', not {clock!r}")
        out["clock"] = clock
    if key is not None:
        out["key"] = dict(key)
    return out


def state_payload(vin: str, t_ms: int, values: dict) -> dict:
    """§4: last-known state; values maps name -> [t_ms last observed, value]."""
    return {"v": 1, "vin": vin, "t": t_ms, "values": values}


def response_payload(vin: str, id: str | None, t_ms: int, status: str, reason: str | None = None,
                   detail: str | None = None, progress: int | None = None,
                   result: Mapping | None = None) -> dict:
    """A §7 command status payload (to be signed); absent optional keys are omitted.

    Raises ValueError for an unknown status or reason, a reason missing on (or given with a
    status other than) FAILED/REJECTED/TIMED_OUT, or progress outside 0..100.
    """
    if status not in STATUSES:
        raise ValueError(f"unknown command status {status!r}")
    if (reason is not None) != (status in _WITH_REASON):
        raise ValueError(f"a reason goes with FAILED, REJECTED and TIMED_OUT only (got {status} "
                         f"with reason {reason!r})")
    if reason is not None and reason not in REASONS:
        raise ValueError(f"unknown reason {reason!r}")
    body: dict[str, Any] = {"v": 1, "vin": vin, "id": id, "t": t_ms, "status": status}
    if reason is not None:
        body["reason"] = reason
    if detail is not None:
        body["detail"] = detail
    if progress is not None:
        if type(progress) is not int or not 0 <= progress <= 100:
            raise ValueError(f"progress must be an int 0..100, not {progress!r}")
        body["progress"] = progress
    if result is not None:
        body["result"] = dict(result)
    return body


# -- versions -------------------------------------------------------------------------------

_VERSION = re.compile(r"[0-9]+(?:\.[0-9]+)*", re.ASCII)
_MAX_VERSION_CHARS = 64


def parse_version(text: Any) -> tuple[int, ...]:
    """"1.10.2" -> (1, 10, 2), trailing zeros dropped so "1.2" == "1.2.0".

    Raises UpdateError(VERIFICATION_FAILED) for anything that is not dot-separated decimal
    numbers (no signs, spaces, letters, empty parts, "1.2-rc1").
    """
    if type(text) is not str or len(text) > _MAX_VERSION_CHARS or not _VERSION.fullmatch(text):
        raise UpdateError(VERIFICATION_FAILED,
                          f"version {text!r}: expected dotted decimal numbers such as 1.4.2")
    parts = [int(p) for p in text.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def is_newer(candidate: str, installed: str) -> bool:
    """True when `candidate` is strictly newer than `installed` (both parsed numerically)."""
    return parse_version(candidate) > parse_version(installed)
