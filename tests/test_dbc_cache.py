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


# -- the compiled decoders (core/fastdecode.py), kept beside the parsed databases ------------

import marshal  # noqa: E402
import zlib  # noqa: E402

from agent.adapters.canlog import read_frames  # noqa: E402
from agent.app.assemble import bus_plans, telemetry_core  # noqa: E402
from agent.config import config_from_dict  # noqa: E402
from conftest import shared  # noqa: E402

SPEED_FRAME = (256).to_bytes(2, "little") + bytes(6)  # Speed raw 256: 25.6 km/h


def agent_config(tmp_path, dbc, messages=("*",)):
    return config_from_dict({
        "vehicle": {"vin": "VIN0001"}, "storage": {"dir": str(tmp_path / "state")},
        "bus": [{"name": "pt", "interface": "virtual", "channel": "x", "dbc": [str(dbc)]}],
        "telemetry": {"messages": list(messages)}}, base=tmp_path)


def build_core(cfg, cache, live=True):
    return telemetry_core(bus_plans(cfg, cache_dir=cache), cfg.telemetry, live=live)


def decoder_file(cache):
    (path,) = cache.glob("decoders-*.marshal")
    return path


def read_decoders(path):
    data = path.read_bytes()
    assert data[:4] == b"TCUD" and zlib.crc32(data[8:]) == int.from_bytes(data[4:8], "little")
    return marshal.loads(data[8:])


def write_decoders(path, table):
    data = marshal.dumps(table)
    path.write_bytes(b"TCUD" + zlib.crc32(data).to_bytes(4, "little") + data)


def speed_values(core, frames=(SPEED_FRAME,)):
    core.tick(1000.0)
    for i, data in enumerate(frames):
        core.feed(0, 1000.0 + i * 0.01, 256, data)
    core.flush()
    return [v for b in core.take_batches() for _, v in b.sig.get("Speed.VehicleSpeed", [])]


def test_a_warm_core_takes_its_decoders_from_the_cache(tmp_path):
    dbc, cache = tmp_path / "car.dbc", tmp_path / "cache"
    write_dbc(dbc, "VehicleSpeed")
    cfg = agent_config(tmp_path, dbc)
    assert speed_values(build_core(cfg, cache)) == [25.6]
    path = decoder_file(cache)
    table = read_decoders(path)
    ((key, _code),) = table.items()
    assert key[0] == "<decoder Speed>"
    # A recognisably different decoder under the same key: a warm start must run it.
    table[key] = compile("def decode(data, prev):\n    return 1, [(0, 'from the cache')]",
                         key[0], "exec")
    write_decoders(path, table)
    assert speed_values(build_core(cfg, cache)) == ["from the cache"]


def test_a_damaged_decoder_file_is_compiled_again_and_rewritten(tmp_path, caplog):
    dbc, cache = tmp_path / "car.dbc", tmp_path / "cache"
    write_dbc(dbc, "VehicleSpeed")
    cfg = agent_config(tmp_path, dbc)
    build_core(cfg, cache)
    path = decoder_file(cache)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a flipped byte inside a code object: never run it
    path.write_bytes(bytes(data))
    assert speed_values(build_core(cfg, cache)) == [25.6]
    assert "unreadable" in caplog.text and "bad checksum" in caplog.text
    assert len(read_decoders(path)) == 1


def test_the_decoder_file_keeps_what_the_last_start_used(tmp_path):
    dbc, cache = tmp_path / "car.dbc", tmp_path / "cache"
    dbc.write_text(DBC.format(name="VehicleSpeed")
                   + 'BO_ 512 Temp: 8 ECU\n SG_ Coolant : 0|8@1+ (1,-40) [-40|215] "C" ECU\n')
    build_core(agent_config(tmp_path, dbc), cache)
    path = decoder_file(cache)
    assert sorted(k[0] for k in read_decoders(path)) == ["<decoder Speed>", "<decoder Temp>"]
    before = path.stat().st_mtime_ns
    build_core(agent_config(tmp_path, dbc), cache)  # the same decoders: not written again
    assert path.stat().st_mtime_ns == before
    build_core(agent_config(tmp_path, dbc, messages=["Temp"]), cache)
    assert [k[0] for k in read_decoders(path)] == ["<decoder Temp>"]


def test_a_decoder_cache_that_cannot_be_written_only_costs_the_compile(tmp_path, caplog):
    dbc = tmp_path / "car.dbc"
    write_dbc(dbc, "VehicleSpeed")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert speed_values(build_core(agent_config(tmp_path, dbc), blocker / "cache")) == [25.6]
    assert "cannot write the decoder cache" in caplog.text


def test_cached_decoders_decode_the_real_log_exactly_as_fresh_ones(tmp_path):
    """Tesla Model 3, every signal: a core built from the cache emits the same samples as one
    that compiled its decoders, and as one built without any cache."""
    dbc, log = shared("tesla_model3.dbc"), shared("tesla_model3_scripted_soc.log")
    frames = [(0, t, can_id, data) for t, _, can_id, data in read_frames(log)][:20_000]
    cfg, cache = agent_config(tmp_path, dbc), tmp_path / "cache"

    def samples(core):
        core.tick(frames[0][1])
        core.feed_many(frames)
        core.flush()
        return [(b.sig, b.t0) for b in core.take_batches()]

    cold = samples(build_core(cfg, cache, live=False))  # on the log's own time
    assert len(read_decoders(decoder_file(cache))) > 100
    warm = samples(build_core(cfg, cache, live=False))
    plain = samples(telemetry_core(bus_plans(cfg), cfg.telemetry))
    assert cold == warm == plain and sum(len(v) for sig, _ in cold for v in sig.values()) > 3000
