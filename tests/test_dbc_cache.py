"""The parsed-database cache: keyed by the DBC's bytes (not its mtime), never trusted blindly."""

from __future__ import annotations

import os
import pickle

from agent.adapters.dbc import load_database

DBC = """VERSION ""
BS_:
BU_: ECU
BO_ 256 Speed: 8 ECU
 SG_ {name} : 0|16@1+ (0.1,0) [0|6553.5] "km/h" ECU
"""


def write_dbc(path, name):
    path.write_text(DBC.format(name=name))


def entries(cache):
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_a_warm_load_comes_from_the_cache(tmp_path):
    dbc, cache = tmp_path / "car.dbc", tmp_path / "cache"
    write_dbc(dbc, "VehicleSpeed")
    db = load_database(dbc, cache)
    assert [s.name for s in db.get_message_by_name("Speed").signals] == ["VehicleSpeed"]
    assert len(entries(cache)) == 1
    entry = cache / entries(cache)[0]
    # Put a recognisably different database in the entry: a warm load must return it.
    db.get_message_by_name("Speed").signals[0].name = "FromCache"
    entry.write_bytes(pickle.dumps(db))
    warm = load_database(dbc, cache)
    assert warm.get_message_by_name("Speed").signals[0].name == "FromCache"


def test_a_changed_file_with_the_same_mtime_is_parsed_afresh(tmp_path):
    dbc, cache = tmp_path / "car.dbc", tmp_path / "cache"
    write_dbc(dbc, "VehicleSpeed")
    load_database(dbc, cache)
    stat = dbc.stat()
    write_dbc(dbc, "WheelSpeed00")  # same length, same mtime: only the hash tells
    os.utime(dbc, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    db = load_database(dbc, cache)
    assert db.get_message_by_name("Speed").signals[0].name == "WheelSpeed00"
    assert len(entries(cache)) == 2


def test_an_unreadable_entry_is_parsed_again_and_rewritten(tmp_path, caplog):
    dbc, cache = tmp_path / "car.dbc", tmp_path / "cache"
    write_dbc(dbc, "VehicleSpeed")
    load_database(dbc, cache)
    entry = cache / entries(cache)[0]
    entry.write_bytes(b"\x80\x05truncated")
    db = load_database(dbc, cache)
    assert db.get_message_by_name("Speed").signals[0].name == "VehicleSpeed"
    assert "unreadable" in caplog.text
    assert pickle.loads(entry.read_bytes()).get_message_by_name("Speed") is not None


def test_a_cache_that_cannot_be_written_only_costs_the_parse(tmp_path):
    dbc = tmp_path / "car.dbc"
    write_dbc(dbc, "VehicleSpeed")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    db = load_database(dbc, blocker / "cache")
    assert db.get_message_by_name("Speed").signals[0].name == "VehicleSpeed"
