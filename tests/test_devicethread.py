"""DeviceThread's loop (open, back off, reopen, state, counting, log-once, stop), driven by a
scripted device: a real subclass whose _open/_read_once follow a script the test changes."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from support.wait import wait_until
from agent.adapters.devicethread import DeviceThread, Stopped, Unresponsive


class Scripted(DeviceThread):
    """`open_fault` / `read_fault`: an exception to raise (None: succeed); `works`: what a
    read returns. Every call is recorded with its monotonic time."""

    thread_name = "scripted"
    faults = (OSError,)
    log = logging.getLogger("test.devicethread")

    def __init__(self, **kw):
        super().__init__("dev", "/dev/scripted", **kw)
        self.open_fault: Exception | None = None
        self.read_fault: Exception | None = None
        self.works = True
        self.block = False  # a read that blocks until stop (then raises Stopped)
        self.calls: list[tuple[str, float]] = []
        self.is_open = False
        self.lock = threading.Lock()

    def _record(self, what):
        with self.lock:
            self.calls.append((what, time.monotonic()))

    def count(self, what) -> int:
        with self.lock:
            return sum(1 for c, _ in self.calls if c == what)

    def times(self, what) -> list[float]:
        with self.lock:
            return [t for c, t in self.calls if c == what]

    def _open(self):
        self._record("open")
        if self.open_fault is not None:
            raise self.open_fault
        self.is_open = True

    def _read_once(self):
        self._record("read")
        assert self.is_open
        if self.block:
            self._stop.wait()
            raise Stopped
        if self.read_fault is not None:
            raise self.read_fault
        time.sleep(0.002)
        return self.works

    def _close(self):
        self._record("close")
        self.is_open = False


@pytest.fixture
def device():
    made = []

    def make(**kw):
        d = Scripted(**{"backoff_s": 0.02, "backoff_cap_s": 0.16, **kw})
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop()


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "test.devicethread" and r.levelno == logging.WARNING]


def test_open_failures_back_off_exponentially_up_to_the_cap(device, caplog):
    caplog.set_level(logging.INFO, logger="test.devicethread")
    d = device(backoff_s=0.01, backoff_cap_s=0.04)
    d.open_fault = OSError(2, "No such file or directory")
    assert d.state == "closed"
    d.start()
    wait_until(lambda: d.count("open") >= 8, what="eight attempts")
    gaps = [b - a for a, b in zip(d.times("open"), d.times("open")[1:])]
    # 0.01, 0.02, 0.04, then the cap (0.04) where doubling would reach 0.64 s
    assert gaps[0] >= 0.01 and gaps[1] >= 0.02 and min(gaps[2:]) >= 0.04, gaps
    assert max(gaps) < 0.5, gaps
    assert d.state == "down" and d.opens == 0 and d.errors >= 7
    assert d.last_error == "FileNotFoundError: [Errno 2] No such file or directory"
    assert warnings(caplog) == [
        "dev: open failed on /dev/scripted: FileNotFoundError: [Errno 2] No such file or "
        "directory"]  # once, not per retry
    d.open_fault = None
    wait_until(lambda: d.state == "open", what="open")
    assert d.opens == 1 and d.reopens == 1
    assert any("dev: reopened /dev/scripted" in r.getMessage() for r in caplog.records)


def test_read_fault_closes_reopens_and_logs_again_once_it_worked(device, caplog):
    caplog.set_level(logging.WARNING, logger="test.devicethread")
    d = device()
    d.start()
    assert d.wait_open(2) and d.opens == 1 and d.reopens == 0
    d.read_fault = OSError("Network is down")
    wait_until(lambda: d.count("close") >= 3, what="three read faults")
    assert d.state == "down" and d.errors >= 3
    # the read failed each time, never worked: the fault is logged once
    assert warnings(caplog) == ["dev: read failed on /dev/scripted: OSError: Network is down"]
    d.read_fault = None
    wait_until(lambda: d.state == "open" and d.count("read") > d.count("open") + 2,
               what="reads again")
    reopens = d.reopens
    assert reopens >= 3 and d.opens == reopens + 1
    d.read_fault = OSError("Network is down")  # the same fault after the device worked
    wait_until(lambda: len(warnings(caplog)) == 2, what="logged again")
    assert d.last_error == "OSError: Network is down"


def test_backoff_restarts_only_after_a_read_that_worked(device):
    d = device(backoff_s=0.02, backoff_cap_s=0.32)
    d.works = False  # opens, reads nothing, then fails: like a flapping USB port
    d.start()
    assert d.wait_open(2)
    d.read_fault = OSError("no data")
    wait_until(lambda: d.count("open") >= 5, what="five opens")
    opens = d.times("open")
    gaps = [b - a for a, b in zip(opens, opens[1:])]
    assert gaps[-1] >= 0.16 and gaps[-1] > 3 * gaps[0], gaps  # it kept doubling
    d.read_fault, d.works = None, True
    wait_until(lambda: d.count("read") > len(d.times("open")) + 3, what="working reads")
    n = d.count("open")
    d.read_fault = OSError("no data")
    wait_until(lambda: d.count("open") >= n + 2, what="two reopens")
    fresh = d.times("open")[n:]
    assert fresh[1] - fresh[0] < 0.16  # started from 0.02 s again, not from the cap


def test_unresponsive_is_its_own_state_and_not_an_io_error(device, caplog):
    caplog.set_level(logging.WARNING, logger="test.devicethread")
    d = device()
    d.open_fault = Unresponsive("no answer to AT")
    d.start()
    wait_until(lambda: d.count("open") >= 3, what="three attempts")
    assert d.state == "unresponsive" and d.errors == 0 and d.last_error == "no answer to AT"
    assert d.count("close") >= 2  # a failed open is closed too (it may have got halfway)
    assert warnings(caplog) == ["dev: open failed on /dev/scripted: no answer to AT"]
    assert not d.wait_open(0.05)


def test_stop_is_prompt_and_closes(device):
    d = device()
    d.block = True
    d.start()
    wait_until(lambda: d.count("read") == 1, what="blocking read")
    start = time.monotonic()
    d.stop()
    assert time.monotonic() - start < 0.5
    assert d.state == "closed" and not d._thread.is_alive() and not d.is_open
    d.block = False
    d.start()  # and it starts again
    assert d.wait_open(2)


def test_stop_during_backoff_is_prompt(device):
    d = device(backoff_s=5.0, backoff_cap_s=5.0)
    d.open_fault = OSError("gone")
    d.start()
    wait_until(lambda: d.state == "down", what="down")
    start = time.monotonic()
    d.stop()
    assert time.monotonic() - start < 0.5 and d.state == "closed"
