"""Payloads of the records other than telemetry batches (PROTOCOL.md §4, §5). Pure."""

from __future__ import annotations

from .. import __version__


def status_payload(vin: str, t_ms: int, online: bool) -> dict:
    """§5: the online/offline record (the offline one is the MQTT will)."""
    return {"v": 1, "vin": vin, "t": t_ms, "online": online, "agent": __version__}


def state_payload(vin: str, t_ms: int, values: dict) -> dict:
    """§4: last-known state; values maps name -> [t_ms last observed, value]."""
    return {"v": 1, "vin": vin, "t": t_ms, "values": values}


class Topics:
    """The topic names of one vehicle (§1)."""

    def __init__(self, prefix: str):
        self.telemetry = f"{prefix}/telemetry"
        self.state = f"{prefix}/state"
        self.status = f"{prefix}/status"
        self.commands = f"{prefix}/commands"
        self.responses = f"{prefix}/responses"


class RateLimit:
    """At most one event per interval; remembers a wish made too early (trailing edge)."""

    def __init__(self, interval_ms: int):
        self.interval_ms = interval_ms
        self.last_ms = -(10**15)
        self.wanted = False

    def want(self) -> None:
        self.wanted = True

    def due(self, now_ms: int) -> bool:
        """True (and resets) when a wanted event may happen now."""
        if self.wanted and now_ms - self.last_ms >= self.interval_ms:
            self.wanted = False
            self.last_ms = now_ms
            return True
        return False
