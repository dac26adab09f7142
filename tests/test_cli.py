"""The command line as a user meets it: real processes, real files, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import cbor2
import pytest

from conftest import ROOT, shared

COMMANDS = ["run", "replay", "monitor", "dbc"]


def cli(*args, check=False, timeout=60):
    proc = subprocess.run([sys.executable, "-m", "agent", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_on_every_command(command):
    proc = cli(command, "--help", check=True)
    assert "usage: tcu-agent " + command in proc.stdout


def test_replay_json_with_dbc(kona_log, kona_dbc, tmp_path):
    out = tmp_path / "batches.cbor"
    proc = cli("replay", kona_log, "--dbc", kona_dbc, "--json", "--out", out, check=True)
    result = json.loads(proc.stdout)
    for key in ("frames", "decoded", "decode_errors", "unknown_ids", "samples", "batches",
                "bytes", "seconds", "us_per_frame"):
        assert key in result
    assert result["frames"] == 24263 and result["bad_length"] == 282
    assert result["bytes"] == out.stat().st_size
    with open(out, "rb") as f:
        batches = []
        while f.tell() < result["bytes"]:
            batches.append(cbor2.load(f))
    assert len(batches) == result["batches"] > 5
    assert [b["seq"] for b in batches] == list(range(1, len(batches) + 1))
    assert sum(len(v) for b in batches for v in b["sig"].values()) == result["samples"]
    assert all(b["v"] == 1 and b["vin"] == "REPLAY" for b in batches)


def test_replay_with_config_uses_vss_names(kona_log):
    proc = cli("replay", kona_log, "-c", "configs/kona.toml", "--json", "--start-ms",
               "1700000000000", "--out", "/dev/null", check=True)
    assert json.loads(proc.stdout)["signals"] == 445


def test_replay_human_output(kona_log, kona_dbc):
    proc = cli("replay", kona_log, "--dbc", kona_dbc, check=True)
    assert "24263 frames" in proc.stdout and "length mismatches 282" in proc.stdout


def test_dbc_listing(tesla_dbc):
    proc = cli("dbc", tesla_dbc, check=True)
    assert "159 messages, 2752 signals" in proc.stdout
    assert "ID33AUI_rangeSOC" in proc.stdout
    proc = cli("dbc", tesla_dbc, "--json", "-m", "0x33A", check=True)
    (msg,) = json.loads(proc.stdout)
    assert msg["name"] == "ID33AUI_rangeSOC" and {s["name"] for s in msg["signals"]} >= {"UI_SOC"}


def test_bad_input_gives_one_line_and_status_2(tmp_path, test_dbc, kona_log):
    assert_one_line_error(cli("dbc", tmp_path / "none.dbc"), "no such CAN database file")
    broken = tmp_path / "broken.dbc"
    broken.write_text('VERSION ""\nBO_ 1 X: 8 Y\n SG_ a : 0|8@1+ (1,0) [0|0] "" Y\n garbage\n')
    assert_one_line_error(cli("dbc", broken), "broken.dbc: line 4, column 2: invalid syntax")
    garbage = tmp_path / "garbage.log"
    garbage.write_text("(1.0) can0 123#00\nthis is not candump\n")
    # (without --strict the line is skipped and counted: tests/test_replay_cli.py)
    assert_one_line_error(cli("replay", garbage, "--dbc", test_dbc, "--strict"), "garbage.log:2")
    assert_one_line_error(cli("replay", tmp_path / "none.log", "--dbc", test_dbc), "no such log")
    weird = tmp_path / "x.unknownext"
    weird.write_text("x")
    assert_one_line_error(cli("replay", weird, "--dbc", test_dbc), "x.unknownext")
    assert_one_line_error(cli("run", "-c", tmp_path / "none.toml"), "no such config file")
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[vehicle]\nvin="V"\n[storage]\ndir="s"\n[[bus]]\nname="a"\n'
                   f'interface="nosuchiface"\nchannel="x"\ndbc=["{test_dbc}"]\n')
    assert_one_line_error(cli("run", "-c", cfg), "unknown python-can interface 'nosuchiface'")
    assert_one_line_error(cli("run", "-c", cfg, "--set", "bus.a.bitrate=oops"),
                          "bus.0.bitrate: expected an integer")


def test_debug_shows_traceback(tmp_path):
    proc = cli("--debug", "dbc", tmp_path / "none.dbc")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_console_script_is_declared():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'tcu-agent = "agent.cli.main:main"' in text


def test_tesla_replay(tmp_path):
    log, dbc = shared("tesla_model3_scripted_soc.log"), shared("tesla_model3.dbc")
    result = json.loads(cli("replay", log, "--dbc", dbc, "--json", check=True).stdout)
    assert result["frames"] == 12138 and result["signals"] == 2752 and result["samples"] > 0


def test_run_refuses_without_a_usable_signing_key(tmp_path, test_dbc):
    cfg = tmp_path / "agent.toml"
    key = tmp_path / "keys" / "vehicle.key"
    cfg.write_text(f'[vehicle]\nvin="V1"\n[storage]\ndir="{tmp_path / "s"}"\n[[bus]]\nname="a"\n'
                   f'interface="virtual"\nchannel="x"\ndbc=["{test_dbc}"]\n[mqtt]\nport=1\n'
                   f'[signing]\nkey_file="{key}"\n')
    assert_one_line_error(cli("run", "-c", cfg), "not found", "tcu-agent keys generate --dir")
    assert cli("keys", "generate", "--dir", key.parent, check=True).stdout.strip()
    key.chmod(0o640)
    assert_one_line_error(cli("run", "-c", cfg), "group or others", "chmod 600")
    key.chmod(0o600)
    again = cli("keys", "generate", "--dir", key.parent)
    assert_one_line_error(again, "already exists", "--force")
    cfg.write_text(cfg.read_text().replace(f'[signing]\nkey_file="{key}"\n', ""))
    assert_one_line_error(cli("run", "-c", cfg), "signing.key_file")


def test_replay_reads_python_can_formats_and_counts_bad_lines(tmp_path, test_dbc):
    import can
    msgs = [can.Message(timestamp=1_700_000_000 + i / 100, arbitration_id=0x100, channel=0,
                        data=bytes([i, 0, 0, 0, 0, 0, 0, 0])) for i in range(20)]
    for ext in ("asc", "blf", "trc", "csv"):
        path = tmp_path / f"log.{ext}"
        with can.Logger(str(path)) as logger:
            for m in msgs:
                logger.on_message_received(m)
        result = json.loads(cli("replay", path, "--dbc", test_dbc, "--json", check=True).stdout)
        assert (result["frames"], result["decoded"], result["skipped_lines"]) == (20, 20, 0), ext
    lines = (tmp_path / "log.trc").read_text().splitlines(keepends=True)
    lines.insert(len(lines) - 5, "garbage\n")  # python-can warns and skips it: counted
    (tmp_path / "bad.trc").write_text("".join(lines))
    proc = cli("replay", tmp_path / "bad.trc", "--dbc", test_dbc, "--json", check=True)
    result = json.loads(proc.stdout)
    assert (result["frames"], result["skipped_lines"]) == (20, 1)
    assert "garbage" not in proc.stderr  # counted, not one warning per line


def test_bench_targets_are_judged_unrounded():
    import importlib.util
    spec = importlib.util.spec_from_file_location("ingest", ROOT / "bench" / "ingest.py")
    ingest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ingest)
    frames = 1_000_000
    assert not ingest.meets_targets(frames, baseline_s=1.995, agent_s=1.0)  # "2.00x" printed
    assert ingest.meets_targets(frames, baseline_s=2.0, agent_s=1.0)
    assert not ingest.meets_targets(199_999, baseline_s=3.0, agent_s=1.0)
