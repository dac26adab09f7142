"""The agent on live buses: python-can's virtual interface in-process, slcan over a pty."""

from __future__ import annotations

import functools

import logging
import os
import signal
import threading
import time
import uuid

import can
import pytest

from agent.adapters.canbus import receive_filters
from agent.cli.main import main as cli_main
from agent.config import config_from_dict
from agent.app.runtime import Agent
import support.wait


def config(test_dbc, tmp_path, **bus):
    raw = {
        "vehicle": {"vin": "VIN0001"},
        "storage": {"dir": str(tmp_path / "state")},
        "bus": [{"name": "pt", "interface": "virtual", "channel": f"t-{uuid.uuid4().hex}",
                 "dbc": [str(test_dbc)], **bus}],
        "telemetry": {"messages": ["VCU_Drive", "BMS_Status"], "max_batch_age_ms": 200},
    }
    return config_from_dict(raw, base=tmp_path)


wait_until = functools.partial(support.wait.wait_until, timeout=5.0)


def test_agent_decodes_live_frames_into_batches(test_dbc, tmp_path):
    cfg = config(test_dbc, tmp_path)
    batches = []
    agent = Agent(cfg, on_batch=batches.append)
    import cantools
    db = cantools.database.load_file(str(test_dbc))
    drive = db.get_message_by_name("VCU_Drive")
    agent.start()
    try:
        assert agent.readers[0].wait_open(2)
        with can.Bus(interface="virtual", channel=cfg.bus[0].channel) as feeder:
            for speed in (10.0, 20.0, 30.0):
                feeder.send(can.Message(arbitration_id=drive.frame_id,
                                        data=drive.encode({"Speed": speed, "Gear": 3, "Ready": 1}),
                                        is_extended_id=False))
                time.sleep(0.02)
            feeder.send(can.Message(arbitration_id=0x7FF, data=b"\x01", is_extended_id=False))
            assert wait_until(lambda: any("VCU_Drive.Speed" in b.sig and
                                          b.sig["VCU_Drive.Speed"][-1][1] == 30.0 for b in batches))
    finally:
        agent.stop()
    speeds = [v for b in batches for _, v in b.sig.get("VCU_Drive.Speed", [])]
    # A slow stop may let the signal time out (auto timeout, 500 ms): a trailing null is right.
    assert speeds[:3] == [10.0, 20.0, 30.0] and all(v is None for v in speeds[3:]), speeds
    assert any(b.sig.get("VCU_Drive.Gear") == [[0, "D"]] or
               any(v == "D" for _, v in b.sig.get("VCU_Drive.Gear", [])) for b in batches)
    t0 = batches[0].t0
    assert abs(t0 / 1000 - time.time()) < 60  # UTC ms
    status = agent.bus_status()[0]
    assert status["frames"] == 3  # the kernel-style filter kept 0x7FF out (software on virtual)
    assert status["unknown_ids"] == 0


def test_receive_filters_from_selection():
    filters = receive_filters([0x100, 0x200, 0x100 | 0x80000000])
    assert {"can_id": 0x100, "can_mask": 0x7FF, "extended": False} in filters
    assert {"can_id": 0x100, "can_mask": 0x1FFFFFFF, "extended": True} in filters
    assert receive_filters(range(600)) is None  # more than SocketCAN takes: receive all


def test_without_filters_unknown_ids_are_counted(test_dbc, tmp_path):
    cfg = config(test_dbc, tmp_path, filters=False)
    agent = Agent(cfg)
    agent.start()
    try:
        assert agent.readers[0].wait_open(2)
        with can.Bus(interface="virtual", channel=cfg.bus[0].channel) as feeder:
            feeder.send(can.Message(arbitration_id=0x7FF, data=b"\x01", is_extended_id=False))
            assert wait_until(lambda: agent.bus_status()[0]["unknown_ids"] == 1)
    finally:
        agent.stop()


def test_cli_run_end_to_end_on_virtual_bus(test_dbc, tmp_path, caplog):
    """`tcu-agent run` in this process, fed by another bus object, stopped by SIGTERM."""
    cfg_path = tmp_path / "agent.toml"
    channel = f"run-{uuid.uuid4().hex}"
    cfg_path.write_text(f'''
[vehicle]
vin = "VIN0001"
[storage]
dir = "state"
[[bus]]
name = "pt"
interface = "virtual"
channel = "{channel}"
dbc = ["{test_dbc}"]
[telemetry]
messages = ["*"]
max_batch_age_ms = 100
''')
    import cantools
    db = cantools.database.load_file(str(test_dbc))
    bms = db.get_message_by_name("BMS_Status")

    def feed_then_stop():
        time.sleep(0.5)
        with can.Bus(interface="virtual", channel=channel) as feeder:
            for i in range(20):
                feeder.send(can.Message(arbitration_id=0x100, is_extended_id=False,
                                        data=bms.encode({"SOC": 50 + i, "PackVoltage": 400,
                                                         "PackCurrent": 0, "Counter": i % 16,
                                                         "Temp": 20})))
                time.sleep(0.01)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=feed_then_stop, daemon=True).start()
    with caplog.at_level(logging.INFO, logger="agent.app.runtime"):
        status = cli_main(["run", "-c", str(cfg_path)])
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    assert status == 0
    stopped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopped")]
    assert stopped, caplog.text
    batches, samples = (int(x) for x in stopped[0].split()[1:5:2])
    assert batches >= 1 and samples >= 20 * 2  # SOC and Counter change in every frame


def test_vanished_serial_adapter_is_reopened(test_dbc, tmp_path):
    """slcan on a pseudo-terminal: the adapter disappears and comes back; the agent recovers."""
    link = tmp_path / "ttyCAN0"

    def plug():
        master, slave = os.openpty()
        if link.is_symlink():
            link.unlink()
        link.symlink_to(os.ttyname(slave))
        return master, slave

    master, slave = plug()
    cfg = config(test_dbc, tmp_path)
    raw_bus = {"name": "pt", "interface": "slcan", "channel": str(link), "dbc": [str(test_dbc)],
               "options": {"sleep_after_open": 0}}
    cfg = config_from_dict({"vehicle": {"vin": "V1"}, "storage": {"dir": str(tmp_path)},
                            "bus": [raw_bus], "telemetry": {"messages": ["*"]}}, base=tmp_path)
    agent = Agent(cfg)
    agent.readers[0].backoff_s = 0.05
    agent.start()
    try:
        assert agent.readers[0].wait_open(5)
        os.write(master, b"t1008" + b"E803000000000000" + b"\r")
        assert wait_until(lambda: agent.bus_status()[0]["decoded"] == 1)
        os.close(master)  # unplugged: reads fail, the path is gone
        os.close(slave)
        link.unlink()
        assert wait_until(lambda: agent.bus_status()[0]["bus_errors"] >= 2)
        assert agent.bus_status()[0]["state"] == "down"
        master, slave = plug()  # plugged back in (a new tty, as after USB re-enumeration)
        assert wait_until(lambda: agent.bus_status()[0]["state"] == "open")
        os.write(master, b"t1008" + b"D007000000000000" + b"\r")
        assert wait_until(lambda: agent.bus_status()[0]["decoded"] == 2)
        assert agent.bus_status()[0]["reopens"] == 1
        assert agent.snapshot()["BMS_Status.SOC"][1] == pytest.approx(20.0)
    finally:
        agent.stop()
        for fd in (master, slave):
            try:
                os.close(fd)
            except OSError:
                pass


def test_run_under_systemd_notify_and_watchdog(test_dbc, tmp_path):
    """READY=1 once the buses were tried, WATCHDOG=1 while the loop runs, STOPPING=1."""
    import socket
    import subprocess
    import sys

    from conftest import ROOT

    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(10)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[vehicle]\nvin="V1"\n[storage]\ndir="{tmp_path / "s"}"\n[[bus]]\nname="a"\n'
                   f'interface="virtual"\nchannel="x"\ndbc=["{test_dbc}"]\n')
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(cfg)], cwd=ROOT,
                            env=env, stderr=subprocess.DEVNULL)
    try:
        got = []
        while sum(m.startswith(b"WATCHDOG=1") for m in got) < 3:
            got.append(sock.recv(4096))
        assert got[0].startswith(b"READY=1") and b"1/1 bus(es) open" in got[0]
        proc.send_signal(signal.SIGTERM)
        while not got[-1].startswith(b"STOPPING=1"):
            got.append(sock.recv(4096))
        assert proc.wait(15) == 0
    finally:
        proc.kill()
        sock.close()


def test_a_full_disk_keeps_ingest_running_and_reports_the_loss(test_dbc, tmp_path):
    """The outbox's filesystem fills up: batches cannot be stored, the core thread keeps going,
    and once there is room again the next batch's drop counts the samples that were lost."""
    from agent.adapters.keys import generate_keypair
    from agent.core.cose import decode_unverified
    from support.mosquitto import _free_port
    from support.tmpfs import fill, tmpfs

    with tmpfs(tmp_path / "tiny", "2m") as tiny:
        generate_keypair(tmp_path / "keys", stem="vehicle")
        raw = {
            "vehicle": {"vin": "VIN0001"},
            "storage": {"dir": str(tiny / "state")},
            "bus": [{"name": "pt", "interface": "virtual", "channel": f"t-{uuid.uuid4().hex}",
                     "dbc": [str(test_dbc)]}],
            "telemetry": {"messages": ["VCU_Drive"], "max_batch_age_ms": 50},
            "signing": {"key_file": str(tmp_path / "keys" / "vehicle.key")},
            "mqtt": {"port": _free_port()},  # no broker: everything stays in the outbox
        }
        agent = Agent(config_from_dict(raw, base=tmp_path))
        import cantools
        drive = cantools.database.load_file(str(test_dbc)).get_message_by_name("VCU_Drive")
        agent.start()
        try:
            assert agent.readers[0].wait_open(2)
            with can.Bus(interface="virtual", channel=raw["bus"][0]["channel"]) as feeder:
                def feed(n, start):
                    for i in range(n):
                        feeder.send(can.Message(arbitration_id=drive.frame_id, data=drive.encode(
                            {"Speed": float((start + i) % 200), "Gear": 3, "Ready": 1}),
                            is_extended_id=False))
                        time.sleep(0.005)

                feed(20, 0)
                filler = fill(tiny / "filler")  # the disk fills up (someone else's file)
                batches_before = agent.batches_closed
                feed(40, 20)  # these batches cannot be stored
                assert wait_until(lambda: agent.batches_closed >= batches_before + 3)
                assert agent._core_thread.is_alive()
                filler.unlink()  # room again
                feed(20, 60)
                time.sleep(0.5)
        finally:
            agent.stop()
        import sqlite3
        with sqlite3.connect(tiny / "state" / "outbox.db") as db:
            payloads = [bytes(r[0]) for r in db.execute(
                "SELECT payload FROM messages WHERE kind = 'telemetry' ORDER BY id")]
        drops = [decode_unverified(p)[2].get("drop", 0) for p in payloads]
        assert sum(drops) > 0, drops  # the loss is reported, not silent


def test_a_stalled_core_thread_stops_the_agents_watchdog_pings(test_dbc, tmp_path, monkeypatch):
    """The real Agent under systemd's watchdog: its core thread blocks (here in the batch sink)
    and WATCHDOG=1 stops, so systemd would kill and restart it; READY and STOPPING still go."""
    import socket

    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # pings every 0.2 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    release = threading.Event()
    stalled_at = []

    def stuck_sink(batch):  # the first batch blocks the core thread
        stalled_at.append(time.monotonic())
        release.wait(10)

    cfg = config(test_dbc, tmp_path)
    agent = Agent(cfg, on_batch=stuck_sink)
    received: list[tuple[float, bytes]] = []
    done = threading.Event()

    def listen():
        while not done.is_set():
            try:
                received.append((time.monotonic(), sock.recv(4096)))
            except socket.timeout:
                pass

    def drive():
        time.sleep(1.0)  # healthy first
        with can.Bus(interface="virtual", channel=cfg.bus[0].channel) as feeder:
            feeder.send(can.Message(arbitration_id=0x100, data=bytes(8), is_extended_id=False))
            import cantools
            msg = cantools.database.load_file(str(test_dbc)).get_message_by_name("VCU_Drive")
            feeder.send(can.Message(arbitration_id=msg.frame_id, data=msg.encode(
                {"Speed": 12.0, "Gear": 3, "Ready": 1}), is_extended_id=False))
        time.sleep(2.0)
        agent._stop_requested.set()
        time.sleep(0.5)
        release.set()

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    threads = [threading.Thread(target=f, daemon=True) for f in (listen, drive)]
    for t in threads:
        t.start()
    try:
        assert agent.run_forever() == 0
    finally:
        release.set()
        done.set()
        for s, h in handlers.items():
            signal.signal(s, h)
        for t in threads:
            t.join(3)
        sock.close()
    kinds = [m.split(b"\n")[0] for _, m in received]
    assert kinds[0] == b"READY=1" and kinds[-1] == b"STOPPING=1", kinds
    assert stalled_at, "the sink was never called"
    pings = [t for t, m in received if m.startswith(b"WATCHDOG=1")]
    healthy = [t for t in pings if t < stalled_at[0]]
    assert len(healthy) >= 3  # pings flowed while the loop ran
    late = [t for t in pings if t > stalled_at[0] + 0.5]
    assert late == [], f"{len(late)} WATCHDOG=1 sent while the core thread was stuck"
