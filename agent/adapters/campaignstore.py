"""The applied campaigns on disk: `campaigns.json` in the storage directory.

The whole set is rewritten on every change (temp file, fsync, rename, fsync of the
directory), so after a crash or power cut the file holds either the old set or the new one,
never a mix. Documents are stored as they were applied; they are validated again on load
(the DBCs may have changed since).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from agent.errors import StorageError

from .atomic import atomic_write

log = logging.getLogger("agent.campaigns")

FILE_NAME = "campaigns.json"


class CampaignStore:
    def __init__(self, directory: Path):
        self.path = Path(directory) / FILE_NAME

    def load(self) -> list[dict]:
        """The stored documents; an unreadable file is logged and treated as empty (moved
        aside, so the next write does not lose the evidence)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            docs = data["campaigns"]
            if not isinstance(docs, list) or not all(isinstance(d, dict) for d in docs):
                raise ValueError("`campaigns` is not a list of maps")
            return docs
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as e:
            aside = self.path.with_name(FILE_NAME + ".bad")
            log.error("campaign store %s is unreadable (%s); moved to %s, starting with no "
                      "campaigns", self.path, e, aside)
            try:
                self.path.replace(aside)
            except OSError:
                pass
            return []

    def save(self, docs: list[dict]) -> None:
        """Replace the stored set durably. Raises StorageError."""
        data = json.dumps({"v": 1, "campaigns": docs}, sort_keys=True).encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, data, mode=0o600)
        except OSError as e:
            raise StorageError(f"campaign store {self.path} cannot be written: {e}") from e
