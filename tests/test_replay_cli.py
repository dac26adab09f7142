"""`tcu-agent replay` over imperfect logs: bad lines are skipped and counted (their first line
numbers in the summary), --strict fails on the first, a line is a frame only when it parses
completely, and a log replayed against the wrong DBC says so."""

from __future__ import annotations

import json

from conftest import shared
from test_cli import assert_one_line_error, cli

GOOD = "(1700000000.000000) can0 100#0102030405060708\n"


def _log(tmp_path, lines: list[str]):
    path = tmp_path / "bad.log"
    path.write_text("".join(lines))
    return path


def test_bad_lines_are_skipped_counted_and_located(tmp_path, test_dbc):
    log = _log(tmp_path, [GOOD, "not a frame\n", GOOD, "(1.0) can0 10\n", GOOD,
                          "(1.1) can0 100#01020\n", "(x) can0 100#01\n", GOOD,
                          "(1.2) can0 100#01 extra\n", "(1.3) can0 1234#01\n"])
    result = json.loads(cli("replay", log, "--dbc", test_dbc, "--json", check=True).stdout)
    assert result["frames"] == 4
    assert result["skipped_lines"] == 6
    assert result["skipped_at"] == [2, 4, 6, 7, 9]  # the first five

    proc = cli("replay", log, "--dbc", test_dbc, check=True)
    assert ", unparsable lines skipped 6 (lines 2, 4, 6, 7, 9, ...)" in proc.stdout
    assert proc.stderr == ""


def test_a_truncated_last_line_is_not_a_frame(tmp_path, test_dbc):
    log = _log(tmp_path, [GOOD, GOOD, "(1.0) can0 10"])
    result = json.loads(cli("replay", log, "--dbc", test_dbc, "--json", check=True).stdout)
    assert (result["frames"], result["skipped_lines"], result["skipped_at"]) == (2, 1, [3])
    proc = cli("replay", log, "--dbc", test_dbc, check=True)
    assert ", unparsable lines skipped 1 (line 3)" in proc.stdout


def test_strict_fails_on_the_first_bad_line(tmp_path, test_dbc):
    log = _log(tmp_path, [GOOD, GOOD, "(1.0) can0 10\n", "garbage\n"])
    proc = cli("replay", log, "--dbc", test_dbc, "--strict")
    assert_one_line_error(proc)
    assert proc.stderr == (f"tcu-agent: error: {log}:3: not a candump -L line "
                           "'(time) channel ID#DATA': no '#' between the id and the data\n")


def test_a_log_of_nothing_but_bad_lines_is_an_error(tmp_path, test_dbc):
    log = _log(tmp_path, ["garbage\n", "(1.0) can0 10\n"])
    assert_one_line_error(cli("replay", log, "--dbc", test_dbc),
                          "no CAN frames could be read: not a candump -L log?")


def test_the_wrong_dbc_for_a_log_warns(kona_dbc):
    log = shared("kona_parked_no_key.log")
    proc = cli("replay", log, "--dbc", shared("tesla_model3.dbc"), check=True)
    assert proc.stderr == ("tcu-agent replay: warning: 8,688 of 8,969 frames have ids the CAN "
                           "database does not know: the wrong DBC for this log?\n")
    right = cli("replay", log, "--dbc", kona_dbc, check=True)
    assert right.stderr == ""


def test_an_unknown_format_lists_the_supported_ones(tmp_path, test_dbc):
    log = tmp_path / "capture.pcap"
    log.write_text(GOOD)
    proc = cli("replay", log, "--dbc", test_dbc)
    assert_one_line_error(proc)
    assert proc.stderr == (f"tcu-agent: error: {log}: unknown log format .pcap; supported: "
                           ".log (candump -L), .asc, .blf, .csv, .db, .mf4, .trc (optionally "
                           ".gz)\n")
