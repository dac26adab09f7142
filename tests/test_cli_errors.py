"""Wrong input as a new user gives it: exit status 2, one line on stderr, never a traceback."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT
from test_cli import assert_one_line_error, cli

CANDUMP = "(1700000000.000000) can0 100#0102030405060708\n"


@pytest.mark.parametrize("name,content,fragment", [
    ("garbage.blf", b"garbage, not a BLF file\n", "not a BLF log?"),
    ("random.blf", bytes(range(256)) * 4, "not a BLF log?"),
    ("empty.blf", b"", "empty log file"),
    ("garbage.asc", b"this is\nnot an ASC log\n", "no CAN frames could be read: not an ASC log?"),
    ("garbage.trc", b"this is\nnot a TRC log\n", "no CAN frames could be read: not a TRC log?"),
    ("garbage.csv", b"this is\nnot a CSV log\n", "no CAN frames could be read: not a CSV log?"),
    ("empty.asc", b"", "empty log file"),
    ("empty.log", b"", "empty log file"),
    ("comments.log", b"# only a comment\n\n", "no CAN frames could be read: not a candump -L log?"),
])
def test_unreadable_or_empty_logs(tmp_path, test_dbc, name, content, fragment):
    log = tmp_path / name
    log.write_bytes(content)
    assert_one_line_error(cli("replay", log, "--dbc", test_dbc), name, fragment)


def test_replay_missing_log_and_dbc(tmp_path):
    assert_one_line_error(cli("replay", "nosuch.log", "--dbc", "x"), "nosuch.log: no such log file")


def test_replay_log_is_a_directory(tmp_path, test_dbc):
    assert_one_line_error(cli("replay", tmp_path, "--dbc", test_dbc), "is a directory")


def test_replay_needs_config_or_dbc(tmp_path):
    log = tmp_path / "a.log"
    log.write_text(CANDUMP)
    assert_one_line_error(cli("replay", log), "-c CONFIG", "--dbc FILE")


def test_replay_out_in_a_missing_directory_fails_before_reading(tmp_path, test_dbc):
    log = tmp_path / "garbage.asc"  # would fail too, but only once the replay reads it
    log.write_text("not an ASC log\n")
    proc = cli("replay", log, "--dbc", test_dbc, "--out", "/nonexistent/x.cbor")
    assert_one_line_error(proc, "--out /nonexistent/x.cbor", "No such file or directory")
    assert proc.stdout == ""


@pytest.mark.parametrize("message", ["0x999", "NoSuchMessage"])
def test_dbc_unknown_message(test_dbc, message):
    assert_one_line_error(cli("dbc", test_dbc, "-m", message), f"no message {message} in ")


def test_dbc_message_given_a_signal_name_says_whose(test_dbc):
    assert_one_line_error(cli("dbc", test_dbc, "-m", "Speed"), "Speed is a signal of VCU_Drive")


def test_dbc_on_a_directory(tmp_path):
    assert_one_line_error(cli("dbc", tmp_path), "is a directory")


def test_dbc_on_a_binary_or_empty_file(tmp_path):
    binary = tmp_path / "firmware.dbc"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    assert_one_line_error(cli("dbc", binary), "binary file, not a CAN database")
    empty = tmp_path / "empty.dbc"
    empty.write_bytes(b"")
    assert_one_line_error(cli("dbc", empty), "empty file")


def test_monitor_missing_config(tmp_path):
    assert_one_line_error(cli("monitor", "-c", tmp_path / "none.toml"), "no such config file")


def _config(tmp_path, dbc, interface):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[vehicle]\nvin="V"\n[storage]\ndir="{tmp_path / "s"}"\n[[bus]]\nname="a"\n'
                   f'interface="{interface}"\nchannel="x"\ndbc=["{dbc}"]\n')
    return cfg


def test_monitor_bad_interval(tmp_path, test_dbc):
    cfg = _config(tmp_path, test_dbc, "virtual")
    assert_one_line_error(cli("monitor", "-c", cfg, "--interval", "-1"), "--interval")


@pytest.mark.parametrize("command", ["run", "monitor"])
def test_unknown_bus_interface(tmp_path, test_dbc, command):
    cfg = _config(tmp_path, test_dbc, "nosuch")
    assert_one_line_error(cli(command, "-c", cfg), "bus.0.interface",
                          "unknown python-can interface 'nosuch'", "socketcan", "virtual")


def test_misspelt_interface_gets_a_suggestion(tmp_path, test_dbc):
    cfg = _config(tmp_path, test_dbc, "socketcam")
    assert_one_line_error(cli("run", "-c", cfg), "did you mean 'socketcan'?")


# -- messages that blame the right thing ------------------------------------------------------

def test_demo_broker_flag_is_blamed(tmp_path):
    proc = cli("demo", "--broker", "nonsense")
    assert_one_line_error(proc)
    assert proc.stderr == ("tcu-agent: error: --broker nonsense: expected HOST:PORT "
                           "(e.g. 127.0.0.1:1883)\n")


def test_set_of_an_unknown_key_names_the_set(tmp_path):
    log = tmp_path / "a.log"
    log.write_text(CANDUMP)
    proc = cli("replay", log, "-c", "configs/demo.toml", "--set", "vehicle.nope=1")
    assert_one_line_error(proc)
    assert proc.stderr == ("tcu-agent: error: --set 'vehicle.nope=1': vehicle.nope: unknown key "
                           "(known: vin, topic_prefix)\n")
    proc = cli("status", "-c", "configs/demo.toml", "--set", "mqtt.port=abc")
    assert proc.stderr == ("tcu-agent: error: --set 'mqtt.port=abc': mqtt.port: expected an "
                           "integer, got a string\n")
    # an entry addressed by name is named as the user wrote it
    proc = cli("status", "-c", "configs/demo.toml", "--set", "bus.pt.bitrate=fast")
    assert proc.stderr.startswith("tcu-agent: error: --set 'bus.pt.bitrate=fast': bus.0.bitrate:")


def test_a_bad_value_in_the_file_still_names_the_file(tmp_path):
    cfg = tmp_path / "a.toml"
    cfg.write_text((ROOT / "configs" / "demo.toml").read_text().replace(
        "port = 1883", 'port = "x"').replace("../", f"{ROOT}/"))
    proc = cli("status", "-c", cfg, "--set", "vehicle.vin='V1'")
    assert proc.stderr == f"tcu-agent: error: {cfg}: mqtt.port: expected an integer, got a string\n"


def test_verify_of_an_empty_file_is_an_error(tmp_path):
    from agent.adapters.keys import generate_keypair
    generate_keypair(tmp_path)
    empty = tmp_path / "batches.cbor"
    empty.write_bytes(b"")
    proc = cli("verify", "--pub", tmp_path / "vehicle.pub", empty)
    assert_one_line_error(proc)
    assert proc.stderr == f"tcu-agent: error: {empty}: empty file, no signed messages to verify\n"


@pytest.mark.parametrize("name,content,message", [
    ("README.md", "# a readme\n", "not a CAN database file name (supported: .dbc, .kcd, .arxml, "
                                  ".sym, .cdd)"),
    ("notes.dbc", "# notes, not a DBC\nmore\n",
     "not a valid DBC file? line 1, column 1: invalid syntax near '# notes, not a DBC'"),
])
def test_dbc_of_a_file_that_is_no_database(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    proc = cli("dbc", path)
    assert_one_line_error(proc)
    assert proc.stderr == f"tcu-agent: error: {path}: {message}\n"
    assert "expected database format" not in proc.stderr


@pytest.mark.parametrize("args", [
    ("dbc", "nosuch.dbc", "--json"),
    ("replay", "nosuch.log", "--dbc", "x.dbc", "--json"),
    ("status", "-c", "nosuch.toml", "--json"),
    ("update", "status", "-c", "nosuch.toml", "--json"),
])
def test_json_errors_are_json(args):
    proc = cli(*args)
    assert proc.returncode == 2, proc
    body = json.loads(proc.stdout)
    assert list(body) == ["error"] and "nosuch" in body["error"]
    assert proc.stderr == f"tcu-agent: error: {body['error']}\n"
