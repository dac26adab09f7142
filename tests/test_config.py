"""Configuration: every way a config can be wrong gives one line naming file, key and problem."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from agent.app.assemble import bus_plans
from agent.config import apply_override, load_config
from agent.errors import ConfigError, DbcError

GOOD = """
[vehicle]
vin = "VIN0001"

[[bus]]
name = "powertrain"
interface = "virtual"
channel = "pt"
dbc = ["{dbc}"]
bitrate = 500000

[[bus]]
name = "body"
interface = "virtual"
channel = "body"
dbc = ["{dbc}"]
options = {{ receive_own_messages = true }}

[storage]
dir = "state"

[telemetry]
messages = ["VCU_Drive"]

[[telemetry.signal]]
select = "BMS_Status.SOC"
name = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"
state = true
"""


def write(tmp_path: Path, text: str, dbc: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text.format(dbc=dbc))
    return path


def test_good_config_loads_into_frozen_objects(tmp_path, test_dbc):
    cfg = load_config(write(tmp_path, GOOD, test_dbc))
    assert cfg.vehicle.vin == "VIN0001" and cfg.vehicle.prefix == "vehicles/VIN0001"
    assert [b.name for b in cfg.bus] == ["powertrain", "body"]
    assert cfg.bus[0].bitrate == 500000 and cfg.bus[1].bitrate is None
    assert cfg.bus[1].options["receive_own_messages"] is True
    assert cfg.storage.dir == tmp_path / "state"  # relative to the config file
    assert cfg.telemetry.max_batch_age_ms == 1000
    with pytest.raises(AttributeError):
        cfg.vehicle.vin = "other"  # frozen
    plans = bus_plans(cfg)
    assert {s.out for mp in plans[0].selected.values() for s in mp.signals} >= {
        "VCU_Drive.Speed", "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"}


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('bitrate = 500000', 'bitrate = "fast"'),
     "bus.0.bitrate: expected an integer, got a string"),
    (lambda t: t.replace('vin = "VIN0001"', 'vin = "VIN0001"\ncolour = "red"'),
     "vehicle.colour: unknown key"),
    (lambda t: t.replace('[storage]\ndir = "state"', '[storage]'),
     "storage.dir: missing required key"),
    (lambda t: t.replace('messages = ["VCU_Drive"]', 'messages = "VCU_Drive"'),
     "telemetry.messages: expected an array"),
    (lambda t: t.replace('vin = "VIN0001"', 'vin = ""'), "vehicle.vin: must be"),
    (lambda t: t.replace('name = "body"', 'name = "powertrain"'), "duplicate bus name"),
    (lambda t: t.replace('{dbc}"]\nbitrate', 'missing.dbc"]\nbitrate'),
     "bus.0.dbc.0: no such file"),
])
def test_invalid_configs(tmp_path, test_dbc, edit, message):
    path = write(tmp_path, edit(GOOD), test_dbc)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    text = str(e.value)
    assert message in text and str(path) in text and "\n" not in text


def test_selection_errors_name_the_key(tmp_path, test_dbc):
    bad = GOOD.replace('select = "BMS_Status.SOC"', 'select = "BMS_Status.NoSuch"')
    with pytest.raises(ConfigError, match=r"agent.toml: telemetry.signal.0.select: no signal"):
        bus_plans(load_config(write(tmp_path, bad, test_dbc)))
    bad = GOOD.replace('messages = ["VCU_Drive"]', 'messages = ["Nope"]')
    with pytest.raises(ConfigError, match=r"telemetry.messages.0: no message 'Nope'"):
        bus_plans(load_config(write(tmp_path, bad, test_dbc)))


def test_ambiguous_and_duplicate_names(tmp_path, test_dbc):
    cfg = load_config(write(tmp_path, GOOD, test_dbc),
                      ["telemetry.messages=['*', 'body:VCU_Drive']"])
    with pytest.raises(ConfigError, match="used twice"):  # the same names from two buses
        bus_plans(cfg)
    cfg = load_config(write(tmp_path, GOOD, test_dbc), ["telemetry.messages=['body:*']"])
    plans = bus_plans(cfg)
    assert len(plans[1].selected) == 5 and len(plans[0].selected) == 1  # SOC stays on bus 0
    with pytest.raises(ConfigError, match="bus.1.dbc: needs at least one"):
        load_config(write(tmp_path, GOOD, test_dbc), ["bus.body.dbc=[]"])
    dbc2 = tmp_path / "dup.dbc"
    dbc2.write_text(test_dbc.read_text().replace("BO_ 512 VCU_Drive", "BO_ 513 VCU_Other")
                    .replace("VAL_ 512", "VAL_ 513"))
    two = GOOD.replace('dbc = ["{dbc}"]\nbitrate', 'dbc = ["{dbc}", "%s"]\nbitrate' % dbc2)
    two = two.replace('select = "BMS_Status.SOC"', 'select = "Speed"')
    two = two.replace('messages = ["VCU_Drive"]', 'messages = []')
    with pytest.raises(ConfigError, match="ambiguous"):
        bus_plans(load_config(write(tmp_path, two, test_dbc)))


def test_broken_dbc_reports_line(tmp_path, test_dbc):
    broken = tmp_path / "broken.dbc"
    broken.write_text(test_dbc.read_text().replace(' SG_ Ready : 19|1@1+', ' SG_ Ready 19|1@1+'))
    with pytest.raises(DbcError, match=r"broken.dbc: line \d+, column \d+: invalid syntax"):
        bus_plans(load_config(write(tmp_path, GOOD, broken)))


def test_overrides(tmp_path, test_dbc):
    path = write(tmp_path, GOOD, test_dbc)
    cfg = load_config(path, ["bus.0.channel=vcan1", "bus.body.bitrate=250000",
                             "vehicle.vin=OTHER", "telemetry.max_batch_age_ms=250",
                             "telemetry.defaults.deadband=0.5", "bus.0.fd=true"])
    assert cfg.bus[0].channel == "vcan1" and cfg.bus[0].fd is True
    assert cfg.bus[1].bitrate == 250000
    assert cfg.vehicle.vin == "OTHER"  # not valid TOML: taken as a string
    assert cfg.telemetry.max_batch_age_ms == 250
    assert cfg.telemetry.defaults.deadband == 0.5
    with pytest.raises(ConfigError, match="no entry named 'chassis'"):
        load_config(path, ["bus.chassis.channel=x"])
    with pytest.raises(ConfigError, match="no entry 5"):
        load_config(path, ["bus.5.channel=x"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["bus.0.channel"])
    with pytest.raises(ConfigError, match="bus.0.bitrate: expected an integer"):
        load_config(path, ["bus.0.bitrate='x'"])
    with pytest.raises(ConfigError, match="vehicle.nope: unknown key"):
        load_config(path, ["vehicle.nope=1"])
    raw = {"a": [{"name": "x", "v": 1}]}
    apply_override(raw, "a.x.v=[1, 2]")
    assert raw["a"][0]["v"] == [1, 2]


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[vehicle\nvin = 1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    unreadable = tmp_path / "secret.toml"
    unreadable.write_text("")
    unreadable.chmod(0)
    if stat.S_IMODE(unreadable.stat().st_mode) == 0 and not _is_root():
        with pytest.raises(ConfigError, match="cannot read"):
            load_config(unreadable)


def _is_root() -> bool:
    import os
    return os.geteuid() == 0


def test_shipped_configs_are_valid(tmp_path):
    """configs/*.toml load and resolve (the example with its device paths replaced)."""
    from agent.app.assemble import action_plans
    from conftest import ROOT

    demo = load_config(ROOT / "configs" / "demo.toml")
    assert set(action_plans(demo, bus_plans(demo))) == {
        "charge.start", "charge.stop", "charge.set_limit", "doors.lock", "doors.unlock"}
    for name in ("ca.pem", "c.crt", "c.key", "root.json"):
        (tmp_path / name).write_text("x")
    dbc = ROOT / "dbc" / "demo_ev.dbc"
    example = load_config(ROOT / "configs" / "vehicle.example.toml", [
        f"bus.powertrain.dbc=['{dbc}']", f"bus.body.dbc=['{dbc}']",
        f"mqtt.tls.ca='{tmp_path / 'ca.pem'}'", f"mqtt.tls.cert='{tmp_path / 'c.crt'}'",
        f"mqtt.tls.key='{tmp_path / 'c.key'}'", f"updates.trusted_root='{tmp_path / 'root.json'}'"])
    assert example.mqtt.port == 8883 and example.mqtt.tls.cert is not None
    assert example.updates.hardware_id == "tcu-gen2"
    assert "charge.start" in action_plans(example, bus_plans(example))


def test_kona_config_is_valid():
    from conftest import ROOT, shared

    shared("kona_ev.dbc")
    kona = load_config(ROOT / "configs" / "kona.toml")
    assert len(bus_plans(kona)[0].selected) > 50


def test_errors_inside_optional_sections_name_the_key(tmp_path, test_dbc):
    path = write(tmp_path, GOOD + '\n[mqtt]\nport = "x"\n', test_dbc)
    with pytest.raises(ConfigError, match=r"mqtt.port: expected an integer, got a string"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"mqtt.tls.ca: no such file"):
        load_config(path, ["mqtt.port=8883", "mqtt.tls.ca='nope.pem'"])


@pytest.mark.parametrize("sets, message", [
    (["updates.trusted_root='nope.json'"], r"updates.trusted_root: no such file"),
    (["updates.allowed_repositories=[]"], r"updates.allowed_repositories: at least one"),
    (["updates.allowed_repositories=['ftp://x/']"], r"updates.allowed_repositories.0: .* http"),
    (["updates.allowed_repositories=['https://host']"], r"must be an http\(s\) URL prefix"),
    (["updates.installed_version='1.2-rc1'"], r"updates.installed_version: version"),
    (["updates.hardware_id=''"], r"updates.hardware_id: must not be empty"),
    (["updates.colour='red'"], r"updates.colour: unknown key"),
    (["updates.preconditions=[]"], r"updates.preconditions: at least one condition"),
])
def test_updates_section_errors(tmp_path, test_dbc, sets, message):
    (tmp_path / "root.json").write_text("{}")
    (tmp_path / "trust.toml").write_text("")
    path = write(tmp_path, GOOD + """
[commands]
trust_store = "trust.toml"
[updates]
trusted_root = "root.json"
allowed_repositories = ["https://updates.example.com/fleet/"]
hardware_id = "tcu-1"
installed_version = "1.0.0"
preconditions = ['VCU_Drive.Gear == 0']
""", test_dbc)
    assert load_config(path).updates.installed_version == "1.0.0"
    with pytest.raises(ConfigError, match=message):
        load_config(path, sets)


@pytest.mark.parametrize("sets, message", [
    (["simulator.timeline=[{at_s = 1, plugd = false}]"], r"simulator.timeline.0.plugd: unknown key"),
    (["simulator.timeline=[{at_s = 1, gear = 'X'}]"], r"timeline.0.gear: expected one of P, R"),
    (["simulator.timeline=[{at_s = 1, soc = 'abc'}]"], r"timeline.0.soc: expected a number 0..100"),
    (["simulator.timeline=[{soc = 20}]"], r"timeline.0.at_s: a number of seconds"),
    (["simulator.speed_kph=-5"], r"simulator: speed_kph 0..250"),
    (["modem.port='/dev/ttyUSB2'", "modem.baud=-5"], r"modem.baud: must be > 0"),
    (["modem.port='/dev/ttyUSB2'", "modem.poll_interval_s=0"], r"modem: poll_interval_s 1..86400"),
    (["gnss.port=''"], r"gnss.port: must name a serial device"),
])
def test_simulator_modem_gnss_values_are_checked(tmp_path, test_dbc, sets, message):
    path = write(tmp_path, GOOD + "\n[simulator]\nenabled = false\n", test_dbc)
    load_config(path, ["simulator.timeline=[{at_s = 2, drive = true, gear = 'D'}]"])
    with pytest.raises(ConfigError, match=message):
        load_config(path, sets)


def test_signal_map_values_must_be_plain(tmp_path, test_dbc):
    path = write(tmp_path, GOOD, test_dbc)
    with pytest.raises(ConfigError, match=r"telemetry.signal.0.map.Unlocked: a map value must"):
        load_config(path, ['telemetry.signal=[{select = "VCU_Drive.Speed", '
                           'map = {"Unlocked" = 1979-05-27T07:32:00Z}}]'])


def test_set_addresses_an_entry_whose_name_has_dots(tmp_path, test_dbc):
    path = write(tmp_path, GOOD, test_dbc)
    sig = 'telemetry.signal=[{select = "VCU_Drive.Speed", name = "Vehicle.Speed"}]'
    cfg = load_config(path, [sig, "telemetry.signal.Vehicle.Speed.deadband=2.5"])
    assert cfg.telemetry.signal[0].deadband == 2.5
    cfg = load_config(path, [sig, "telemetry.signal.0.deadband=1.5", "bus.body.bitrate=125000"])
    assert cfg.telemetry.signal[0].deadband == 1.5 and cfg.bus[1].bitrate == 125000
    with pytest.raises(ConfigError, match="no entry named 'Vehicle'"):
        load_config(path, [sig, "telemetry.signal.Vehicle.Speeds.deadband=2.5"])


def test_an_action_named_like_another_familys_command_is_refused():
    """[[commands.action]] name = "state.snapshot" would shadow the state family."""
    from agent.app.assemble import telemetry_core
    from agent.app.families import handlers
    from conftest import ROOT

    cfg = load_config(ROOT / "configs" / "demo.toml", ["commands.action.0.name='state.snapshot'"])
    plans = bus_plans(cfg)
    core = telemetry_core(plans, cfg.telemetry)
    with pytest.raises(ConfigError, match=r"demo.toml: commands.action: command 'state.snapshot' "
                                          r"is claimed by families 'actions' and 'state'"):
        handlers(cfg, plans, core, [], dict, lambda values, t: None, None, lambda: (True, ""))
    assert len(handlers(load_config(ROOT / "configs" / "demo.toml"), plans, core, [], dict,
                        lambda values, t: None, None, lambda: (True, ""))) == 5  # actions, state, update, trust, diag


def test_the_cores_selection_types_mirror_the_config():
    """assemble.selection copies [telemetry] field by field: a key added to one side only
    would be silently dropped."""
    from dataclasses import fields

    from agent.app.assemble import selection
    from agent.config import SamplingConfig, SignalConfig, TelemetryConfig
    from agent.core.selection import Sampling, SignalChoice

    names = lambda cls: {f.name for f in fields(cls)}  # noqa: E731
    assert names(SignalConfig) == names(SignalChoice)
    assert names(SamplingConfig) == names(Sampling)
    sel = selection(TelemetryConfig(messages=("A",), signal=(SignalConfig(select="A.B", state=True,
                                                                          timeout_ms=5),),
                                    defaults=SamplingConfig(deadband=2.0)))
    assert sel.messages == ("A",) and sel.defaults == Sampling(deadband=2.0)
    assert sel.signals == (SignalChoice(select="A.B", state=True, timeout_ms=5),)
