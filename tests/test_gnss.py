"""The GNSS adapter through pyserial and a real pseudo-terminal, against the NMEA emulator."""

from __future__ import annotations

import threading
import time

import pytest

from support.wait import wait_until
from agent.adapters.gnss import GnssReader
from agent.config import GnssConfig
from agent.sim.gnss import SimulatedGnss

L = "Vehicle.CurrentLocation."
ROUTE = [(48.1000, 11.5000), (48.1000, 11.6000)]  # due east, 7.4 km


class Sink:
    def __init__(self):
        self.calls: list[dict] = []
        self.lock = threading.Lock()

    def __call__(self, t, values):
        assert abs(t - time.time()) < 5  # agent clock at reception
        with self.lock:
            self.calls.append(dict(values))

    def all(self, name) -> list:
        with self.lock:
            return [v[name] for v in self.calls if name in v]

    def count(self) -> int:
        with self.lock:
            return len(self.calls)


@pytest.fixture
def rig(tmp_path):
    made = []

    def make(silent_s=5.0, **kw):
        gnss = SimulatedGnss(ROUTE, link=tmp_path / "ttyGNSS", rate_hz=kw.pop("rate_hz", 10),
                             **kw).start()
        sink = Sink()
        svc = GnssReader(GnssConfig(port=gnss.path), sink, backoff_s=0.05, silent_s=silent_s)
        made.append((gnss, svc))
        svc.start()
        return gnss, svc, sink

    yield make
    for gnss, svc in made:
        svc.stop()
        gnss.stop()


def test_position_speed_heading_along_the_route(rig):
    _gnss, svc, sink = rig(speed_kmh=72.0)
    wait_until(lambda: len(sink.all(L + "Speed")) >= 5, what="RMC values")
    lats, lons = sink.all(L + "Latitude"), sink.all(L + "Longitude")
    assert all(lat == pytest.approx(48.1, abs=1e-5) for lat in lats)
    assert all(11.5 <= lon < 11.51 for lon in lons)
    assert lons[-1] > lons[0]  # moving east
    assert sink.all(L + "Speed")[-1] == pytest.approx(72.0, abs=0.05)
    assert sink.all(L + "Heading")[-1] == pytest.approx(90.0, abs=0.2)
    assert sink.all(L + "FixQuality")[-1] == 1 and sink.all(L + "Satellites")[-1] == 9
    assert sink.all(L + "Altitude")[-1] == 520.0
    assert sink.all(L + "Timestamp")[-1].endswith("Z")
    s = svc.status()
    assert s["state"] == "open" and s["bad_checksums"] == 0 and s["garbage_lines"] == 0


def test_bad_checksums_are_counted_and_dropped(rig):
    gnss, svc, sink = rig()
    sent = gnss.sentences_sent
    gnss.corrupt_every = 3  # latitude 48.1 sent as 58.1, the checksum left as it was
    wait_until(lambda: gnss.sentences_sent >= sent + 18, what="sentences sent")
    time.sleep(0.1)  # the last ones read
    lats = sink.all(L + "Latitude")
    assert not any(abs(lat - 58.1) < 0.01 for lat in lats)  # the corrupted position
    assert all(lat == pytest.approx(48.1, abs=1e-5) for lat in lats)
    assert svc.status()["bad_checksums"] >= 5 and svc.status()["sentences"] >= 8


def test_garbage_and_cut_sentences_never_stop_the_reader(rig):
    gnss, svc, sink = rig()
    wait_until(lambda: sink.count() >= 2)
    gnss.inject(b"\xff\xfe\x00\x13garbage\r\n$GPGGA,12")  # noise, then a sentence cut short
    gnss.inject(b"\x55" * 500)  # a run without line ends
    wait_until(lambda: svc.status()["garbage_lines"] >= 2, what="garbage counted")
    n = sink.count()
    wait_until(lambda: sink.count() >= n + 4, what="values keep flowing")
    assert svc.status()["state"] == "open"


def test_lost_fix_reports_quality_0_and_no_position(rig):
    gnss, _svc, sink = rig()
    wait_until(lambda: 1 in sink.all(L + "FixQuality"))
    gnss.fix = False
    wait_until(lambda: sink.all(L + "FixQuality")[-1] == 0, what="fix lost")
    with sink.lock:
        tail = sink.calls[-2:]
    assert all(L + "Latitude" not in v for v in tail)


def test_unplug_and_replug_reopens(rig):
    gnss, svc, sink = rig()
    wait_until(lambda: sink.count() >= 2)
    gnss.unplug()
    wait_until(lambda: svc.status()["state"] == "down", what="down")
    wait_until(lambda: svc.status()["port_errors"] >= 2, what="reopen attempts")
    gnss.replug()
    n = sink.count()
    wait_until(lambda: sink.count() >= n + 4, what="values after replug")
    s = svc.status()
    assert s["state"] == "open" and s["reopens"] == 1 and s["opens"] == 2


def test_port_that_opens_but_cannot_be_read_is_retried_with_backoff(rig):
    gnss, svc, sink = rig()
    wait_until(lambda: sink.count() >= 2)
    gnss.rate_hz = 0.5  # no data arrives on the short-lived ptys below
    stop = threading.Event()

    def flap():  # the path always opens, then that pty's other end closes: the read fails
        while not stop.is_set():
            gnss.replug()
            time.sleep(0.01)

    flapper = threading.Thread(target=flap)
    before = svc.status()["opens"]
    flapper.start()
    time.sleep(1.0)
    stop.set()
    flapper.join()
    opens = svc.status()["opens"] - before
    assert 1 <= opens <= 8, opens  # backoff 0.05, 0.1, 0.2, 0.4 s...; a spin makes ~100
    assert "no data" in svc.status()["last_error"] or "No such file" in svc.status()["last_error"]
    gnss.rate_hz = 10
    n = sink.count()
    wait_until(lambda: sink.count() >= n + 4, timeout=8, what="values once the port is stable")
    assert svc.status()["state"] == "open"


def test_status_shows_the_last_fix(rig):
    _gnss, svc, sink = rig()
    wait_until(lambda: len(sink.all(L + "Speed")) >= 2)
    values = svc.status()["values"]
    assert values[L + "Latitude"] == pytest.approx(48.1, abs=1e-5)
    assert 11.5 <= values[L + "Longitude"] < 11.51
    assert values[L + "FixQuality"] == 1 and values[L + "Speed"] == pytest.approx(50.0, abs=0.05)


def test_silent_receiver_is_reported_and_recovers(rig):
    gnss, svc, sink = rig(silent_s=0.5)
    wait_until(lambda: sink.count() >= 2)
    assert svc.status()["state"] == "open"
    gnss.rate_hz = 0.25  # one epoch every 4 s
    wait_until(lambda: svc.status()["state"] == "silent", timeout=5, what="silent")
    gnss.rate_hz = 10
    wait_until(lambda: svc.status()["state"] == "open", timeout=6, what="talking again")
