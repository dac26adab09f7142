"""Simulated vehicle (and, later, modem and GNSS) for tests, demos and development."""

from __future__ import annotations

from .vehicle import SimulatedVehicle, VehicleState


def from_config(sim) -> SimulatedVehicle:
    """A SimulatedVehicle from a SimulatorConfig."""
    state = VehicleState(soc=sim.soc, plugged=sim.plugged, speed_kph=sim.speed_kph,
                         locked=sim.locked, charge_limit=sim.charge_limit, drive=sim.drive,
                         gear="D" if sim.speed_kph > 0 or sim.drive else "P",
                         battery_v=sim.battery_v)
    timeline = []
    for entry in sim.timeline:
        changes = {k: v for k, v in entry.items() if k != "at_s"}
        timeline.append((entry["at_s"], changes))
    vehicle = SimulatedVehicle(state, timeline, sim.charge_rate_pct_per_s or None)
    from .ecus import standard_ecus

    vehicle.ecus = standard_ecus(vehicle)  # silent unless asked over ISO-TP
    return vehicle
