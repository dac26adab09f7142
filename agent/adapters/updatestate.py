"""The update record on disk: one JSON file replaced atomically (temp, fsync, rename, fsync dir).

A power cut leaves either the old record or the new one, never a mix: `atomic_write` never
writes the real file in place. A crash may leave a `.update-state.json.*.tmp` behind; it is
ignored by `load` and removed by the next `save`.
"""

from __future__ import annotations

from pathlib import Path

from agent.core.updates import UpdateState
from agent.errors import StorageError

from .atomic import atomic_write

FILENAME = "update-state.json"


class UpdateStateStore:
    """load/save the UpdateState in `directory` (created if missing)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / FILENAME

    def load(self) -> UpdateState | None:
        """The saved record, or None when there is none.

        Raises StorageError when the file cannot be read or is not a valid record (it is never
        half-written by save(), so that means outside damage: say where).
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageError(f"update state {self.path}: cannot read: {e}") from e
        try:
            return UpdateState.from_json(data)
        except ValueError as e:
            raise StorageError(f"update state {self.path}: {e}; move the file away to start "
                               "over") from None

    def save(self, state: UpdateState) -> None:
        """Replace the record durably. Raises StorageError if it cannot be written."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(f".{FILENAME}.*.tmp"):
                stale.unlink(missing_ok=True)
            atomic_write(self.path, state.to_json(), mode=0o600)
        except OSError as e:
            raise StorageError(f"update state {self.path}: cannot write: {e}") from e
