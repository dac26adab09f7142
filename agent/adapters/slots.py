"""A/B slots: where a verified artifact is installed and which one is active.

`SlotBackend` is the port (RAUC, a bootloader, ... would implement it); `DirectorySlots` is
the backend for development, tests and demos: slots are directories `a/` and `b/` under a
base directory.

    base/active        "a\\n"  - the active slot, replaced atomically
    base/pending.json  {"slot": "b", "previous": "a", "boots": 0} - a switch not yet confirmed
    base/a/, base/b/   payload (the artifact) and meta.json ({"version", "sha256", "target"})

Power-loss safety: every file is replaced with atomic_write (temp, fsync, rename, fsync dir);
a slot is built in `.b.new/` and renamed into place only when complete; the active slot is
never written by install_inactive, and switch_active writes the pending marker BEFORE the
active pointer, so a cut between the two is seen at start as "switch did not happen".
"""

from __future__ import annotations

import abc
import json
import os
import shutil
from pathlib import Path
from typing import Any

from agent.errors import SlotError

from .atomic import atomic_write, fsync_dir

SLOTS = ("a", "b")
_COPY_CHUNK = 1 << 20


class SlotBackend(abc.ABC):
    """Install into the inactive slot, switch, confirm or roll back. Raises SlotError."""

    @abc.abstractmethod
    def install_inactive(self, artifact: Path, meta: dict[str, Any] | None = None) -> str:
        """Install `artifact` into the inactive slot; return that slot's name."""

    @abc.abstractmethod
    def discard_inactive(self) -> None:
        """Remove what was installed in the inactive slot (a cancelled or superseded stage)."""

    @abc.abstractmethod
    def payload(self, slot: str) -> Path:
        """The installed artifact of `slot` (to check its hash again before activating)."""

    @abc.abstractmethod
    def switch_active(self, slot: str) -> None:
        """Make `slot` active on trial (a pending activation until mark_good)."""

    @abc.abstractmethod
    def note_boot(self) -> int:
        """Count one start of a pending activation; return the count (0 if none pending)."""

    @abc.abstractmethod
    def mark_good(self) -> None:
        """Confirm the pending activation."""

    @abc.abstractmethod
    def roll_back(self) -> None:
        """Return to the slot that was active before the pending activation."""

    @abc.abstractmethod
    def report(self) -> dict[str, Any]:
        """{"active": slot, "pending": {"slot", "previous", "boots"} | None, "slots": {..}}."""


class DirectorySlots(SlotBackend):
    """Slots as directories under `base`; slot `a` is active on a fresh base."""

    def __init__(self, base: Path):
        self.base = Path(base)
        self._active_file = self.base / "active"
        self._pending_file = self.base / "pending.json"

    # -- reading ---------------------------------------------------------------------------

    def active(self) -> str:
        try:
            name = self._active_file.read_text().strip()
        except FileNotFoundError:
            return SLOTS[0]
        except OSError as e:
            raise SlotError(f"slots {self.base}: cannot read the active slot: {e}") from e
        if name not in SLOTS:
            raise SlotError(f"slots {self._active_file}: unknown slot {name!r}")
        return name

    def inactive(self) -> str:
        return SLOTS[1] if self.active() == SLOTS[0] else SLOTS[0]

    def pending(self) -> dict[str, Any] | None:
        try:
            raw = json.loads(self._pending_file.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise SlotError(f"slots {self._pending_file}: unreadable: {e}") from e
        if (not isinstance(raw, dict) or raw.get("slot") not in SLOTS
                or raw.get("previous") not in SLOTS or type(raw.get("boots")) is not int):
            raise SlotError(f"slots {self._pending_file}: not a pending-activation record")
        return raw

    def meta(self, slot: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.base / slot / "meta.json").read_bytes())
        except (OSError, ValueError):
            return None

    def report(self) -> dict[str, Any]:
        return {"active": self.active(), "pending": self.pending(),
                "slots": {s: self.meta(s) for s in SLOTS}}

    # -- writing ---------------------------------------------------------------------------

    def install_inactive(self, artifact: Path, meta: dict[str, Any] | None = None) -> str:
        if self.pending() is not None:
            raise SlotError("an activation is pending confirmation; confirm or roll it back "
                            "before installing another update")
        slot = self.inactive()
        final = self.base / slot
        work = self.base / f".{slot}.new"
        try:
            self.base.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            _durable_copy(Path(artifact), work / "payload")
            atomic_write(work / "meta.json", json.dumps(meta or {}, sort_keys=True).encode())
            fsync_dir(work)
            old = self.base / f".{slot}.old"
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                os.replace(final, old)
            os.replace(work, final)
            fsync_dir(self.base)
            shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            shutil.rmtree(work, ignore_errors=True)
            raise SlotError(f"installing {artifact} into slot {slot} failed: {e}; the active "
                            f"slot {self.active()} is unchanged") from e
        return slot

    def discard_inactive(self) -> None:
        if self.pending() is not None:
            raise SlotError("an activation is pending; the inactive slot is the fallback")
        slot = self.inactive()
        try:
            for name in (slot, f".{slot}.new", f".{slot}.old"):
                if (self.base / name).exists():
                    shutil.rmtree(self.base / name)
            if self.base.exists():
                fsync_dir(self.base)
        except OSError as e:
            raise SlotError(f"cannot clear slot {slot}: {e}") from e

    def payload(self, slot: str) -> Path:
        if slot not in SLOTS:
            raise SlotError(f"unknown slot {slot!r}")
        return self.base / slot / "payload"

    def switch_active(self, slot: str) -> None:
        current = self.active()
        if slot not in SLOTS or slot == current:
            raise SlotError(f"cannot switch to slot {slot!r}: the active slot is {current}")
        if not (self.base / slot / "payload").is_file():
            raise SlotError(f"cannot switch to slot {slot}: nothing installed there")
        if self.pending() is not None:
            raise SlotError("an activation is already pending")
        try:
            # Marker first: a cut before the pointer moves reads as "switch did not happen".
            atomic_write(self._pending_file, json.dumps(
                {"slot": slot, "previous": current, "boots": 0}).encode())
            atomic_write(self._active_file, f"{slot}\n".encode())
        except OSError as e:
            raise SlotError(f"switching to slot {slot} failed: {e}") from e

    def note_boot(self) -> int:
        pending = self.pending()
        if pending is None:
            return 0
        pending["boots"] += 1
        try:
            atomic_write(self._pending_file, json.dumps(pending).encode())
        except OSError as e:
            raise SlotError(f"slots {self._pending_file}: cannot count the boot: {e}") from e
        return pending["boots"]

    def mark_good(self) -> None:
        pending = self.pending()
        if pending is None or pending["slot"] != self.active():
            raise SlotError("no pending activation of the active slot to confirm")
        self._drop_pending()

    def roll_back(self) -> None:
        pending = self.pending()
        if pending is None:
            raise SlotError("no pending activation to roll back")
        try:
            if self.active() != pending["previous"]:
                atomic_write(self._active_file, f"{pending['previous']}\n".encode())
        except OSError as e:
            raise SlotError(f"rolling back to slot {pending['previous']} failed: {e}") from e
        self._drop_pending()

    def _drop_pending(self) -> None:
        try:
            self._pending_file.unlink(missing_ok=True)
            fsync_dir(self.base)
        except OSError as e:
            raise SlotError(f"slots {self._pending_file}: cannot remove: {e}") from e


def _durable_copy(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        shutil.copyfileobj(fin, fout, _COPY_CHUNK)
        fout.flush()
        os.fsync(fout.fileno())
