"""Diagnostics over the kernel's ISO-TP sockets (CAN_ISOTP, through can-isotp's socket mode)
on vcan0 while the agent ingests telemetry from the same interface. Run in the VM:
`tests/vm/run -k diag` (the runner loads can-isotp.ko)."""

from __future__ import annotations

import os
import time

import pytest

from agent.app.assemble import bus_plans, telemetry_core
from agent.app.diagservice import DiagService
from agent.app.runtime import Agent
from agent.config import load_config
from agent.core import diag as D
from agent.core.commands import Command
from conftest import ROOT
from test_vcan import _prepare_vcan

pytestmark = pytest.mark.vcan


def _need(why: str | None) -> None:
    if why:
        if os.environ.get("TCU_VCAN_REQUIRED"):  # inside the VM a skip is a failure
            pytest.fail(f"vcan diagnostics: {why}")
        pytest.skip(f"{why}; run this tier in the VM: tests/vm/run")


@pytest.fixture(scope="module", autouse=True)
def vcan():
    _need(_prepare_vcan())
    try:
        import isotp

        s = isotp.socket()
        s.bind("vcan0", isotp.Address(isotp.AddressingMode.Normal_11bits, txid=0x7F0, rxid=0x7F8))
        s.close()
    except Exception as e:  # noqa: BLE001 - no CAN_ISOTP in this kernel
        _need(f"no kernel ISO-TP socket on vcan0 ({type(e).__name__}: {e})")


def test_dtcs_over_kernel_iso_tp_while_telemetry_flows(tmp_path):
    over = ["bus.0.interface='socketcan'", "bus.0.channel='vcan0'",
            f"storage.dir={str(tmp_path)!r}", "diagnostics.dtc_interval_s=0",
            "diagnostics.ecu.bms.transport='kernel'", "diagnostics.ecu.vcu.transport='kernel'",
            "diagnostics.ecu.abs.transport='kernel'", "diagnostics.ecu.tpms.transport='kernel'"]
    config = load_config(ROOT / "configs" / "demo.toml", over)
    agent = Agent(config, publish=False)  # the simulated EV (and its ECUs) on vcan0
    agent.start()
    diag_core = telemetry_core(bus_plans(config), config.telemetry)
    service = DiagService(config, diag_core, None)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not agent.core.lookup("VCU_Status.Gear"):
            time.sleep(0.05)
        assert agent.core.lookup("VCU_Status.Gear") == ("P", pytest.approx(time.time() * 1000,
                                                                           abs=2000))
        agent.simulator.vehicle.state.fault = True
        frames_before = agent.core.counters[0].frames
        cmd = Command("v1", config.vehicle.vin, D.READ_DTCS, {}, 0, 0, b"k", "t", b"d")
        out = service.handle(cmd, int(time.time() * 1000))
        end = time.monotonic() + 15
        while time.monotonic() < end and not any(s.terminal for s in out):
            time.sleep(0.01)
            out += service.poll(int(time.time() * 1000))
        final = [s for s in out if s.terminal]
        assert final and final[0].status == "SUCCEEDED", (out, service.status())
        ecus = final[0].result["ecus"]
        assert len(ecus["bms"]["dtcs"]) == 40  # multi-frame through the kernel's flow control
        assert ecus["vcu"]["dtcs"] == [{"code": "P0D27", "status": 0x0C}]
        assert ecus["abs"]["dtcs"] == [] and ecus["tpms"] == {"error": "NO_RESPONSE"}
        c = agent.core.counters[0]
        assert c.frames > frames_before  # telemetry kept flowing meanwhile
        # kernel receive filters on the telemetry socket: diagnostic frames never reach it
        assert c.unknown_ids == 0 and not (c.unknown_id_set & {0x7E0, 0x7E8, 0x7E4, 0x7EC})
        assert agent.readers[0].state == "open"
    finally:
        service.close()
        agent.stop()
