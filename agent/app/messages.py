"""What the core thread takes from its lanes (runtime.py). Other threads only ever put these.

    Frame          a CAN frame from a bus reader: (bus index, t, can id, data)      frames lane
    CommandMessage a message on the commands topic that passed the MQTT thread's
                   screen (CommandService.screen): to verify, or to answer refused  commands lane
    Values         named values from a non-CAN source (modem, GNSS)                 other lane
    UpdateEvent    a job of the update worker reporting back (core/updates.py)      other lane

Each lane is bounded (runtime.py): a full lane drops what arrives and counts it, so a flood on
one lane neither blocks the thread that feeds it nor starves the other lanes. Update events are
never dropped (there are a handful per update).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # core.updates is imported by the update service, when updates are on
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
    fingerprint: bytes | None = None  # of its signed parts (CommandGate.precheck)
    known: bool = False  # verified before: the screen already rate-limited it per command id
    refused: object | None = None  # a commands.Rejected from the precheck, to answer


if TYPE_CHECKING:
    CoreMessage = Frame | Values | CommandMessage | UpdateEvent

__all__ = ["CommandMessage", "Frame", "Values"]
