"""The rental family (PROTOCOL.md §11): rental.revoke and rental.end, and the set of ended
rentals the gate refuses grants of. Sans-I/O: the file is agent/adapters/revocations.py.

A revocation is kept until `until_ms` = max(the revocation time + max_grant_ms, the latest
`exp` of a grant of that rental seen): grant windows are at most max_grant_ms long
(core/grants.py), so every grant of that rental is expired by then.

If the revocation memory was lost (unreadable file), every grant whose window began before the
loss is refused (`floor_ms`): it may belong to a rental revoked before; grants that start later
are accepted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from agent.errors import ParamError

from .registry import Family, show

COMMANDS = frozenset({"rental.revoke", "rental.end"})
_RENTAL = re.compile(r"[A-Za-z0-9._:-]{1,64}", re.ASCII)


def check_params(name: str, params: Mapping[str, Any]) -> None:
    extra = sorted(set(params) - {"rental"})
    if extra:
        raise ParamError(f"{name} takes no parameter {show(extra[0])}")
    rental = params.get("rental")
    if type(rental) is not str or not _RENTAL.fullmatch(rental):
        raise ParamError(f"{name}: rental must be 1-64 characters of A-Z a-z 0-9 . _ : -")


FAMILY = Family("rental", COMMANDS, check_params)


class Revocations:
    """rental id -> kept until (ms), plus the loss floor. Mutating methods return True when
    the caller must persist."""

    def __init__(self, revoked: Mapping[str, int] | None = None, floor_ms: int = 0):
        self._revoked = dict(revoked or {})
        self.floor_ms = floor_ms

    def revoked(self, rental: str, nbf_ms: int = 0) -> bool:
        return rental in self._revoked or nbf_ms < self.floor_ms

    def add(self, rental: str, until_ms: int) -> bool:
        if self._revoked.get(rental, -1) >= until_ms:
            return False
        self._revoked[rental] = until_ms
        return True

    def purge(self, now_ms: int) -> bool:
        old = [r for r, until in self._revoked.items() if until < now_ms]
        for r in old:
            del self._revoked[r]
        return bool(old)

    def lost(self, at_ms: int) -> None:
        self.floor_ms = max(self.floor_ms, at_ms)

    def __len__(self) -> int:
        return len(self._revoked)

    def until(self, rental: str) -> int | None:
        return self._revoked.get(rental)

    def to_bytes(self) -> bytes:
        return json.dumps({"v": 1, "floor_ms": self.floor_ms, "revoked": self._revoked},
                          sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Revocations:
        """Raises ValueError for anything but what to_bytes wrote."""
        raw = json.loads(data)
        if not isinstance(raw, dict) or raw.get("v") != 1:
            raise ValueError("not a revocation record")
        floor, revoked = raw.get("floor_ms"), raw.get("revoked")
        if type(floor) is not int or not isinstance(revoked, dict) or not all(
                type(k) is str and type(v) is int for k, v in revoked.items()):
            raise ValueError("not a revocation record")
        return cls(revoked, floor)


def report(rental: str, now_ms: int, lookup, signals: Mapping[str, str],
           extra: Mapping[str, Any] | None = None) -> dict:
    """The end-of-rental report: {"rental", "t"} plus each configured report field from its
    signal's latest value (None when never seen), then `extra` (position, DTCs, ...)."""
    out: dict[str, Any] = {"rental": rental, "t": now_ms}
    for field, signal in signals.items():
        seen = lookup(signal)
        out[field] = None if seen is None else _plain(seen[0])
    for k, v in (extra or {}).items():
        out[k] = v
    return out


def _plain(value: Any) -> Any:
    """A decoded value as CBOR plain data (cantools NamedSignalValue -> its name)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    name = getattr(value, "name", None)
    return name if isinstance(name, str) else str(value)
