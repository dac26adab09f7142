"""A cellular modem on a pseudo-terminal, answering AT commands like a SIM7600 or an EC25.

    modem = SimulatedModem(profile="ec25", rssi=21, link=tmp_path / "ttyUSB2").start()
    ... ModemConfig(port=modem.path) ...
    modem.set_registration(5)    # roaming, announced by "+CEREG: 5,..." once URCs are on
    modem.delay_s = 2.0          # slow answers;  modem.mute = True: no answers at all
    modem.garbage_every = 3      # noise before every 3rd answer (binary, or a cut-off line)
    modem.unplug(); modem.replug()
    modem.lose_registration(until="cfun")  # searching until AT+CFUN=0 then AT+CFUN=1
    modem.lose_registration(until="reset")  # ... until AT+CFUN=1,1 (a radio toggle is not enough)
    modem.cut_answers = 1        # the next answer stops mid-line, and nothing follows it
    modem.stop()

Answers follow 3GPP TS 27.007 framing (V.250, verbose): echo until ATE0, "\\r\\n<info>\\r\\n"
lines, then "\\r\\nOK\\r\\n", "\\r\\nERROR\\r\\n" or "\\r\\n+CME ERROR: <n>\\r\\n". Profile
differences that matter to the agent: the model name, and the ICCID command (SIMCom: AT+CCID
with a bare answer and AT+CICCID; Quectel: AT+QCCID, and AT+CCID is an ERROR).
Registration URCs are off until AT+CEREG=<n> / AT+CREG=<n> turn them on, as shipped.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from .pty import PtyDevice

PROFILES = {
    "sim7600": {"model": "SIMCOM_SIM7600E-H", "imei": "862636050123453"},
    "ec25": {"model": "EC25", "imei": "867698041234563"},
}
GARBAGE = b"\xff\x00~\x8f#\xfe\r\n"  # what a line glitch at the wrong baud rate looks like
PARTIAL = b"\r\n0,99\r\n"  # the printable tail of a line ("+CSQ: 21,99") cut by a glitch


class SimulatedModem(PtyDevice):
    """AT modem emulator. Attributes may be changed while it runs (from the test thread)."""

    def __init__(self, profile: str = "sim7600", *, rssi: int = 21, registration: int = 1,
                 operator: str = "Vodafone DE", iccid: str = "89490200001234567890",
                 sim_present: bool = True, act: int = 7, tac: str = "1A2B",
                 cell: str = "01C2D3E4", link: str | Path | None = None):
        if profile not in PROFILES:
            raise ValueError(f"unknown modem profile {profile!r} (known: {', '.join(PROFILES)})")
        super().__init__(link, name=f"sim-modem-{profile}")
        self.profile = profile
        self.model = PROFILES[profile]["model"]
        self.imei = PROFILES[profile]["imei"]
        self.iccid = iccid
        self.sim_present = sim_present
        self.rssi = rssi  # 0..31, 99 = unknown
        self.eps_stat = registration  # +CEREG stat: 1 home, 5 roaming, 2 searching, 3 denied
        self.cs_stat = registration  # +CREG stat
        self.operator = operator
        self.act = act
        self.tac, self.cell = tac, cell
        self.echo = True  # as shipped: ATE1
        self.cereg_n = self.creg_n = 0  # registration URCs off, as shipped
        self.cmee = 0
        self.delay_s = 0.0  # answer this long after the command (slow modem)
        self.mute = False  # read commands, never answer (a hung modem)
        self.garbage_every = 0  # 0 = never; N = noise before every Nth answer
        self.noise = [GARBAGE, PARTIAL]  # used in turn, one per noisy answer
        self.received: list[str] = []  # every command line, in order (for assertions)
        self.received_at: list[float] = []  # time.monotonic() of each, for pacing checks
        self._inbuf = b""
        self._answers = 0
        self._noisy = 0
        self._queue: list[tuple[float, bytes]] = []  # (due monotonic, bytes): delayed answers
        self._qlock = threading.Lock()  # replug() (test thread) resets what _step() uses
        self.cfun = 1  # AT+CFUN: 1 full functionality, 0 radio off
        self.supply_v = 3.8  # AT+CBC
        self.lost_until = ""  # "cfun" / "reset": registration lost until that is done
        self.cut_answers = 0  # this many answers are cut off mid-line
        self.reset_s = 0.3  # a reset (AT+CFUN=1,1): silent this long, then a fresh boot
        self.resets = 0
        self._booting_until = 0.0

    # -- driving it from a test -----------------------------------------------------------

    def set_registration(self, stat: int, urc: bool = True, *, tac: str | None = None,
                         cell: str | None = None) -> None:
        """Change EPS and CS registration (and the cell); announce it unprompted as
        +CEREG / +CREG URCs when AT+CEREG=n / AT+CREG=n turned them on."""
        self.eps_stat = self.cs_stat = stat
        self.tac, self.cell = tac or self.tac, cell or self.cell
        for name, n in (("+CEREG", self.cereg_n), ("+CREG", self.creg_n)):
            if urc and n:
                self.write(f"\r\n{name}: {stat}{self._location(n, stat)}\r\n".encode())

    def lose_registration(self, until: str = "cfun") -> None:
        """Registration drops to searching (URC announced) and stays lost until `until` is
        done: "cfun" (radio off, then on) or "reset" (AT+CFUN=1,1)."""
        if until not in ("cfun", "reset"):
            raise ValueError(f"until: 'cfun' or 'reset', not {until!r}")
        self.lost_until = until
        self.set_registration(2)

    @property
    def registered(self) -> bool:
        return self.eps_stat in (1, 5) and self.cfun == 1

    def ring(self) -> None:
        """An incoming call: the URC every modem sends."""
        self.write(b"\r\nRING\r\n")

    def replug(self) -> None:
        with self._qlock:
            super().replug()
            self.echo, self.cmee, self._inbuf, self._queue = True, 0, b"", []  # a fresh boot
            self.cereg_n = self.creg_n = 0

    # -- the loop -------------------------------------------------------------------------

    def _step(self) -> None:
        data = self._read(0.02)
        with self._qlock:
            self._serve(data)

    def _serve(self, data: bytes) -> None:
        now = time.monotonic()
        due = [item for item in self._queue if item[0] <= now]
        for item in due:
            self._queue.remove(item)
            self.write(item[1])
        self._inbuf += data
        while b"\r" in self._inbuf:
            line, _, self._inbuf = self._inbuf.partition(b"\r")
            line = line.strip(b"\n ")
            if not line:
                continue
            text = line.decode("ascii", "replace")
            self.received.append(text)
            self.received_at.append(time.monotonic())
            if time.monotonic() < self._booting_until:
                continue  # rebooting: nothing is read
            out = (line + b"\r") if self.echo else b""
            answer = self._answer(text)
            if self.mute:
                continue
            if self.cut_answers > 0:  # a glitch: half a line, then nothing
                self.cut_answers -= 1
                answer = answer[: max(3, len(answer) // 2)].rstrip(b"\r\n")
            self._answers += 1
            if self.garbage_every and self._answers % self.garbage_every == 0 and self.noise:
                out = self.noise[self._noisy % len(self.noise)] + out
                self._noisy += 1
            self._queue.append((time.monotonic() + self.delay_s, out + answer))

    def _answer(self, text: str) -> bytes:
        cmd = text.strip().upper()
        if not cmd.startswith("AT"):
            return _final("ERROR")
        try:
            info = self._info(cmd)
        except ValueError:  # AT+CMEE=x and the like
            info = None
        if isinstance(info, int):  # a +CME error code
            return _final(f"+CME ERROR: {info}" if self.cmee else "ERROR")
        if info is None:
            return _final("ERROR")
        return b"".join(f"\r\n{line}\r\n".encode() for line in info) + _final("OK")

    def _info(self, cmd: str):
        """Info lines for a command, an int CME error code, or None for ERROR."""
        if cmd in ("AT", "ATZ", "AT&F"):
            return []
        if cmd in ("ATE0", "ATE1"):
            self.echo = cmd == "ATE1"
            return []
        if cmd.startswith("AT+CMEE="):
            self.cmee = int(cmd[8:] or 0)
            return []
        if cmd.startswith("AT+CEREG="):
            self.cereg_n = int(cmd[9:] or 0)
            return []
        if cmd.startswith("AT+CREG="):
            self.creg_n = int(cmd[8:] or 0)
            return []
        if cmd == "AT+CGMM":
            return [self.model]
        if cmd in ("AT+CGSN", "AT+GSN"):
            return [self.imei]
        if cmd in ("AT+CCID", "AT+CICCID", "AT+QCCID"):
            supported = {"sim7600": ("AT+CCID", "AT+CICCID"), "ec25": ("AT+QCCID",)}[self.profile]
            if cmd not in supported:
                return None
            if not self.sim_present:
                return 10  # SIM not inserted
            return {"AT+CCID": [self.iccid], "AT+CICCID": [f"+ICCID: {self.iccid}"],
                    "AT+QCCID": [f"+QCCID: {self.iccid}F"]}[cmd]
        if cmd == "AT+CPIN?":
            return ["+CPIN: READY"] if self.sim_present else 10
        if cmd == "AT+CSQ":
            return [f"+CSQ: {self.rssi},99"]
        if cmd == "AT+CEREG?":
            return [f"+CEREG: {self.cereg_n},{self.eps_stat}"
                    f"{self._location(self.cereg_n, self.eps_stat)}"]
        if cmd == "AT+CREG?":
            return [f"+CREG: {self.creg_n},{self.cs_stat}"
                    f"{self._location(self.creg_n, self.cs_stat)}"]
        if cmd == "AT+CFUN?":
            return [f"+CFUN: {self.cfun}"]
        if cmd in ("AT+CFUN=0", "AT+CFUN=4"):
            self.cfun = 0
            self.eps_stat = self.cs_stat = 0
            return []
        if cmd == "AT+CFUN=1":
            if self.cfun != 1:
                self.cfun = 1
                if self.lost_until == "cfun":
                    self.lost_until = ""
                if not self.lost_until:
                    self.set_registration(1)
            return []
        if cmd == "AT+CFUN=1,1":
            self.resets += 1
            self._booting_until = time.monotonic() + self.reset_s
            self.lost_until = ""
            self.echo, self.cmee, self.cereg_n, self.creg_n = True, 0, 0, 0  # a fresh boot
            self.cfun = 1
            self.eps_stat = self.cs_stat = 1
            return []
        if cmd == "AT+CBC":
            if self.profile == "ec25":
                return [f"+CBC: 0,76,{int(round(self.supply_v * 1000))}"]
            return [f"+CBC: {self.supply_v:.3f}V"]
        if cmd == "AT+CGACT?":
            return [f"+CGACT: 1,{1 if self.registered else 0}"]
        if cmd == "AT+COPS?":
            if self.eps_stat in (1, 5) and self.operator:
                return [f'+COPS: 0,0,"{self.operator}",{self.act}']
            return ["+COPS: 0"]
        return None

    def _location(self, n: int, stat: int) -> str:
        """',"<tac>","<ci>",<AcT>' with n >= 2 while registered, else ''."""
        return f',"{self.tac}","{self.cell}",{self.act}' if n >= 2 and stat in (1, 5) else ""


def _final(code: str) -> bytes:
    return f"\r\n{code}\r\n".encode()
