"""Waiting on an observable event instead of sleeping: one helper for every test file."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 5.0, what: str = "condition",
               diag: Callable[[], str] | None = None, poll_s: float = 0.01) -> T:
    """Poll `predicate` until it returns something truthy and return that; raise AssertionError
    naming `what` (and `diag()`, if given) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"; {diag()}" if diag else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{extra}")
        time.sleep(poll_s)
