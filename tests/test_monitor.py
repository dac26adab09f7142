"""`tcu-agent monitor` readability: the terminal's width, names elided in the middle and never
two rows alike, values as the protocol writes them, counters and checksums hidden."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

from agent.cli.monitor import elide, elide_all, protocol_value, render
from conftest import ROOT

BASE = "Vehicle.Powertrain.TractionBattery.CellVoltage.Module{}.Cell{}.Voltage"


def _signals(names, **extra):
    return {n: {"value": 3.71, "age_s": 0.2, "unit": "V", **extra} for n in names}


def test_long_names_use_the_width_and_are_never_cut_to_equal_rows():
    names = [BASE.format(m, c) for m in (1, 12) for c in (1, 2)]  # alike but for the middle
    names += ["Vehicle.Body.Lights.Beam.Low.IsOn", "Vehicle.Body.Lights.Beam.High.IsOn"]
    for width in (200, 120, 100, 80):
        table = render("h", [], _signals(names), width=width)
        rows = table.splitlines()[5:5 + len(names)]
        assert all(len(r) <= width for r in table.splitlines()), (width, table)
        shown = [r.split()[0] for r in rows]
        assert len(set(shown)) == len(names), (width, shown)  # never two rows equal
        if width >= 100:  # wide enough: the whole names, not 49 characters
            assert set(shown) == set(names), shown
        else:
            assert any("…" in s for s in shown)
            assert all(s.startswith("Vehicle.") for s in shown)


def test_elision_keeps_both_ends_and_clashes_are_resolved():
    assert elide("Vehicle.Powertrain.TractionBattery.StateOfCharge.Current", 24) == \
        "Vehicle.Pow…arge.Current"  # 24 characters: both ends kept
    a = "A" * 30 + "x" + "B" * 30
    b = "A" * 30 + "y" + "B" * 30
    out = elide_all([a, b], 20)  # the difference is where every cut falls: numbered
    assert len(set(out.values())) == 2 and all(len(v) == 20 for v in out.values())


def test_values_as_the_protocol_writes_them():
    assert [protocol_value(v) for v in (True, False, None, "CHARGING", 62.0, 3, 0.1 + 0.2)] == \
        ["true", "false", "null", "CHARGING", "62", "3", "0.3"]


def test_counters_and_checksums_hidden_unless_all():
    sig = {**_signals(["Vehicle.Speed"]),
           "VCU_Status.VCU_Counter": {"value": 3, "age_s": 0.1, "unit": "", "hidden": True}}
    assert "VCU_Counter" not in render("h", [], sig)
    assert "(1 counter/checksum signal hidden; --all shows them)" in render("h", [], sig)
    assert "VCU_Counter" in render("h", [], sig, show_all=True)


def test_monitor_direct_on_the_demo_config_prints_protocol_values():
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "monitor", "-c", "configs/demo.toml", "--direct",
         "--once", "--interval", "1.5", "--set", f"bus.0.channel='mon-{uuid.uuid4().hex}'"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "COLUMNS": "100"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1:3] == [
        "DIRECT: this monitor opened the buses itself, not the running agent's view",
        "(and started its own simulated EV on them)"]
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()[6:]
            if line.startswith(("Vehicle.", "BMS_", "VCU_", "OBC_", "BCM_"))}
    assert rows["Vehicle.Cabin.Door.IsLocked"][0] == "true"  # not Python's True
    assert rows["Vehicle.Powertrain.TractionBattery.Charging.Status"][0] == "IDLE"
    assert rows["Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"][:2] == ["62", "%"]
    assert rows["Vehicle.Speed"][:2] == ["0", "km/h"]
    assert not any("Counter" in n or "Checksum" in n for n in rows)
    assert "counter/checksum signals hidden; --all shows them" in proc.stdout
    assert all(len(line) <= 100 for line in proc.stdout.splitlines())
