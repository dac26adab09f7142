"""Shared fixtures. Real data lives in ../shared/data beside the checkout (never copied here)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("TCU_SHARED_DATA", ROOT.parent / "shared" / "data"))
sys.path.insert(0, str(ROOT))  # tests/support and the agent package without installing


def shared(name: str) -> Path:
    """Path of a file in ../shared/data; skips the test (saying why) where it is absent."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"needs {path} (the project's shared data beside the checkout; "
                    "set TCU_SHARED_DATA to its folder)")
    return path


@pytest.fixture
def kona_dbc() -> Path:
    return shared("kona_ev.dbc")


@pytest.fixture
def kona_log() -> Path:
    return shared("kona_power_on_ready_off.log")


@pytest.fixture
def tesla_dbc() -> Path:
    return shared("tesla_model3.dbc")


TEST_DBC = '''VERSION ""

NS_ :

BS_:

BU_: BMS VCU OBC TCU

BO_ 256 BMS_Status: 8 BMS
 SG_ SOC : 0|16@1+ (0.01,0) [0|100] "%" TCU
 SG_ PackVoltage : 16|16@1+ (0.1,0) [0|1000] "V" TCU
 SG_ PackCurrent : 32|16@1- (0.1,0) [-3276.8|3276.7] "A" TCU
 SG_ Counter : 48|4@1+ (1,0) [0|15] "" TCU
 SG_ Temp : 63|8@0- (1,0) [-128|127] "degC" TCU

BO_ 512 VCU_Drive: 8 VCU
 SG_ Speed : 7|16@0+ (0.01,0) [0|300] "km/h" TCU
 SG_ Gear : 16|3@1+ (1,0) [0|7] "" TCU
 SG_ Ready : 19|1@1+ (1,0) [0|1] "" TCU

BO_ 768 OBC_Mux: 8 OBC
 SG_ Page M : 0|8@1+ (1,0) [0|255] "" TCU
 SG_ AcVoltage m0 : 8|16@1+ (1,0) [0|500] "V" TCU
 SG_ AcCurrent m1 : 8|16@1+ (0.1,0) [0|100] "A" TCU

BO_ 2566844926 EXT_Info: 8 VCU
 SG_ Odometer : 0|32@1+ (0.1,0) [0|1000000] "km" TCU

BO_ 2147483904 EXT_Clash: 8 VCU
 SG_ Value : 0|8@1+ (1,0) [0|255] "" TCU

BA_DEF_ BO_ "GenMsgCycleTime" INT 0 10000;
BA_DEF_DEF_ "GenMsgCycleTime" 0;
BA_ "GenMsgCycleTime" BO_ 256 100;
BA_ "GenMsgCycleTime" BO_ 512 20;

VAL_ 512 Gear 0 "P" 1 "R" 2 "N" 3 "D" ;
'''


@pytest.fixture
def test_dbc(tmp_path) -> Path:
    """A small DBC covering little/big endian, signed, scaled, value tables, multiplexing,
    an extended id and cycle times."""
    path = tmp_path / "test.dbc"
    path.write_text(TEST_DBC)
    return path


# Hypothesis on a loaded 2-core CI machine: data generation can be slow and examples can
# take long; neither is what these tests check.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("tcu", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("tcu")


# -- tiers ------------------------------------------------------------------------------------
# The core tier (`pytest -m "not e2e"`) is the sans-I/O core and the stores it is wired to, fed
# in-process: run it on every save. Everything else is e2e: brokers, agent and CLI processes,
# pseudo-terminals, the VM, a wheel build. A new test file is e2e unless it is listed here or
# named *_core.py.
CORE_FILES = {"test_core.py", "test_command_gate.py", "test_cose.py", "test_cose_es256.py",
              "test_at.py", "test_nmea.py", "test_layering.py", "test_config.py",
              "test_executor.py", "test_real_logs.py", "test_replaystore.py", "test_truststore.py",
              "test_hardening.py", "test_clock.py", "test_devicethread.py", "test_slots.py",
              "test_update_service.py", "test_expr.py", "test_campaigns.py", "test_grants.py",
              "test_batchstore.py", "test_rawcan.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.path.name
        if item.get_closest_marker("mqtt") or item.get_closest_marker("vcan") or not (
                name in CORE_FILES or name.endswith("_core.py")):
            item.add_marker(pytest.mark.e2e)
