"""Ended and revoked rentals on disk: `{storage.dir}/revocations.json` (core/rental.py).

A file of its own, not a table of replay.db: a lost or deleted replay database must not bring
an ended rental back. Every change is written with atomic_write (temp file, fsync, rename,
fsync of the directory) before the command that made it is answered.

An unreadable file is moved aside (`revocations.json.corrupt`) and the loss noted as the
floor: grants whose window began before it are refused from then on.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from agent.core.rental import Revocations
from agent.errors import AgentError

from .atomic import atomic_write

log = logging.getLogger("agent.rental")

FILE = "revocations.json"


class RevocationFile:
    def __init__(self, storage_dir: Path, now_ms: int):
        self.path = Path(storage_dir) / FILE
        try:
            self.state = Revocations.from_bytes(self.path.read_bytes())
        except FileNotFoundError:
            self.state = Revocations()
        except (OSError, ValueError) as e:
            log.error("%s unreadable (%s): refusing every grant that began before now", self.path, e)
            try:
                os.replace(self.path, self.path.with_name(FILE + ".corrupt"))
            except OSError:
                pass
            self.state = Revocations()
            self.state.lost(now_ms)
            self._write()
        if self.state.purge(now_ms):
            self._write()

    def revoked(self, rental: str, nbf_ms: int) -> bool:
        return self.state.revoked(rental, nbf_ms)

    def revoke(self, rental: str, until_ms: int, now_ms: int) -> None:
        """Durable before it returns; raises AgentError when it cannot be written."""
        changed = self.state.purge(now_ms)
        if self.state.add(rental, until_ms) or changed:
            self._write()

    def _write(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, self.state.to_bytes(), mode=0o600)
        except OSError as e:
            raise AgentError(f"{self.path}: cannot record the revocation: {e}") from None
