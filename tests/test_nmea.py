"""NMEA 0183 GGA/RMC parsing on real-format sentences; the reader on hostile byte streams."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import nmea
from agent.core.nmea import (
    Gga,
    NmeaError,
    NmeaReader,
    Rmc,
    location_values,
    parse_sentence,
)
from agent.sim.gnss import Route, corrupt, fix_sentences

GGA = "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47"
RMC = "$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A"
# Widely published receiver output (Dublin; u-blox NMEA 4.1 with talker GN; Vancouver)
GGA_DUBLIN = "$GPGGA,092750.000,5321.6802,N,00630.3372,W,1,8,1.03,61.7,M,55.2,M,,*76"
RMC_DUBLIN = "$GPRMC,092750.000,A,5321.6802,N,00630.3372,W,0.02,31.66,280511,,,A*43"
GNGGA = "$GNGGA,001043.00,4404.14036,N,12118.85961,W,1,12,0.98,1113.0,M,-21.3,M,,*47"
RMC_VANCOUVER = "$GPRMC,225446,A,4916.45,N,12311.12,W,000.5,054.7,191194,020.3,E*68"


def test_gga_reference_sentence():
    g = parse_sentence(GGA)
    assert isinstance(g, Gga) and g.talker == "GP"
    assert g.latitude == pytest.approx(48 + 7.038 / 60)
    assert g.longitude == pytest.approx(11 + 31.0 / 60)
    assert (g.quality, g.satellites, g.hdop, g.altitude_m) == (1, 8, 0.9, 545.4)


def test_rmc_reference_sentence():
    r = parse_sentence(RMC)
    assert isinstance(r, Rmc) and r.valid
    assert r.timestamp == datetime(1994, 3, 23, 12, 35, 19, tzinfo=UTC)
    assert r.speed_kmh == pytest.approx(22.4 * 1.852, abs=1e-3)
    assert r.heading_deg == 84.4
    assert location_values(r) == {
        "Vehicle.CurrentLocation.Timestamp": "1994-03-23T12:35:19Z",
        "Vehicle.CurrentLocation.Latitude": pytest.approx(48.1173),
        "Vehicle.CurrentLocation.Longitude": pytest.approx(11.5166667),
        "Vehicle.CurrentLocation.Speed": pytest.approx(41.485, abs=1e-3),
        "Vehicle.CurrentLocation.Heading": 84.4}


def test_southern_and_western_hemispheres_are_negative():
    g = parse_sentence(GGA_DUBLIN)
    assert g.latitude == pytest.approx(53.3613367) and g.longitude == pytest.approx(-6.50562)
    r = parse_sentence(RMC_DUBLIN)
    assert r.timestamp == datetime(2011, 5, 28, 9, 27, 50, tzinfo=UTC)
    assert parse_sentence(GNGGA).longitude == pytest.approx(-121.3143268)
    assert parse_sentence(GNGGA).talker == "GN"
    v = parse_sentence(RMC_VANCOUVER)
    assert (v.latitude, v.longitude) == (pytest.approx(49.2741667), pytest.approx(-123.1853333))
    south = nmea_line("GPGGA,000000,3352.000,S,15112.000,E,1,05,1.2,10.0,M,,M,,")
    assert parse_sentence(south).latitude == pytest.approx(-33.8666667)


def nmea_line(body: str) -> str:
    return f"${body}*{nmea.checksum(body):02X}"


@pytest.mark.parametrize("line", [
    RMC[:-2] + "6B",  # one bit off
    GGA[:-2] + "00",
    RMC.replace("4807.038", "4807.039"),  # a corrupted digit, checksum unchanged
    GGA[:-3],  # no checksum at all
    GGA[:-2] + "ZZ",
])
def test_bad_checksums_are_rejected(line):
    with pytest.raises(NmeaError) as e:
        parse_sentence(line)
    assert e.value.reason == "checksum"


@pytest.mark.parametrize("body", [
    "GPGGA,123519,48x7.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,",  # bad digit
    "GPGGA,123519,4807.038,Q,01131.000,E,1,08,0.9,545.4,M,46.9,M,,",  # bad hemisphere
    "GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M",  # too few fields
    "GPGGA,123519,,,,,1,08,0.9,545.4,M,46.9,M,,",  # quality 1 without position
    "GPGGA,126519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,",  # minute 65
    "GPGGA,123519,4867.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,",  # 67 minutes
    "GPRMC,123519,X,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W",  # status X
    "GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,231394,003.1,W",  # month 13
    "GPRMC,123519,A,4807.038,N,01131.000,E,022.4,400.0,230394,003.1,W",  # course 400
    "GP,123519",  # address field
])
def test_malformed_fields_are_format_errors(body):
    with pytest.raises(NmeaError) as e:
        parse_sentence(nmea_line(body))
    assert e.value.reason == "format"


def test_unsupported_sentence():
    with pytest.raises(NmeaError) as e:
        parse_sentence("$GPGSV,3,1,11,10,63,137,17,07,61,098,15,05,59,290,20,08,54,157,30*70")
    assert e.value.reason == "unsupported"


def test_no_fix_invents_no_position():
    gga = parse_sentence(nmea_line("GPGGA,123520,,,,,0,00,99.9,,M,,M,,"))
    assert gga.quality == 0 and gga.latitude is None
    assert location_values(gga) == {"Vehicle.CurrentLocation.FixQuality": 0,
                                    "Vehicle.CurrentLocation.Satellites": 0}
    rmc = parse_sentence(nmea_line("GPRMC,123520,V,,,,,,,230394,,,N"))
    assert not rmc.valid
    assert location_values(rmc) == {"Vehicle.CurrentLocation.Timestamp": "1994-03-23T12:35:20Z"}
    stale = parse_sentence(nmea_line(  # status A but mode N (NMEA 2.3): not valid
        "GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W,N"))
    assert not stale.valid and "Vehicle.CurrentLocation.Latitude" not in location_values(stale)


def test_reader_frames_chunks_and_counts_what_it_drops():
    reader = NmeaReader()
    stream = (b"\xff\xfe\x00garbage\r\n" + GGA.encode() + b"\r\n" + RMC[:-2].encode() + b"00\r\n"
              + b"$GPGGA,1235" + b"\r\n"  # a sentence cut short by a glitch
              + b"noise$" + RMC.encode()[1:] + b"\r\n"  # a sentence glued to noise
              + b"$GPGSV,3,1,11,10,63,137,17,07,61,098,15,05,59,290,20,08,54,157,30*70\r\n")
    got = []
    for i in range(0, len(stream), 7):
        got += reader.feed(stream[i:i + 7])
    assert [type(s) for s in got] == [Gga, Rmc]
    assert got[1].heading_deg == 84.4
    # the wrong checksum, and the cut sentence (it lost its checksum)
    assert (reader.sentences, reader.bad_checksums, reader.unsupported) == (2, 2, 1)
    assert reader.garbage_lines == 2  # the binary line, the noise glued before a sentence


def test_reader_bounds_a_stream_without_line_ends():
    reader = NmeaReader()
    assert reader.feed(b"\x55" * 10_000) == []
    assert reader.garbage_lines >= 1
    assert reader.feed(b"\r\n" + GGA.encode() + b"\r\n")[0].satellites == 8


@settings(max_examples=300)
@given(st.binary(max_size=2000))
def test_random_bytes_never_raise(data):
    NmeaReader().feed(data)


@given(lat=st.floats(-89.99, 89.99), lon=st.floats(-179.99, 179.99),
       speed=st.floats(0, 250), heading=st.floats(0, 359.9))
def test_emulator_sentences_round_trip(lat, lon, speed, heading):
    when = datetime(2026, 11, 25, 6, 30, 15, 250000, tzinfo=UTC)
    gga, rmc = (parse_sentence(s) for s in fix_sentences(when, lat, lon, speed_kmh=speed,
                                                         heading_deg=heading))
    for s in (gga, rmc):  # 4 decimals of a minute: within 1e-6 degree
        assert s.latitude == pytest.approx(lat, abs=1e-6)
        assert s.longitude == pytest.approx(lon, abs=1e-6)
    assert rmc.speed_kmh == pytest.approx(speed, abs=0.02)
    assert rmc.heading_deg == pytest.approx(heading, abs=0.051)
    assert rmc.timestamp == when


@pytest.mark.parametrize("fix", [True, False])
def test_emulator_corruption_changes_data_and_keeps_the_checksum(fix):
    when = datetime(2026, 11, 25, 6, 30, 15, tzinfo=UTC)
    for good in fix_sentences(when, 48.1, 11.5, fix=fix):
        bad = corrupt(good)
        assert bad != good and bad[-5:] == good[-5:]  # "*hh\r\n" as sent
        with pytest.raises(NmeaError) as e:
            parse_sentence(bad)
        assert e.value.reason == "checksum"
    if fix:
        assert ",5806.0000,N," in corrupt(fix_sentences(when, 48.1, 11.5)[0])


def test_route_interpolates_and_stops_at_the_end():
    route = Route([(48.0, 11.0), (48.0, 11.1), (48.1, 11.1)])
    lat, lon, heading = route.position(route.legs[0] / 2)
    assert (lat, lon) == (pytest.approx(48.0), pytest.approx(11.05))
    assert heading == pytest.approx(90, abs=0.1)
    lat, lon, heading = route.position(route.legs[0] + route.legs[1] / 2)
    assert (lat, lon) == (pytest.approx(48.05), pytest.approx(11.1))
    assert heading == pytest.approx(0, abs=0.1)
    assert route.position(1e9)[:2] == (48.1, 11.1)
    assert route.legs[0] == pytest.approx(7440, rel=0.01)  # 0.1 degree of longitude at 48 N
