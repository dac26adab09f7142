"""ISO-TP transport and UDS/OBD-II requests to one ECU: udsoncan over can-isotp.

Per bus with [[diagnostics.ecu]] entries, `DiagBus` opens its own python-can connection on
the bus's channel (kernel/software receive filters: the ECUs' response ids only) and one
can-isotp stack per ECU on a shared `can.Notifier`. The runtime's BusReader keeps its own
connection: python-can's virtual interface and SocketCAN deliver every frame to every
connection on the channel, so telemetry and diagnostics share the bus without sharing an
object (interfaces that cannot be opened twice, such as slcan on one serial port, are refused
for diagnostics in the agent; `tcu-agent diag --direct` opens them when the agent is stopped).
With `transport = "kernel"` an ECU uses the kernel's ISO-TP socket (CAN_ISOTP) instead,
through can-isotp's socket mode.

`EcuLink.execute(Request) -> Result` runs one scheduler request synchronously and never
raises: a timeout is NO_RESPONSE, a negative response NRC_0xNN (0x78 response-pending is
waited through, P2* each time, within the request timeout).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import can

from ..config import BusConfig, DiagnosticsConfig, DidConfig, EcuConfig
from ..core import diag as D
from ..errors import BusError, ConfigError

log = logging.getLogger("agent.diag")

SHAREABLE = frozenset({"virtual", "socketcan", "udp_multicast"})  # open twice on one channel
OBD_FUNCTIONAL_ID = 0x7DF
OBD_RESPONSE_IDS = range(0x7E8, 0x7F0)
PING = "ping"  # the CLI's scan: any answer


class _Failed(Exception):
    def __init__(self, error: str):
        super().__init__(error)
        self.error = error


@dataclass(frozen=True)
class Timing:
    p2_s: float
    p2_star_s: float
    request_s: float
    spacing_s: float


def timing(cfg: DiagnosticsConfig, ecu: EcuConfig) -> Timing:
    pick = lambda own, default: default if own is None else own  # noqa: E731
    return Timing(pick(ecu.p2_ms, cfg.p2_ms) / 1000, pick(ecu.p2_star_ms, cfg.p2_star_ms) / 1000,
                  cfg.request_timeout_ms / 1000,
                  pick(ecu.request_spacing_ms, cfg.request_spacing_ms) / 1000)


def diag_ids(ecus) -> set[int]:
    """The can keys of every ECU's request and response (not telemetry)."""
    from ..core.selection import EFF_FLAG

    out = set()
    for e in ecus:
        flag = EFF_FLAG if e.extended else 0
        out |= {e.request_id | flag, e.response_id | flag}
        if e.protocol == "obd" and not e.extended:
            out.add(OBD_FUNCTIONAL_ID)
    return out


def _raw_codec():
    """Any length, no value: the answer's hex only (a DID without a declared codec)."""
    from udsoncan import DidCodec

    class RawCodec(DidCodec):
        def decode(self, payload: bytes) -> Any:
            return None

        def __len__(self) -> int:
            raise DidCodec.ReadAllRemainingData

    return RawCodec()


def did_codec(cfg: DidConfig | None):
    """The udsoncan codec of a declared DID (scale/offset applied by `did_value`)."""
    from udsoncan import AsciiCodec, DidCodec

    if cfg is None or cfg.codec == "hex":
        return _raw_codec()
    if cfg.codec == "ascii":
        return AsciiCodec(cfg.length)
    return DidCodec(cfg.codec)


def did_value(cfg: DidConfig | None, decoded: Any) -> Any:
    if decoded is None or cfg is None:
        return None
    if isinstance(decoded, tuple):
        decoded = decoded[0] if len(decoded) == 1 else list(decoded)
    if isinstance(decoded, (int, float)) and not isinstance(decoded, bool) and \
            (cfg.scale != 1.0 or cfg.offset != 0.0):
        decoded = round(decoded * cfg.scale + cfg.offset, 6)
    if isinstance(decoded, bytes):
        return decoded.hex()
    return decoded


class EcuLink:
    """One ECU: a udsoncan Client on an ISO-TP connection (python stack or kernel socket)."""

    def __init__(self, cfg: EcuConfig, diag: DiagnosticsConfig, bus_cfg: BusConfig,
                 bus: can.BusABC | None, notifier: can.Notifier | None):
        import isotp
        import udsoncan
        from udsoncan.client import Client
        from udsoncan.connections import IsoTPSocketConnection, PythonIsoTpConnection

        self.cfg = cfg
        self.mask = diag.dtc_status_mask
        self.t = timing(diag, cfg)
        self.dids = {d.did: d for d in cfg.did}
        self.lock = threading.Lock()  # one request at a time, whoever asks
        mode = isotp.AddressingMode.Normal_29bits if cfg.extended else \
            isotp.AddressingMode.Normal_11bits
        address = isotp.Address(mode, txid=cfg.request_id, rxid=cfg.response_id)
        pad = cfg.padding if type(cfg.padding) is int else None
        if cfg.transport == "kernel":
            sock = isotp.socket(timeout=0.1)
            sock.set_opts(txpad=pad, rxpad=None)
            sock.set_fc_opts(bs=0, stmin=0)
            self.conn = IsoTPSocketConnection(bus_cfg.channel, address, tpsock=sock,
                                              name=cfg.name)
        else:
            params = {"stmin": 0, "blocksize": 0, "tx_padding": pad,
                      "tx_data_min_length": 8 if pad is not None else None,
                      "rx_flowcontrol_timeout": 1000, "rx_consecutive_frame_timeout": 1000,
                      "max_frame_size": 4095, "can_fd": False, "blocking_send": False}
            self.stack = isotp.NotifierBasedCanStack(bus, notifier, address=address,
                                                     params=params,
                                                     error_handler=self._isotp_error)
            self.conn = PythonIsoTpConnection(self.stack, name=cfg.name)
        config = dict(udsoncan.configs.default_client_config)
        config.update(p2_timeout=self.t.p2_s, p2_star_timeout=self.t.p2_star_s,
                      request_timeout=self.t.request_s, use_server_timing=False,
                      exception_on_negative_response=True, exception_on_invalid_response=True,
                      exception_on_unexpected_response=True, tolerate_zero_padding=True,
                      ignore_all_zero_dtc=True, data_identifiers={})
        self.client = Client(self.conn, config=config)
        # udsoncan logs every request (and every timeout as an error): ours count them.
        quiet = logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.CRITICAL
        self.client.logger.setLevel(quiet)
        self.conn.logger.setLevel(quiet)
        for sub in ("subconn",):
            inner = getattr(self.conn, sub, None)
            if inner is not None:
                inner.logger.setLevel(quiet)
        self.opened = False
        self.isotp_errors = 0

    def _isotp_error(self, e: Exception) -> None:
        self.isotp_errors += 1
        log.debug("%s: ISO-TP: %s", self.cfg.name, e)

    def open(self) -> None:
        try:
            self.client.open()
        except OSError as e:  # kernel socket: no CAN_ISOTP, no such interface
            raise BusError(f"diagnostics.ecu {self.cfg.name}: cannot open ISO-TP "
                           f"({self.cfg.transport}): {e}") from e
        self.opened = True

    def close(self) -> None:
        if self.opened:
            self.opened = False
            try:
                self.client.close()
            except Exception as e:  # a vanished interface: closing must go on
                log.debug("%s: close: %s", self.cfg.name, e)

    # -- one request ----------------------------------------------------------------------

    def execute(self, req: D.Request) -> D.Result:
        """Run one scheduler request; never raises."""
        with self.lock:
            try:
                return D.Result(True, self._run(req.op, req.arg))
            except _Failed as e:
                return D.Result(False, error=e.error)
            except Exception as e:  # noqa: BLE001 - a library surprise is this ECU's error
                log.warning("%s: %s failed: %s: %s", self.cfg.name, req.op, type(e).__name__, e)
                return D.Result(False, error="INVALID_RESPONSE")

    def _run(self, op: str, arg):
        obd = self.cfg.protocol == "obd"
        if op == D.DTCS:
            return self._obd_dtcs() if obd else self._uds(self._uds_dtcs)
        if op == D.CLEAR:
            if obd:
                self._obd(b"\x04")
            else:
                self._uds(lambda: self.client.clear_dtc(0xFFFFFF))
            return None
        if op == D.DID:
            return self._uds(lambda: self._did(arg))
        if op == PING:  # does it answer at all? a negative response is an answer
            try:
                if obd:
                    self._obd(b"\x01\x00")
                else:
                    self._uds(lambda: self.client.tester_present())
            except _Failed as e:
                if not e.error.startswith("NRC_"):
                    raise
                return e.error
            return "ok"
        if op in (D.PID, D.SUPPORTED):
            values = D.decode_mode01(self._obd(bytes([0x01, arg])))
            if op == D.SUPPORTED:
                if arg not in values:
                    raise _Failed("INVALID_RESPONSE")
                return values[arg]
            return values
        raise ValueError(f"unknown diagnostic operation {op!r}")

    def _uds(self, fn):
        from udsoncan import exceptions as X

        try:
            return fn()
        except X.TimeoutException:
            raise _Failed(D.NOT_ANSWERED) from None
        except X.NegativeResponseException as e:
            raise _Failed(D.nrc_error(e.response.code)) from None
        except (X.InvalidResponseException, X.UnexpectedResponseException):
            raise _Failed("INVALID_RESPONSE") from None

    def _uds_dtcs(self) -> list[dict]:
        resp = self.client.get_dtc_by_status_mask(self.mask)
        return D.dtc_list((D.uds_dtc_code(d.id), d.status.get_byte_as_int())
                          for d in resp.service_data.dtcs)

    def _did(self, did: int):
        cfg = self.dids.get(did)
        self.client.config["data_identifiers"] = {did: did_codec(cfg)}
        resp = self.client.read_data_by_identifier([did])
        raw = bytes(resp.data[2:])
        if cfg is not None and cfg.codec != "hex":
            raw = raw[:len(did_codec(cfg))]
        return raw.hex(), did_value(cfg, resp.service_data.values.get(did))

    def _obd_dtcs(self) -> list[dict]:
        modes = []
        for mode in (0x03, 0x07, 0x0A):
            try:
                modes.append(D.decode_obd_dtcs(self._obd(bytes([mode])), mode))
            except _Failed as e:
                # Mode 03 is mandatory; 07/0A answered with a negative response: not there.
                if mode == 0x03 or not e.error.startswith("NRC_"):
                    raise
                modes.append([])
            time.sleep(self.t.spacing_s)
        return D.merge_obd(*modes)

    def _obd(self, payload: bytes) -> bytes:
        """One SAE J1979 request; the positive answer. NRC 0x78 waits P2* (repeatable)."""
        from udsoncan.exceptions import TimeoutException

        conn = self.conn
        conn.empty_rxqueue()
        conn.send(payload)
        end = time.monotonic() + self.t.request_s
        wait = self.t.p2_s
        while True:
            left = min(wait, end - time.monotonic())
            if left <= 0:
                raise _Failed(D.NOT_ANSWERED)
            try:
                answer = conn.wait_frame(timeout=left, exception=True)
            except TimeoutException:
                raise _Failed(D.NOT_ANSWERED) from None
            if not answer:
                continue
            code = D.negative_code(answer)
            if code is not None and answer[1] == payload[0]:
                if code == 0x78:  # response pending: the ECU asks for more time
                    wait = self.t.p2_star_s
                    continue
                raise _Failed(D.nrc_error(code))
            if answer[0] == payload[0] + 0x40:
                return bytes(answer)
            # an answer to something else (late, or another tester's): keep waiting


class DiagBus:
    """The diagnostic connection to one bus and the links of its ECUs."""

    def __init__(self, bus_cfg: BusConfig, ecus: list[EcuConfig], diag: DiagnosticsConfig,
                 own_bus: bool = True):
        self.cfg = bus_cfg
        self.bus: can.BusABC | None = None
        self.notifier: can.Notifier | None = None
        python_ecus = [e for e in ecus if e.transport == "python"]
        if python_ecus:
            kwargs = dict(bus_cfg.options)
            if bus_cfg.bitrate:
                kwargs["bitrate"] = bus_cfg.bitrate
            filters = [{"can_id": e.response_id, "can_mask": 0x1FFFFFFF if e.extended else 0x7FF,
                        "extended": e.extended} for e in python_ecus]
            try:
                self.bus = can.Bus(interface=bus_cfg.interface, channel=bus_cfg.channel,
                                   can_filters=filters, **kwargs)
            except Exception as e:  # drivers raise CanError, OSError, ValueError...
                raise BusError(f"bus {bus_cfg.name}: cannot open {bus_cfg.interface} "
                               f"{bus_cfg.channel} for diagnostics: {e}") from e
            self.notifier = can.Notifier(self.bus, [], timeout=0.05)
        self.links: dict[str, EcuLink] = {}
        try:
            for e in ecus:
                if e.transport == "kernel" and bus_cfg.interface != "socketcan":
                    raise ConfigError(f"diagnostics.ecu {e.name}: transport \"kernel\" needs "
                                      f"a socketcan bus, {bus_cfg.name} is {bus_cfg.interface}")
                link = EcuLink(e, diag, bus_cfg, self.bus, self.notifier)
                link.open()
                self.links[e.name] = link
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        if self.notifier is not None:
            self.notifier.stop(0.5)
        if self.bus is not None:
            self.bus.shutdown()
        self.bus = self.notifier = None


def ecus_by_bus(config, ecus) -> dict[str, list[EcuConfig]]:
    by_bus: dict[str, list[EcuConfig]] = {}
    for e in ecus:
        by_bus.setdefault(e.bus or config.bus[0].name, []).append(e)
    return by_bus


def check_shareable(config) -> None:
    """ConfigError when a bus with diagnostics cannot be opened beside the telemetry reader."""
    for name, items in ecus_by_bus(config, config.diagnostics.ecu).items():
        bus_cfg = config.bus_named(name)
        if bus_cfg.interface not in SHAREABLE and any(e.transport == "python" for e in items):
            raise ConfigError(f"diagnostics: bus {name} ({bus_cfg.interface}) cannot be "
                              "opened a second time beside telemetry; diagnostics in the "
                              f"agent need {', '.join(sorted(SHAREABLE))} (or use "
                              "`tcu-agent diag --direct` with the agent stopped)")


def open_buses(config, ecus: list[EcuConfig] | None = None, for_agent: bool = True) -> dict:
    """DiagBus per bus that has ECUs; {ecu name: EcuLink} and the buses to close.
    In the agent an interface that cannot be opened a second time is a ConfigError."""
    diag = config.diagnostics
    ecus = list(diag.ecu) if ecus is None else ecus
    by_bus = ecus_by_bus(config, ecus)
    if for_agent:
        check_shareable(config)
    buses = []
    try:
        for name, items in by_bus.items():
            buses.append(DiagBus(config.bus_named(name), items, diag))
    except Exception:
        for b in buses:
            b.close()
        raise
    links = {n: link for b in buses for n, link in b.links.items()}
    return {"links": links, "buses": buses}


def scan_functional(bus: can.BusABC, timeout_s: float = 0.3, padding: int = 0xCC) -> dict:
    """OBD-II discovery: `01 00` to the functional id 0x7DF; {response id: supported PIDs or
    error} of every ECU that answers from 0x7E8-0x7EF within `timeout_s`."""
    bus.send(can.Message(arbitration_id=OBD_FUNCTIONAL_ID, is_extended_id=False,
                         data=bytes([0x02, 0x01, 0x00]) + bytes([padding]) * 5))
    end = time.monotonic() + timeout_s
    found: dict[int, Any] = {}
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return found
        msg = bus.recv(left)
        if msg is None or msg.is_extended_id or msg.arbitration_id not in OBD_RESPONSE_IDS:
            continue
        data = bytes(msg.data)
        if not data or data[0] >> 4 != 0:
            continue  # a single frame is all `01 00` takes
        payload = data[1:1 + (data[0] & 0x0F)]
        code = D.negative_code(payload)
        if code is not None:
            found[msg.arbitration_id] = D.nrc_error(code)
            continue
        try:
            found[msg.arbitration_id] = D.decode_mode01(payload).get(0x00, frozenset())
        except ValueError:
            continue
