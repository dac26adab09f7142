"""AT command answers (3GPP TS 27.007 / V.250), sans-I/O: bytes in, events out.

`AtChannel` frames what a modem writes into lines and sorts them into the answer to the
command in flight, unsolicited result codes (URCs) and garbage, h11-style: the caller
writes the bytes `begin()` returns, feeds what it reads to `receive_data()` and pulls
events with `next_event()`. Time is passed in (`abandon(now)`), never read here.

The parse_* functions turn the information lines of one answer into values:
`parse_csq`, `parse_registration`, `parse_cops`, `parse_imei`, `parse_iccid`, `parse_model`.
They raise AtParseError (a ValueError) for an answer they cannot read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from agent.errors import AtParseError

NEED_DATA = None  # next_event() when no complete event is buffered
MAX_LINE = 1024  # longer runs without a line end are garbage (a modem line is < 600 chars)

# URCs this agent may see on its AT port. A line with one of these prefixes is set aside
# unless it is the answer the command in flight asked for (see _solicited).
URC_PREFIXES = ("RING", "NO CARRIER", "+CRING", "+CLIP", "+CMTI", "+CMT:", "+CDS", "+CBM",
                "+CREG:", "+CGREG:", "+CEREG:", "+C5GREG:", "+CPIN:", "+CUSD", "+CGEV",
                "+QIND", "+QIURC", "+CPSI", "RDY", "+CFUN:", "SMS DONE", "PB DONE",
                "+PACSP", "POWERED DOWN", "NORMAL POWER DOWN", "+QUSIM", "+CTZV", "*ATREADY")

REGISTRATION = {0: "not_registered", 1: "home", 2: "searching", 3: "denied", 4: "unknown",
                5: "roaming", 6: "home", 7: "roaming",  # 6/7: "SMS only", still registered
                8: "not_registered",  # attached for emergency bearer services only
                9: "home", 10: "roaming"}  # CSFB not preferred
_REG_RANK = {"home": 5, "roaming": 5, "searching": 3, "denied": 2, "not_registered": 1,
             "unknown": 0}
# Commands whose answer always carries an information line. A bare OK to one of them is an
# earlier command's answer (one that timed out, or was sent before the port was reopened).
INFO_COMMANDS = frozenset(("AT+CSQ", "AT+CEREG?", "AT+CREG?", "AT+CGREG?", "AT+COPS?",
                           "AT+CCID", "AT+QCCID", "AT+CICCID", "AT+CGMM", "AT+CGSN",
                           "AT+CPIN?"))
ACCESS_TECH = {0: "GSM", 1: "GSM", 2: "UMTS", 3: "EDGE", 4: "HSDPA", 5: "HSUPA", 6: "HSPA",
               7: "LTE", 8: "EC-GSM-IoT", 9: "NB-IoT", 10: "LTE", 11: "NR", 12: "NR",
               13: "LTE+NR"}


# -- events ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class AtResult:
    """The complete answer to one command: info lines and the final result code.

    `final` is "OK", "ERROR", "+CME ERROR" or "+CMS ERROR"; `error` holds the code or text
    after "+CME ERROR:" (e.g. "10" = SIM not inserted); `late` marks an answer that is not
    the awaited one: the answer to a command that had already timed out (its caller has moved
    on), or an OK without the information line an INFO_COMMANDS command always returns.
    """
    command: str
    lines: tuple[str, ...]
    final: str
    error: str | None = None
    late: bool = False

    @property
    def ok(self) -> bool:
        return self.final == "OK"

    def describe(self) -> str:
        return self.final + (f": {self.error}" if self.error is not None else "")


@dataclass(frozen=True, slots=True)
class Urc:
    """An unsolicited result code (e.g. "RING", "+CEREG: 5")."""
    line: str


@dataclass(frozen=True, slots=True)
class Garbage:
    """A line that is not text a modem sends (noise, a baud-rate mismatch, a cut line)."""
    data: bytes


@dataclass
class _Pending:
    command: str
    prefix: str | None  # "+CSQ:" for AT+CSQ; None for commands with bare answers (AT+CGMM)
    lines: list[str] = field(default_factory=list)
    late_until: float | None = None  # set once abandoned


# -- the channel ----------------------------------------------------------------------------

class AtChannel:
    """Sorts a modem's output into AtResult, Urc and Garbage events. One command at a time."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._events: list = []
        self._pending: _Pending | None = None
        self._stale: _Pending | None = None

    @property
    def busy(self) -> bool:
        """A command is in flight (its answer not yet complete)."""
        return self._pending is not None

    @property
    def stale(self) -> bool:
        """An abandoned command's answer may still arrive; wait (see settle) before the next."""
        return self._stale is not None

    def begin(self, command: str) -> bytes:
        """Start `command` ("AT+CSQ"); returns the bytes to write. Raises RuntimeError if busy."""
        command = command.strip()
        if self._pending is not None:
            raise RuntimeError(f"AT command {self._pending.command!r} still in flight")
        if not command.upper().startswith("AT") or any(c in command for c in "\r\n"):
            raise ValueError(f"not a single AT command: {command!r}")
        self._pending = _Pending(command, _answer_prefix(command))
        return command.encode("ascii", "replace") + b"\r"

    def abandon(self, now: float, grace_s: float) -> None:
        """The command in flight timed out. Its answer, if it comes within grace_s of `now`,
        is reported as a late AtResult instead of being taken for the next command's."""
        if self._pending is not None:
            self._pending.late_until = now + grace_s
            self._stale, self._pending = self._pending, None

    def settle(self, now: float) -> bool:
        """Forget an abandoned command once its grace is over. True when no longer stale."""
        if self._stale is not None and self._stale.late_until is not None \
                and now >= self._stale.late_until:
            self._stale = None
        return self._stale is None

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the port (any chunking: partial lines are buffered)."""
        self._buf += data
        while True:
            cut = _line_end(self._buf)
            if cut < 0:
                break
            line, self._buf = bytes(self._buf[:cut]), self._buf[cut + 1:]
            self._line(line)
        if len(self._buf) > MAX_LINE:  # no line end in sight: drop it rather than grow
            self._events.append(Garbage(bytes(self._buf)))
            self._buf.clear()

    def next_event(self):
        """The next AtResult, Urc or Garbage, or NEED_DATA."""
        return self._events.pop(0) if self._events else NEED_DATA

    # -- line sorting -----------------------------------------------------------------------

    def _line(self, raw: bytes) -> None:
        stripped = raw.strip(b" \t\0")
        if not stripped:
            return  # modems frame answers with empty lines ("\r\nOK\r\n")
        if any(b < 0x20 or b > 0x7E for b in stripped):
            self._events.append(Garbage(stripped))
            return
        line = stripped.decode("ascii")
        target = self._pending or self._stale
        if target is None:
            self._events.append(Urc(line) if _is_urc(line) else Garbage(stripped))
            return
        if line.upper() == target.command.upper():
            return  # our own command echoed (before ATE0 takes effect)
        final = _final(line)
        if final is not None:
            self._finish(target, *final)
        elif _solicited(line, target):
            target.lines.append(line)
        elif _is_urc(line):
            self._events.append(Urc(line))
        elif target.prefix is None:
            target.lines.append(line)  # bare answers: AT+CGMM, AT+CGSN, raw commands
        else:
            self._events.append(Garbage(stripped))

    def _finish(self, target: _Pending, final: str, error: str | None) -> None:
        if final == "OK" and not target.lines and target.command.upper() in INFO_COMMANDS:
            # Someone else's OK: report it as late and keep waiting for the real answer.
            self._events.append(AtResult(command=target.command, lines=(), final=final,
                                         late=True))
            return
        late = target is self._stale
        self._events.append(AtResult(command=target.command, lines=tuple(target.lines),
                                     final=final, error=error, late=late))
        if late:
            self._stale = None
        else:
            self._pending = None


def _line_end(buf: bytearray) -> int:
    r, n = buf.find(b"\r"), buf.find(b"\n")
    return min(i for i in (r, n) if i >= 0) if r >= 0 or n >= 0 else -1


def _answer_prefix(command: str) -> str | None:
    """"+CSQ:" for AT+CSQ / AT+CEREG? / AT+COPS=?; None for basic and bare-answer commands."""
    body = command[2:]
    if not body.startswith(("+", "$", "^", "*")):
        return None
    name = body.split("?")[0].split("=")[0].upper()
    if name in ("+CGMM", "+CGMI", "+CGMR", "+CGSN", "+CIMI", "+GSN", "+GMM", "+CCID"):
        return None  # many modems answer these without the "+NAME: " prefix
    return name + ":"


def _final(line: str) -> tuple[str, str | None] | None:
    upper = line.upper()
    if upper == "OK":
        return "OK", None
    if upper in ("ERROR", "NO CARRIER", "BUSY", "NO ANSWER", "NO DIALTONE"):
        return ("ERROR", None) if upper == "ERROR" else ("ERROR", upper)
    for kind in ("+CME ERROR", "+CMS ERROR"):
        if upper.startswith(kind + ":"):
            return kind, line[len(kind) + 1:].strip()
    return None


def _is_urc(line: str) -> bool:
    return line.upper().startswith(URC_PREFIXES)


def _solicited(line: str, target: _Pending) -> bool:
    """Whether a line is the answer the command in flight asked for.

    "+CEREG: 5" or "+CEREG: 5,"1A2B",..." arriving during AT+CEREG? is a URC: the read
    answer always starts "<n>,<stat>", two integers (TS 27.007 §10.1.22).
    """
    if target.prefix is None or not line.upper().startswith(target.prefix):
        return False
    if target.prefix in ("+CREG:", "+CGREG:", "+CEREG:", "+C5GREG:"):
        if not target.command.endswith("?"):
            return False
        fields = _fields(line[len(target.prefix):])
        return len(fields) >= 2 and fields[0].isdigit() and fields[1].isdigit()
    return True


# -- answer parsers -------------------------------------------------------------------------

def _fields(text: str) -> list[str]:
    """Split "0,0,\"Vodafone, DE\",7" on commas outside quotes; quotes kept."""
    out, cur, quoted = [], [], False
    for ch in text.strip():
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur).strip())
    return out


def _info(lines, prefix: str) -> str:
    for line in lines:
        if line.upper().startswith(prefix):
            return line[len(prefix):].strip()
    raise AtParseError(f"no {prefix} line in answer {list(lines)!r}")


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise AtParseError(f"{what}: not an integer: {text!r}") from None


def parse_csq(lines) -> int | None:
    """`+CSQ: <rssi>,<ber>` → signal strength in dBm (-113 + 2*rssi), None when unknown (99)."""
    fields = _fields(_info(lines, "+CSQ:"))
    if len(fields) != 2:
        raise AtParseError(f"+CSQ: expected <rssi>,<ber>, got {fields!r}")
    rssi = _int(fields[0], "+CSQ rssi")
    _int(fields[1], "+CSQ ber")
    if rssi == 99 or not 0 <= rssi <= 31:  # 99 = not known; 100..199 are TD-SCDMA levels
        return None
    return -113 + 2 * rssi


@dataclass(frozen=True, slots=True)
class Registration:
    """One +CREG/+CGREG/+CEREG report: state name, raw stat, area code, cell id, access tech."""
    state: str
    stat: int
    area: str | None = None  # LAC or TAC, hex as sent
    cell: str | None = None  # cell id, hex as sent
    act: str | None = None


def parse_registration(line: str) -> Registration:
    """A registration line, read answer (`+CEREG: 2,5,"1A2B","01C2D3E4",7`) or URC
    (`+CEREG: 5`, `+CEREG: 1,"1A2B","01C2D3E4",7`)."""
    head, _, rest = line.partition(":")
    if head.upper() not in ("+CREG", "+CGREG", "+CEREG", "+C5GREG") or not rest.strip():
        raise AtParseError(f"not a registration line: {line!r}")
    fields = _fields(rest)
    if len(fields) >= 2 and fields[0].isdigit() and fields[1].isdigit():
        fields = fields[1:]  # read answer: drop <n>
    stat = _int(fields[0], f"{head} stat")
    area = fields[1].strip('"') or None if len(fields) > 1 else None
    cell = fields[2].strip('"') or None if len(fields) > 2 else None
    act = ACCESS_TECH.get(int(fields[3])) if len(fields) > 3 and fields[3].isdigit() else None
    return Registration(REGISTRATION.get(stat, "unknown"), stat, area, cell, act)


def combine_registration(*regs: Registration | None) -> Registration | None:
    """The most useful of several reports (EPS first, then CS): registered beats searching."""
    best = None
    for reg in regs:
        if reg is not None and (best is None or _REG_RANK[reg.state] > _REG_RANK[best.state]):
            best = reg
    return best


@dataclass(frozen=True, slots=True)
class Operator:
    """+COPS? answer: mode, operator name (or MCC+MNC when numeric), access technology."""
    mode: int
    name: str | None
    act: str | None


def parse_cops(lines) -> Operator:
    """`+COPS: 0,0,"Vodafone DE",7` → Operator; `+COPS: 0` (not registered) → name None."""
    fields = _fields(_info(lines, "+COPS:"))
    mode = _int(fields[0], "+COPS mode")
    if len(fields) < 3:
        return Operator(mode, None, None)
    name = fields[2].strip('"').strip() or None
    act = ACCESS_TECH.get(_int(fields[3], "+COPS AcT")) if len(fields) > 3 and fields[3] else None
    return Operator(mode, name, act)


def _identity(lines, prefixes: tuple[str, ...], valid: re.Pattern, what: str) -> str:
    """The last line that is a valid `what`: the one just before OK. An earlier line may be
    the printable remnant of a line cut by a glitch (b"0,99" before b"EC25")."""
    for line in reversed(lines):
        text = line.strip()
        for p in prefixes:
            if text.upper().startswith(p):
                text = text[len(p):].strip()
                break
        text = text.strip('"').strip()
        if valid.fullmatch(text):
            return text
    raise AtParseError(f"no {what} in answer {list(lines)!r}")


_IMEI = re.compile(r"\d{15}")
_ICCID = re.compile(r"\d{18,22}[Ff]?")  # a 19-digit ICCID is often padded with F
_MODEL = re.compile(r"[A-Za-z0-9_.\- ]*[A-Za-z][A-Za-z0-9_.\- ]*")


def parse_imei(lines) -> str:
    """AT+CGSN answer (`356938035643809` or `+CGSN: "356938035643809"`) → the IMEI."""
    return _identity(lines, ("+CGSN:", "+GSN:"), _IMEI, "IMEI (15 digits)")


def parse_iccid(lines) -> str:
    """AT+CCID / AT+QCCID / AT+CICCID answer → ICCID (18-22 digits; a trailing F pad dropped)."""
    text = _identity(lines, ("+CCID:", "+QCCID:", "+ICCID:", "^ICCID:"), _ICCID,
                     "ICCID (18-22 digits)")
    return text.upper().rstrip("F")


def parse_model(lines) -> str:
    """AT+CGMM answer (`SIMCOM_SIM7600E-H`, `EC25`, `+CGMM: ...`) → model name: letters,
    digits, -_. and spaces, with at least one letter."""
    return _identity(lines, ("+CGMM:", "+GMM:"), _MODEL, "model name")
