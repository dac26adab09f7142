"""What the core thread takes from its queue (runtime.py). Other threads only ever put these.

    Frame          a CAN frame from a bus reader: (bus index, t, can id, data)
    Values         named values from a non-CAN source (modem, GNSS)
    CommandMessage a message received on the commands topic (from the MQTT thread)
    UpdateEvent    a job of the update worker reporting back (core/updates.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.updates import UpdateEvent

# A plain tuple, not a dataclass: at every frame, building and unpacking a frozen slotted
# dataclass costs ~0.9 us against ~0.05 us for the tuple (timeit on this machine), which is
# about a fifth of the core's whole per-frame budget at 200,000 frames/s. The core's
# feed_many takes these tuples as they are.
Frame = tuple[int, float, int, bytes]


@dataclass(frozen=True, slots=True)
class Values:
    """Named values from a non-CAN source (modem, GNSS), for the core thread."""

    t: float  # UTC seconds
    values: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CommandMessage:
    payload: bytes  # as received; the CommandGate decides everything about it


CoreMessage = Frame | Values | CommandMessage | UpdateEvent

__all__ = ["CommandMessage", "CoreMessage", "Frame", "UpdateEvent", "Values"]
