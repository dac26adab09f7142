"""AT answers (3GPP TS 27.007 transcripts) through the sans-I/O parsers and channel."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import at
from agent.core.at import AtChannel, AtResult, Garbage, Urc


def events(channel: AtChannel) -> list:
    out = []
    while (e := channel.next_event()) is not at.NEED_DATA:
        out.append(e)
    return out


# -- parsers ------------------------------------------------------------------------------

@pytest.mark.parametrize("line, dbm", [("+CSQ: 21,99", -71), ("+CSQ: 0,99", -113),
                                       ("+CSQ: 31,0", -51), ("+CSQ: 1,3", -111),
                                       ("+CSQ: 99,99", None), ("+CSQ: 115,99", None)])
def test_csq_to_dbm(line, dbm):
    assert at.parse_csq([line]) == dbm


@pytest.mark.parametrize("lines", [["+CSQ: x,99"], ["+CSQ: 21"], ["+CREG: 0,1"], []])
def test_csq_malformed(lines):
    with pytest.raises(at.AtParseError):
        at.parse_csq(lines)


@pytest.mark.parametrize("line, state, stat, area, cell, act", [
    ('+CEREG: 2,5,"1A2B","01C2D3E4",7', "roaming", 5, "1A2B", "01C2D3E4", "LTE"),
    ("+CEREG: 0,1", "home", 1, None, None, None),
    ("+CREG: 0,1", "home", 1, None, None, None),
    ("+CREG: 0,2", "searching", 2, None, None, None),
    ("+CEREG: 0,3", "denied", 3, None, None, None),
    ("+CEREG: 0,0", "not_registered", 0, None, None, None),
    ("+CEREG: 0,4", "unknown", 4, None, None, None),
    ('+CREG: 2,1,"00C3","0000A13F",0', "home", 1, "00C3", "0000A13F", "GSM"),
    ("+CEREG: 5", "roaming", 5, None, None, None),  # URC, n=1
    ('+CEREG: 1,"1A2B","01C2D3E4",7', "home", 1, "1A2B", "01C2D3E4", "LTE"),  # URC, n=2
    ('+CEREG: 2,1,"1A2B","01C2D3E4",9', "home", 1, "1A2B", "01C2D3E4", "NB-IoT"),
])
def test_registration(line, state, stat, area, cell, act):
    assert at.parse_registration(line) == at.Registration(state, stat, area, cell, act)


def test_registration_malformed():
    for line in ("+CSQ: 1,2", "+CEREG:", "+CEREG: x,y"):
        with pytest.raises(at.AtParseError):
            at.parse_registration(line)


def test_combine_registration_prefers_registered():
    eps_searching = at.parse_registration("+CEREG: 0,2")
    cs_home = at.parse_registration("+CREG: 0,1")
    assert at.combine_registration(eps_searching, cs_home).state == "home"
    eps_roaming = at.parse_registration('+CEREG: 2,5,"1A2B","01C2D3E4",7')
    assert at.combine_registration(eps_roaming, at.parse_registration("+CREG: 0,0")) == eps_roaming
    assert at.combine_registration(None, eps_searching) == eps_searching
    assert at.combine_registration(None, None) is None


@pytest.mark.parametrize("line, op", [
    ('+COPS: 0,0,"Vodafone DE",7', at.Operator(0, "Vodafone DE", "LTE")),
    ('+COPS: 0,2,"26202",7', at.Operator(0, "26202", "LTE")),
    ('+COPS: 1,0,"T-Mobile, DE",2', at.Operator(1, "T-Mobile, DE", "UMTS")),
    ('+COPS: 0,0,"CHN-UNICOM"', at.Operator(0, "CHN-UNICOM", None)),
    ("+COPS: 0", at.Operator(0, None, None)),
    ("+COPS: 2", at.Operator(2, None, None)),
])
def test_cops(line, op):
    assert at.parse_cops([line]) == op


def test_identity_parsers():
    assert at.parse_imei(["862636050123453"]) == "862636050123453"
    assert at.parse_imei(['+CGSN: "867698041234563"']) == "867698041234563"
    assert at.parse_iccid(["89490200001234567890"]) == "89490200001234567890"
    assert at.parse_iccid(["+CCID: 89490200001234567890"]) == "89490200001234567890"
    assert at.parse_iccid(["+QCCID: 8944500102198304826F"]) == "8944500102198304826"
    assert at.parse_iccid(["+ICCID: 8986007009076019125"]) == "8986007009076019125"
    assert at.parse_model(["SIMCOM_SIM7600E-H"]) == "SIMCOM_SIM7600E-H"
    assert at.parse_model(["+CGMM: EC25"]) == "EC25"
    for bad in (["12345"], ["IMEI?"], []):
        with pytest.raises(at.AtParseError):
            at.parse_imei(bad)
    for bad in (["8949XYZ"], ["123"]):
        with pytest.raises(at.AtParseError):
            at.parse_iccid(bad)


def test_identity_is_validated_and_the_line_before_ok_preferred():
    # printable remnants of a cut line before (or after) the real answer
    assert at.parse_model(["0,99", "EC25"]) == "EC25"
    assert at.parse_model(["M7600E-H", "EC25"]) == "EC25"  # the line just before OK
    assert at.parse_model(["Quectel EC25", "0,99"]) == "Quectel EC25"
    assert at.parse_imei(["0,99", "867698041234563"]) == "867698041234563"
    assert at.parse_imei(["867698041234563", "99"]) == "867698041234563"
    assert at.parse_iccid(["0,99", "+QCCID: 8944500102198304826F"]) == "8944500102198304826"
    for bad in (["0,99"], ["12345"], ["+CSQ: 21,99"], ['"Vodafone, DE"'], ["EC25!"]):
        with pytest.raises(at.AtParseError):
            at.parse_model(bad)
    for bad in (["86769804123456"], ["8676980412345631"], ["89490200001234567890"]):
        with pytest.raises(at.AtParseError):
            at.parse_imei(bad)
    for bad in (["89490200001234567"], ["8949020000123456789012F3"], ["867698041234563"]):
        with pytest.raises(at.AtParseError):
            at.parse_iccid(bad)


def test_cut_off_line_does_not_become_the_model():
    ch = AtChannel()
    ch.begin("AT+CGMM")
    ch.receive_data(b"\r\n0,99\r\nEC25\r\n\r\nOK\r\n")
    (result,) = events(ch)
    assert at.parse_model(result.lines) == "EC25"


# -- the channel --------------------------------------------------------------------------

def test_echo_is_dropped_and_ok_completes():
    ch = AtChannel()
    assert ch.begin("ATE0") == b"ATE0\r"
    for b in b"ATE0\r\r\nOK\r\n":  # one byte at a time, echo still on
        ch.receive_data(bytes([b]))
    assert events(ch) == [AtResult(command="ATE0", lines=(), final="OK")]
    assert not ch.busy


def test_info_lines_and_urcs_are_separated():
    ch = AtChannel()
    ch.begin("AT+CEREG?")
    ch.receive_data(b"\r\n+CEREG: 5\r\n\r\nRING\r\n\r\n+CEREG: 2,5,\"1A2B\",\"01C2D3E4\",7\r\n"
                    b"\r\n+CEREG: 1,\"1A2B\",\"01C2D3E4\",7\r\n\r\nOK\r\n")
    assert events(ch) == [
        Urc("+CEREG: 5"), Urc("RING"), Urc('+CEREG: 1,"1A2B","01C2D3E4",7'),
        AtResult(command="AT+CEREG?", lines=('+CEREG: 2,5,"1A2B","01C2D3E4",7',), final="OK")]


def test_urc_with_nothing_in_flight():
    ch = AtChannel()
    ch.receive_data(b"\r\n+CEREG: 5\r\n\r\nRING\r\n")
    assert events(ch) == [Urc("+CEREG: 5"), Urc("RING")]


@pytest.mark.parametrize("answer, final, error", [
    (b"\r\n+CME ERROR: 10\r\n", "+CME ERROR", "10"),
    (b"\r\n+CME ERROR: SIM not inserted\r\n", "+CME ERROR", "SIM not inserted"),
    (b"\r\nERROR\r\n", "ERROR", None),
    (b"\r\n+CMS ERROR: 500\r\n", "+CMS ERROR", "500"),
])
def test_error_results(answer, final, error):
    ch = AtChannel()
    ch.begin("AT+CCID")
    ch.receive_data(answer)
    (result,) = events(ch)
    assert (result.final, result.error, result.ok) == (final, error, False)


def test_garbage_is_set_aside():
    ch = AtChannel()
    ch.begin("AT+CSQ")
    ch.receive_data(b"\xff\x00~\x8f\r\n%%junk%%\r\n+CSQ: 21,99\r\nOK\r\n")
    evs = events(ch)
    assert [type(e) for e in evs] == [Garbage, Garbage, AtResult]
    assert at.parse_csq(evs[-1].lines) == -71


def test_endless_line_becomes_garbage_not_memory():
    ch = AtChannel()
    ch.receive_data(b"x" * (at.MAX_LINE + 10))
    assert isinstance(ch.next_event(), Garbage)
    ch.begin("AT")
    ch.receive_data(b"\r\nOK\r\n")
    assert events(ch)[-1].ok


def test_bare_answers_collect_every_line():
    ch = AtChannel()
    ch.begin("AT+CGMM")
    ch.receive_data(b"\r\nSIMCOM_SIM7600E-H\r\n\r\nOK\r\n")
    assert events(ch)[0].lines == ("SIMCOM_SIM7600E-H",)


def test_late_answer_is_not_taken_for_the_next_command():
    ch = AtChannel()
    ch.begin("AT+CSQ")
    ch.abandon(now=100.0, grace_s=1.0)
    assert ch.stale and not ch.busy and not ch.settle(100.5)
    ch.receive_data(b"\r\n+CSQ: 21,99\r\n\r\nOK\r\n")
    (late,) = events(ch)
    assert late.late and late.command == "AT+CSQ" and late.lines == ("+CSQ: 21,99",)
    assert ch.settle(100.6)
    ch.begin("AT+COPS?")
    ch.receive_data(b'\r\n+COPS: 0,0,"Vodafone DE",7\r\n\r\nOK\r\n')
    (result,) = events(ch)
    assert not result.late and at.parse_cops(result.lines).name == "Vodafone DE"


@pytest.mark.parametrize("command, info", [
    ("AT+CSQ", b"+CSQ: 21,99"), ("AT+CEREG?", b"+CEREG: 2,1"), ("AT+CREG?", b"+CREG: 0,1"),
    ("AT+COPS?", b"+COPS: 0"), ("AT+CCID", b"89490200001234567890"),
    ("AT+QCCID", b"+QCCID: 89490200001234567890")])
def test_ok_without_the_information_line_is_not_the_answer(command, info):
    ch = AtChannel()
    ch.begin(command)
    ch.receive_data(b"\r\nOK\r\n")  # an earlier command's answer, arriving late
    (stray,) = events(ch)
    assert stray.late and ch.busy  # reported, and the real answer still awaited
    ch.receive_data(b"\r\n" + info + b"\r\n\r\nOK\r\n")
    (result,) = events(ch)
    assert result.ok and not result.late and result.lines == (info.decode(),)
    assert not ch.busy


def test_ok_alone_still_answers_other_commands():
    ch = AtChannel()
    for command in ("ATE0", "AT+CMEE=1", "AT+CEREG=2", "AT"):
        ch.begin(command)
        ch.receive_data(b"\r\nOK\r\n")
        assert events(ch) == [AtResult(command=command, lines=(), final="OK")]


def test_abandoned_command_is_forgotten_after_grace():
    ch = AtChannel()
    ch.begin("AT+CSQ")
    ch.abandon(now=0.0, grace_s=1.0)
    assert ch.settle(1.0)
    ch.receive_data(b"\r\nOK\r\n")  # far too late: nothing to attach it to
    assert not any(isinstance(e, AtResult) for e in events(ch))


def test_begin_rejects_busy_and_multi_line():
    ch = AtChannel()
    ch.begin("AT+CSQ")
    with pytest.raises(RuntimeError):
        ch.begin("AT+COPS?")
    with pytest.raises(ValueError):
        AtChannel().begin("AT+CSQ\rAT+COPS?")
    with pytest.raises(ValueError):
        AtChannel().begin("+CSQ")


TRANSCRIPT = (b"AT+CSQ\r\r\n+CSQ: 21,99\r\n\r\nRING\r\n\xfe\xff\r\n\r\nOK\r\n")


@given(st.lists(st.integers(min_value=1, max_value=len(TRANSCRIPT)), max_size=12))
def test_any_chunking_gives_the_same_events(cuts):
    whole = AtChannel()
    whole.begin("AT+CSQ")
    whole.receive_data(TRANSCRIPT)
    expected = events(whole)
    ch = AtChannel()
    ch.begin("AT+CSQ")
    last = 0
    for cut in sorted(set(cuts)) + [len(TRANSCRIPT)]:
        ch.receive_data(TRANSCRIPT[last:cut])
        last = cut
    assert events(ch) == expected
    assert [type(e) for e in expected] == [Urc, Garbage, AtResult]


@settings(max_examples=200)
@given(st.binary(max_size=3000))
def test_random_bytes_never_raise(data):
    ch = AtChannel()
    ch.begin("AT+CSQ")
    ch.receive_data(data)
    evs = events(ch)
    for e in evs:
        if isinstance(e, AtResult):  # parsers raise only their own error on what got through
            try:
                at.parse_csq(e.lines)
            except at.AtParseError:
                pass
