"""The modem adapter through pyserial and a real pseudo-terminal, against the AT emulator.

No mocks: SimulatedModem answers on a pty; the configured port is a symlink in tmp_path
that unplug()/replug() removes and points at a new pty, as udev does for a USB modem.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT

from agent.adapters.modem import ModemPoller
from agent.config import ModemConfig
from agent.errors import BusError
from agent.sim.modem import PARTIAL, SimulatedModem

P = "Vehicle.Connectivity."


def wait_until(predicate, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Sink:
    """Collects on_values calls (from the service thread)."""

    def __init__(self):
        self.calls: list[tuple[float, dict]] = []
        self.lock = threading.Lock()

    def __call__(self, t, values):
        with self.lock:
            self.calls.append((t, dict(values)))

    def all(self, name) -> list:
        with self.lock:
            return [v[name] for _, v in self.calls if name in v]

    def last(self, name):
        values = self.all(name)
        return values[-1] if values else None


@pytest.fixture
def modem(tmp_path):
    made = []

    def make(profile="sim7600", **kw):
        m = SimulatedModem(profile, link=tmp_path / f"ttyUSB{len(made) + 2}", **kw).start()
        made.append(m)
        return m

    yield make
    for m in made:
        m.stop()


@pytest.fixture
def service():
    made = []

    def make(port, sink=None, timeout=0.3, poll=0.4, **kw):
        svc = ModemPoller(ModemConfig(port=str(port), command_timeout_s=timeout,
                                       poll_interval_s=poll), sink or Sink(), backoff_s=0.05, **kw)
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc.stop()


# -- synchronous queries (the CLI path) ---------------------------------------------------

@pytest.mark.parametrize("profile, model, imei", [
    ("sim7600", "SIMCOM_SIM7600E-H", "862636050123453"), ("ec25", "EC25", "867698041234563")])
def test_query_once_reads_identity_and_network(modem, service, profile, model, imei):
    m = modem(profile, rssi=21, registration=5, operator="Vodafone DE")
    svc = service(m.path)
    values = svc.query_once()
    assert values == {P + "Model": model, P + "Imei": imei, P + "Iccid": "89490200001234567890",
                      P + "SignalStrength": -71, P + "Registration": "roaming",
                      P + "IsConnectivityAvailable": True, P + "AreaCode": "1A2B",
                      P + "CellId": "01C2D3E4", P + "AccessTechnology": "LTE",
                      P + "Operator": "Vodafone DE"}
    assert m.received[:2] == ["AT", "ATE0"]  # sync, then echo off before anything is parsed
    assert {"AT+CEREG=2", "AT+CREG=2"} <= set(m.received)  # registration URCs switched on
    assert ("AT+QCCID" in m.received) == (profile == "ec25")  # CCID first, Quectel fallback
    assert svc.status()["timeouts"] == 0


def test_unknown_signal_unregistered_and_no_sim(modem, service):
    m = modem("ec25", rssi=99, registration=2, sim_present=False)
    svc = service(m.path)
    values = svc.query_once()
    assert values[P + "SignalStrength"] is None
    assert values[P + "Registration"] == "searching"
    assert values[P + "IsConnectivityAvailable"] is False
    assert values[P + "Operator"] is None
    assert P + "Iccid" not in values
    assert svc.status()["errors"] == 2  # AT+CCID (ERROR) and AT+QCCID (+CME ERROR: 10)
    result = svc.raw("AT+QCCID")
    assert (result.final, result.error, result.ok) == ("+CME ERROR", "10", False)


def test_raw_command_answer(modem, service):
    m = modem()
    svc = service(m.path)
    result = svc.raw("AT+CSQ")
    assert result.ok and result.lines == ("+CSQ: 21,99",)
    assert svc.raw("AT+NOSUCH").final == "ERROR"


def test_bad_port_is_a_bus_error(service, tmp_path):
    with pytest.raises(BusError, match="cannot open .*ttyNONE.*No such file"):
        service(tmp_path / "ttyNONE").query_once()


def test_silent_modem_is_a_bus_error_in_bounded_time(modem, service):
    m = modem()
    m.mute = True
    svc = service(m.path, timeout=0.3)
    start = time.monotonic()
    with pytest.raises(BusError, match="no answer"):
        svc.query_once()
    assert time.monotonic() - start < 2.0


# -- the polling thread -------------------------------------------------------------------

def test_polls_and_staggers_commands(modem, service):
    m = modem()
    sink = Sink()
    svc = service(m.path, sink, poll=1.0)
    svc.start()
    assert svc.wait_open(3)
    wait_until(lambda: m.received.count("AT+CSQ") >= 3, timeout=5, what="three polls")
    assert sink.last(P + "SignalStrength") == -71 and sink.last(P + "Operator") == "Vodafone DE"
    assert m.received.count("AT+CGMM") == 1  # identity read once
    # after the first (back-to-back) cycle, the four commands are spread over the interval
    times = [t for t, c in zip(m.received_at, m.received) if c == "AT+CSQ"]
    cycle = [t for t, c in zip(m.received_at, m.received)
             if times[1] <= t < times[2] and c.startswith("AT+C")]
    assert len(cycle) == 4
    gaps = [b - a for a, b in itertools.pairwise(cycle)]
    # 1.0 s / 4 commands = 0.25 s apart, never a burst (a burst is ~1 ms apart)
    assert min(gaps) > 0.05 and cycle[-1] - cycle[0] > 0.5, gaps
    m.rssi = 10
    wait_until(lambda: sink.last(P + "SignalStrength") == -93, what="new signal")
    assert svc.status()["state"] == "open"


def test_urcs_are_set_aside_and_registration_urc_applied(modem, service):
    m = modem()
    sink = Sink()
    svc = service(m.path, sink, poll=30.0)  # no poll will come: only the URC can tell
    svc.start()
    wait_until(lambda: sink.last(P + "Operator") == "Vodafone DE", what="first cycle")
    m.ring()
    m.set_registration(5)
    wait_until(lambda: sink.last(P + "Registration") == "roaming", what="URC applied")
    wait_until(lambda: svc.status()["urcs"] == 3, what="URCs counted")  # RING, +CEREG, +CREG
    assert svc.status()["garbage_lines"] == 0 and svc.status()["parse_errors"] == 0


def test_garbage_is_counted_and_values_stay_right(modem, service):
    m = modem()
    m.garbage_every = 2
    sink = Sink()
    svc = service(m.path, sink, poll=0.3)
    svc.start()
    wait_until(lambda: svc.status()["garbage_lines"] >= 4, what="garbage counted")
    assert set(sink.all(P + "SignalStrength")) == {-71}
    assert set(sink.all(P + "Registration")) == {"home"}
    assert svc.status()["parse_errors"] == 0


def test_late_answers_are_never_misattributed(modem, service):
    m = modem()
    sink = Sink()
    svc = service(m.path, sink, timeout=0.4, poll=0.4)
    svc.start()
    wait_until(lambda: sink.last(P + "Operator") == "Vodafone DE", what="first cycle")
    m.delay_s = 0.6  # answers arrive after the timeout (0.4 s) but within the grace (0.8 s)
    wait_until(lambda: svc.status()["late_answers"] >= 3, timeout=8, what="late answers")
    m.delay_s = 0.0
    wait_until(lambda: svc.status()["commands"] > 20, timeout=8)
    s = svc.status()
    assert s["timeouts"] >= 3 and s["parse_errors"] == 0 and s["state"] == "open"
    assert set(sink.all(P + "SignalStrength")) == {-71}  # never a +CEREG taken for a +CSQ
    assert set(sink.all(P + "Operator")) == {"Vodafone DE"}


def test_modem_that_stops_answering_is_reopened_and_recovers(modem, service):
    m = modem()
    sink = Sink()
    svc = service(m.path, sink, timeout=0.2, poll=0.3)
    svc.start()
    wait_until(lambda: sink.last(P + "Operator") == "Vodafone DE")
    m.mute = True
    wait_until(lambda: svc.status()["state"] == "unresponsive", what="unresponsive")
    assert svc.status()["timeouts"] >= 3
    m.mute = False
    m.rssi = 5
    wait_until(lambda: sink.last(P + "SignalStrength") == -103, timeout=8, what="recovered")
    assert svc.status()["state"] == "open" and svc.status()["reopens"] >= 1


def test_unplug_and_replug_reopens_with_backoff(modem, service):
    m = modem()
    sink = Sink()
    svc = service(m.path, sink, poll=0.3)
    svc.start()
    wait_until(lambda: sink.last(P + "Operator") == "Vodafone DE")
    m.unplug()
    wait_until(lambda: svc.status()["state"] == "down", what="down")
    wait_until(lambda: svc.status()["port_errors"] >= 2, what="failed reopens")
    assert "No such file" in svc.status()["last_error"]
    m.rssi = 25
    before = len(m.received)
    m.replug()
    wait_until(lambda: sink.last(P + "SignalStrength") == -63, what="values after replug")
    s = svc.status()
    assert s["state"] == "open" and s["reopens"] == 1 and s["opens"] == 2
    # the replugged modem booted with echo on and URCs off: set up again
    assert m.received[before:before + 2] == ["AT", "ATE0"]
    assert "AT+CEREG=2" in m.received[before:]


def test_registration_change_arrives_as_urc_with_area_and_cell(modem, service):
    m = modem()  # ships with URCs off (n=0): only the agent's AT+CEREG=2 turns them on
    sink = Sink()
    svc = service(m.path, sink, poll=30.0)  # no poll will come: only a URC can tell
    svc.start()
    wait_until(lambda: sink.last(P + "Operator") == "Vodafone DE", what="first cycle")
    assert (sink.last(P + "AreaCode"), sink.last(P + "CellId")) == ("1A2B", "01C2D3E4")
    polls = m.received.count("AT+CEREG?")
    m.set_registration(5, tac="2B3C", cell="0ABCDEF1")  # handover into a roaming cell
    wait_until(lambda: sink.last(P + "CellId") == "0ABCDEF1", timeout=2, what="URC")
    assert sink.last(P + "AreaCode") == "2B3C" and sink.last(P + "Registration") == "roaming"
    assert m.received.count("AT+CEREG?") == polls  # it came unasked


def test_slow_modem_across_consecutive_raw_calls(modem, service):
    m = modem()
    m.delay_s = 0.7  # every answer comes after the 0.5 s timeout
    svc = service(m.path, timeout=0.5)
    for _ in range(2):  # the second call must not take the first one's late answer
        with pytest.raises(BusError, match="no answer"):
            svc.raw("AT+CSQ")
    assert svc.status()["late_answers"] >= 1  # a bare OK where +CSQ: was due is not an answer
    m.delay_s = 0.0
    time.sleep(1.0)  # the late answers still queued land in the port's input buffer
    result = svc.raw("AT+CSQ")
    assert result.ok and result.lines == ("+CSQ: 21,99",)


def test_stale_answers_are_dropped_across_a_reopen(modem, service):
    m = modem("ec25")
    m.delay_s = 0.7
    svc = service(m.path, timeout=0.5)
    with pytest.raises(BusError, match="no answer"):
        svc.query_once()
    m.delay_s = 0.3  # in time now, but the late answer to the first call is still due
    values = svc.query_once()
    assert values[P + "Model"] == "EC25" and values[P + "Imei"] == "867698041234563"
    assert values[P + "Iccid"] == "89490200001234567890"
    assert values[P + "SignalStrength"] == -71 and values[P + "Operator"] == "Vodafone DE"
    assert svc.status()["parse_errors"] == 0


def test_answers_still_arriving_after_an_open_are_drained(modem, service):
    m = modem()
    m.delay_s = 0.1
    svc = service(m.path, timeout=0.5)
    before = len(m.received)

    def late_answers():  # a previous session's polls, answered one by one after the reopen
        wait_until(lambda: len(m.received) > before, what="first command")
        for _ in range(6):
            m.write(b"\r\n+CSQ: 5,99\r\n\r\nOK\r\n")
            time.sleep(0.03)

    writer = threading.Thread(target=late_answers)
    writer.start()
    result = svc.raw("AT+CSQ")
    writer.join()
    assert result.lines == ("+CSQ: 21,99",)  # not the late -103 dBm of before
    assert m.received[before:before + 2] == ["AT", "ATE0"]


@pytest.mark.parametrize("profile", ["sim7600", "ec25"])
def test_cut_off_line_before_an_answer_is_not_taken_for_identity(modem, service, profile):
    m = modem(profile)
    m.garbage_every, m.noise = 1, [PARTIAL]  # "0,99" before every answer
    values = service(m.path).query_once()
    assert values[P + "Model"] == m.model and values[P + "Imei"] == m.imei
    assert values[P + "Iccid"] == "89490200001234567890"
    assert values[P + "SignalStrength"] == -71


def test_status_shows_the_latest_values(modem, service):
    m = modem()
    svc = service(m.path, poll=0.3)
    assert svc.status()["values"] == {}
    svc.start()
    wait_until(lambda: P + "Operator" in svc.status()["values"], what="values in status")
    m.rssi = 10
    wait_until(lambda: svc.status()["values"][P + "SignalStrength"] == -93, what="new signal")
    values = svc.status()["values"]
    assert values[P + "Model"] == "SIMCOM_SIM7600E-H" and values[P + "Imei"] == m.imei
    assert values[P + "Registration"] == "home" and values[P + "Operator"] == "Vodafone DE"
    json.dumps(svc.status())  # plain values, for the status file and --json


def test_port_in_use_by_the_agent_is_a_clear_error(modem, service):
    m = modem()
    running = service(m.path)
    running.start()
    assert running.wait_open(3)
    with pytest.raises(BusError, match="in use by another process"):
        service(m.path).query_once()
    assert running.status()["state"] == "open"


def test_stop_is_prompt_while_a_command_hangs(modem, service):
    m = modem()
    m.mute = True
    svc = service(m.path, timeout=10.0)
    svc.start()
    wait_until(lambda: svc.status()["commands"] >= 1)
    start = time.monotonic()
    svc.stop()
    assert time.monotonic() - start < 1.0
    assert svc.status()["state"] == "closed"


def test_on_values_failure_does_not_stop_polling(modem, service):
    m = modem()
    calls = []

    def broken(t, values):
        calls.append(values)
        raise RuntimeError("sink bug")

    svc = service(m.path, broken, poll=0.3)
    svc.start()
    wait_until(lambda: len(calls) >= 10, what="polling continues")
    assert svc.status()["state"] == "open"


# -- the CLI, as a process --------------------------------------------------------------

def modem_cli(*args, timeout=30):
    from agent.cli.main import COMMANDS
    # Through `tcu-agent modem` once registered; until then through the module's own entry.
    entry = ["-m", "agent", "modem"] if "modem" in COMMANDS else ["-m", "agent.cli.modem"]
    return subprocess.run([sys.executable, *entry, *map(str, args)], cwd=ROOT, check=False,
                          capture_output=True, text=True, timeout=timeout)


def write_config(tmp_path, test_dbc, port=None):
    modem_section = f'[modem]\nport = "{port}"\ncommand_timeout_s = 0.5\n' if port else ""
    path = tmp_path / "agent.toml"
    path.write_text(f'[vehicle]\nvin = "V1"\n[storage]\ndir = "{tmp_path}"\n'
                    f'[[bus]]\nname = "pt"\ninterface = "virtual"\nchannel = "x"\n'
                    f'dbc = ["{test_dbc}"]\n{modem_section}')
    return path


def test_cli_prints_identity_signal_registration_operator(modem, tmp_path, test_dbc):
    m = modem("ec25", rssi=18, registration=5, operator="Telekom.de")
    proc = modem_cli("-c", write_config(tmp_path, test_dbc, m.path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for text in ("EC25", "867698041234563", "89490200001234567890", "-77 dBm", "roaming (LTE)",
                 "Telekom.de"):
        assert text in out, out
    proc = modem_cli("-c", write_config(tmp_path, test_dbc, m.path), "--json")
    data = json.loads(proc.stdout)
    assert data["signal_dbm"] == -77 and data["registration"] == "roaming"
    assert data["values"][P + "Imei"] == "867698041234563"


def test_cli_raw_at(modem, tmp_path, test_dbc):
    m = modem("sim7600")
    cfg = write_config(tmp_path, test_dbc, m.path)
    proc = modem_cli("-c", cfg, "--at", "AT+CPIN?")
    assert proc.returncode == 0 and proc.stdout.splitlines() == ["+CPIN: READY", "OK"]
    proc = modem_cli("-c", cfg, "--at", "AT+QCCID", "--json")  # SIMCom does not know it
    assert proc.returncode == 1 and json.loads(proc.stdout)["result"] == "ERROR"


@pytest.mark.parametrize("setup, fragment", [
    ("missing", "cannot open"), ("no-section", "no [modem] section"), ("mute", "no answer")])
def test_cli_errors_are_one_line_exit_2(modem, tmp_path, test_dbc, setup, fragment):
    if setup == "missing":
        cfg = write_config(tmp_path, test_dbc, tmp_path / "ttyGONE")
    elif setup == "no-section":
        cfg = write_config(tmp_path, test_dbc)
    else:
        m = modem()
        m.mute = True
        cfg = write_config(tmp_path, test_dbc, m.path)
    proc = modem_cli("-c", cfg)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert fragment in lines[0] and lines[0].startswith("tcu-agent: error:")


# -- in the agent (runtime wiring) --------------------------------------------------------

def test_agent_takes_modem_and_gnss_values(modem, tmp_path, test_dbc):
    from agent.config import config_from_dict
    from agent.app.runtime import Agent
    from agent.sim.gnss import SimulatedGnss

    m = modem("ec25", rssi=99)
    gnss = SimulatedGnss([(48.1, 11.5), (48.1, 11.6)], rate_hz=5, link=tmp_path / "ttyGNSS")
    gnss.start()
    cfg = config_from_dict({
        "vehicle": {"vin": "V1"}, "storage": {"dir": str(tmp_path)},
        "bus": [{"name": "pt", "interface": "virtual", "channel": "modem-test",
                 "dbc": [str(test_dbc)]}],
        "modem": {"port": m.path, "poll_interval_s": 1.0, "command_timeout_s": 0.5},
        "gnss": {"port": gnss.path}}, base=tmp_path)
    agent = Agent(cfg)
    agent.start()
    try:
        wait_until(lambda: P + "Operator" in agent.snapshot()
                   and "Vehicle.CurrentLocation.Speed" in agent.snapshot(), what="values")
        snap = agent.snapshot()
        assert snap[P + "Imei"][1] == "867698041234563"
        assert snap[P + "SignalStrength"][1] is None  # rssi 99: unknown, sent as such
        assert snap["Vehicle.CurrentLocation.Latitude"][1] == pytest.approx(48.1)
        status = agent.status()
        assert status["modem"]["state"] == "open" and status["gnss"]["sentences"] > 0
    finally:
        agent.stop()
        gnss.stop()


def test_adapter_reports_every_signal_reading(modem, service):
    """The hysteresis is the core's (below): the adapter passes one-step flicker on."""
    m = modem(rssi=20)  # -73 dBm
    sink = Sink()
    svc = service(m.path, sink, poll=0.4)
    svc.start()
    wait_until(lambda: sink.last(P + "SignalStrength") == -73, what="first signal")
    m.rssi = 21  # -71 dBm: one 2 dB step
    wait_until(lambda: sink.last(P + "SignalStrength") == -71, what="the flicker")
    assert svc.status()["values"][P + "SignalStrength"] == -71


def signal_samples(core) -> list:
    core.flush()
    return [v for b in core.take_batches() for _, v in b.sig.get(P + "SignalStrength", [])]


@pytest.mark.parametrize("hysteresis, readings, sent", [
    (3.0, [-73, -71, -73, -71, -67, -69, None, -69], [-73, -67, None, -69]),
    (4.0, [-73, -71, -69, -71], [-73, -69]),  # 4 dB or more: sent
    (0.0, [-73, -71, -73], [-73, -71, -73]),  # 0: every change
])
def test_signal_hysteresis_is_the_cores_deadband(test_dbc, hysteresis, readings, sent):
    from agent.adapters.modem import deadbands
    from agent.app.assemble import plans_for_dbc
    from agent.core.telemetry import TelemetryCore

    cfg = ModemConfig(port="/dev/null", signal_hysteresis_db=hysteresis)
    core = TelemetryCore(plans_for_dbc([test_dbc]), value_deadbands=deadbands(cfg))
    for i, dbm in enumerate(readings):
        core.feed_values(1_700_000_000.0 + i, {P + "SignalStrength": dbm})
    assert signal_samples(core) == sent
    assert core.lookup(P + "SignalStrength")[0] == readings[-1]  # the last reading is known


def test_signal_strength_has_hysteresis(modem, tmp_path, test_dbc):
    """Through the agent: one-step RSSI flicker makes no samples, a real change does."""
    from agent.app.runtime import Agent
    from agent.config import config_from_dict

    m = modem(rssi=20)  # -73 dBm
    cfg = config_from_dict({
        "vehicle": {"vin": "V1"}, "storage": {"dir": str(tmp_path)},
        "bus": [{"name": "pt", "interface": "virtual", "channel": "hysteresis-test",
                 "dbc": [str(test_dbc)]}],
        "telemetry": {"max_batch_age_ms": 200},
        "modem": {"port": m.path, "poll_interval_s": 1.0, "command_timeout_s": 0.5}},
        base=tmp_path)  # signal_hysteresis_db: 3 dB by default
    batches = []
    agent = Agent(cfg, on_batch=batches.append)

    def sent():
        return [v for b in list(batches) for _, v in b.sig.get(P + "SignalStrength", [])]

    agent.start()
    try:
        wait_until(lambda: sent() == [-73], what="first signal")
        polls = m.received.count("AT+CSQ")
        m.rssi = 21  # -71 dBm: one 2 dB step, within the 3 dB hysteresis
        wait_until(lambda: m.received.count("AT+CSQ") >= polls + 3, timeout=8, what="three polls")
        wait_until(lambda: agent.snapshot()[P + "SignalStrength"][1] == -71,
                   what="the core took the reading")
        m.rssi = 23  # -67 dBm: 6 dB away from the last value sent
        wait_until(lambda: -67 in sent(), what="the bigger change")
        assert sent() == [-73, -67]  # the flicker, read before the change, was never sampled
        m.rssi = 99  # unknown: always sent
        wait_until(lambda: sent() == [-73, -67, None], what="unknown signal")
    finally:
        agent.stop()


# -- link recovery (core/recovery.py decides, the poller acts) ------------------------------

def recovery_rig(modem, service, **cfg):
    from agent.app.power import LinkRecovery

    m = modem()
    sink = Sink()
    svc = service(m.path, sink, timeout=0.3, poll=5.0)
    svc.start()
    wait_until(lambda: svc.registered() is True, what="registered")
    config = ModemConfig(port=str(m.path), recovery_after_s=0.2, recovery_backoff_s=0.3, **cfg)
    # "the broker is reachable" stands in as: the emulated network has the modem registered
    rec = LinkRecovery(config, svc, lambda: m.registered)
    return m, svc, sink, rec


def drive(rec, m, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec.poll(int(time.time() * 1000))
        if m.registered and rec.taken and not rec.modem.recovering:
            rec.poll(int(time.time() * 1000))  # the policy sees the link back
            return rec.taken
        time.sleep(0.05)
    raise AssertionError(f"not recovered: steps {rec.taken}, modem {rec.modem.status()}")


def test_recovery_registration_back_after_a_radio_toggle(modem, service):
    m, svc, sink, rec = recovery_rig(modem, service)
    m.lose_registration(until="cfun")
    assert drive(rec, m) == ["reread", "radio"]
    assert "AT+CFUN=0" in m.received and "AT+CFUN=1" in m.received
    assert "AT+CFUN=1,1" not in m.received
    wait_until(lambda: sink.last(P + "Registration") == "home", what="home again")
    s = rec.status()
    assert s["steps"]["reread"] == 1 and s["steps"]["radio"] == 1 and s["recoveries"] == 1
    assert s["state"] == "idle" and svc.status()["recovery"]["steps"]["radio"] == 1


def test_recovery_needs_a_reset(modem, service):
    m, svc, sink, rec = recovery_rig(modem, service)
    m.lose_registration(until="reset")
    assert drive(rec, m) == ["reread", "radio", "reset"]
    assert m.resets == 1
    wait_until(lambda: svc.status()["state"] == "open" and svc.registered() is True,
               what="the poller back after the reset")
    assert svc.status()["reopens"] >= 1


def test_recovery_with_an_answer_cut_off_mid_line(modem, service):
    m, svc, sink, rec = recovery_rig(modem, service)
    m.lose_registration(until="cfun")
    m.cut_answers = 1  # the re-read's answer is cut: not taken for anything
    assert drive(rec, m) == ["reread", "radio"]
    assert sink.all(P + "Registration")[-1] == "home"
    s = svc.status()
    assert m.cut_answers == 0 and s["timeouts"] + s["garbage_lines"] >= 1  # it was cut
    assert s["state"] == "open" and s["parse_errors"] == 0


def test_recovery_only_observes_under_modemmanager(modem, service):
    m, svc, sink, rec = recovery_rig(modem, service, modemmanager=True)
    m.lose_registration(until="cfun")
    for _ in range(20):
        assert rec.poll(int(time.time() * 1000)) is None
        time.sleep(0.05)
    assert "AT+CFUN=0" not in m.received
    assert "ModemManager" in rec.status()["state"]


def test_power_cycle_command_is_the_last_step(modem, service, tmp_path):
    marker = tmp_path / "cycled"
    m, svc, sink, rec = recovery_rig(
        modem, service, power_cycle_command=[sys.executable, "-c",
                                             f"open({str(marker)!r}, 'w').write('x')"])
    rec.policy.steps = ("power_cycle",)  # straight to it: the GPIO toggle
    m.mute = True  # a modem that answers nothing at all, off the network
    m.eps_stat = m.cs_stat = 2
    svc.set_poll_interval(0.4)
    wait_until(lambda: svc.registered() is None, timeout=10, what="unresponsive")
    wait_until(lambda: rec.poll(int(time.time() * 1000)) == "power_cycle", what="power cycle")
    wait_until(lambda: rec.power_cycle.get("last") == "ok", what="the command ran")
    assert marker.exists() and rec.status()["steps"]["power_cycle"] == 1


@pytest.mark.parametrize("profile", ["sim7600", "ec25"])
def test_supply_voltage_when_configured(modem, service, profile):
    m = modem(profile)
    m.supply_v = 3.412
    sink = Sink()
    svc = ModemPoller(ModemConfig(port=str(m.path), command_timeout_s=0.3, poll_interval_s=0.4,
                                  read_voltage=True), sink, backoff_s=0.05)
    svc.start()
    try:
        wait_until(lambda: sink.last(P + "SupplyVoltage") == 3.412, what="the voltage")
        m.supply_v = 3.1
        wait_until(lambda: sink.last(P + "SupplyVoltage") == 3.1, what="a new reading")
    finally:
        svc.stop()
    plain = service(m.path)
    plain.start()
    wait_until(lambda: plain.values.get(P + "Operator"), what="a poll cycle")
    assert P + "SupplyVoltage" not in plain.values  # off by default: no AT+CBC
