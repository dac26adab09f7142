"""Run-time selection outside the core: the bus reader's receive filters replaced while
open, and the status lines of `tcu-agent status`."""

from __future__ import annotations

import time
import uuid

import can

from agent.adapters.canbus import BusReader, receive_filters
from agent.cli.status import render
from agent.config import BusConfig


def test_receive_filters_are_replaced_at_run_time(tmp_path):
    channel = f"sel-{uuid.uuid4().hex}"
    got: list[int] = []
    cfg = BusConfig(name="pt", interface="virtual", channel=channel, dbc=(tmp_path / "x.dbc",))
    reader = BusReader(0, cfg, lambda frames: got.extend(f[2] for f in frames),
                       receive_filters([0x100]))
    reader.start()
    sender = can.Bus(interface="virtual", channel=channel)
    try:
        assert reader.wait_open(5)

        def send_both_and_wait(expect):
            got.clear()
            for can_id in (0x100, 0x200, 0x100):
                sender.send(can.Message(arbitration_id=can_id, data=b"\x01",
                                        is_extended_id=False))
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and got.count(0x100) < 2:
                time.sleep(0.01)
            time.sleep(0.1)
            assert sorted(set(got)) == expect

        send_both_and_wait([0x100])
        reader.set_filters(receive_filters([0x100, 0x200]))  # a campaign needs 0x200
        send_both_and_wait([0x100, 0x200])
        reader.set_filters(receive_filters([0x100]))  # and no longer
        send_both_and_wait([0x100])
        assert reader.filters == receive_filters([0x100])  # kept for a reopen
    finally:
        sender.shutdown()
        reader.stop()


def test_status_lists_campaigns():
    status = {"pid": 1, "vin": "V", "started_ms": 0, "buses": [],
              "campaign": {"campaigns": [
                  {"id": "charge-start-capture", "version": 2, "state": "active",
                   "kind": "condition", "priority": 1, "firings": 3, "batches": 7,
                   "held_bytes": 12800, "ring_overflow": 0, "capturing": False},
                  {"id": "later", "version": 1, "state": "waiting", "kind": "time",
                   "priority": 5, "firings": 0, "batches": 0, "held_bytes": 0}]},
              "outbox_campaigns": {"charge-start-capture": 4096}}
    text = render(status)
    assert "campaigns 2 applied" in text
    assert ("  charge-start-capture v2 active condition, priority 1, firings 3, batches 7, "
            "held 12,800 bytes in buffers, 4,096 in the outbox") in text
    assert "  later v1 waiting time" in text
