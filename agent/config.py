"""Configuration: one TOML file, validated into frozen dataclasses before anything starts.

The schema is the dataclasses below: every field's type hint is checked, unknown keys are
errors, relative paths are resolved against the config file's directory. A later section
(mqtt, signing, commands, ...) slots in as one more dataclass field on `Config`.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

AUTO = "auto"


@dataclass(frozen=True)
class VehicleConfig:
    vin: str
    topic_prefix: str = ""  # empty: "vehicles/{vin}"

    def validate(self, where: str) -> None:
        if not self.vin or len(self.vin) > 64 or not self.vin.isprintable() or "/" in self.vin:
            raise ConfigError(f"{where}.vin: must be 1-64 printable characters without '/'")

    @property
    def prefix(self) -> str:
        return self.topic_prefix or f"vehicles/{self.vin}"


@dataclass(frozen=True)
class BusConfig:
    name: str
    interface: str
    channel: str
    dbc: tuple[Path, ...]
    bitrate: int | None = None
    fd: bool = False
    filters: bool = True  # kernel/hardware receive filters from the selected messages
    # Never send on it. Absent: listen-only unless a command action (or diagnostics) uses it.
    listen_only: bool | None = None
    options: Mapping[str, Any] = field(default_factory=dict)  # extra python-can kwargs

    def validate(self, where: str) -> None:
        if not self.dbc:
            raise ConfigError(f"{where}.dbc: needs at least one CAN database file")
        for i, path in enumerate(self.dbc):
            if not path.is_file():
                raise ConfigError(f"{where}.dbc.{i}: no such file: {path}")


@dataclass(frozen=True)
class SamplingConfig:
    """Per-signal sampling policy. Defaults suit most telemetry."""

    deadband: float = 0.0  # absolute; a number must move more than this to be sent
    min_interval_ms: int = 0  # throttle: at most one sample per interval (latest wins)
    heartbeat_s: float = 60.0  # re-send the last value this often even if unchanged; 0 = off
    timeout_ms: int | str = AUTO  # null after this silence; auto = 5 x DBC cycle time (>= 500 ms)

    def validate(self, where: str) -> None:
        if self.deadband < 0 or self.min_interval_ms < 0 or self.heartbeat_s < 0:
            raise ConfigError(f"{where}: deadband, min_interval_ms and heartbeat_s must be >= 0")
        if isinstance(self.timeout_ms, str) and self.timeout_ms != AUTO:
            raise ConfigError(f"{where}.timeout_ms: must be a number of ms, 0 (off) or \"auto\"")
        if isinstance(self.timeout_ms, int) and self.timeout_ms < 0:
            raise ConfigError(f"{where}.timeout_ms: must be >= 0")


@dataclass(frozen=True)
class SignalConfig:
    select: str  # "Message.Signal", or a signal name that is unique across the bus's DBCs
    name: str = ""  # output name (e.g. a VSS path); default "Message.Signal"
    bus: str = ""  # restrict to one bus; default: the first bus whose DBC has it
    scale: float = 1.0  # output = value * scale + offset (numbers only)
    offset: float = 0.0
    map: Mapping[str, Any] = field(default_factory=dict)  # value -> output value
    state: bool = False  # part of the last-known-state record
    deadband: float | None = None
    min_interval_ms: int | None = None
    heartbeat_s: float | None = None
    timeout_ms: int | str | None = None

    def validate(self, where: str) -> None:
        for key, value in self.map.items():
            # Outputs go into CBOR batches: plain values only (a TOML date would become a
            # CBOR tag that receivers reject).
            if value is not None and type(value) not in (bool, int, float, str):
                raise ConfigError(f"{where}.map.{key}: a map value must be a number, string or "
                                  f"boolean, not {type(value).__name__}")


@dataclass(frozen=True)
class TelemetryConfig:
    # All signals of these messages: names or ids, "*" for all, "bus:Message" to pick the bus.
    messages: tuple[str, ...] = ()
    signal: tuple[SignalConfig, ...] = ()
    defaults: SamplingConfig = SamplingConfig()
    max_batch_age_ms: int = 1000
    max_batch_bytes: int = 65536

    def validate(self, where: str) -> None:
        if self.max_batch_age_ms <= 0:
            raise ConfigError(f"{where}.max_batch_age_ms: must be > 0")
        if not 256 <= self.max_batch_bytes <= 200_000:
            raise ConfigError(f"{where}.max_batch_bytes: must be 256..200000 (protocol limit 256 KiB)")


@dataclass(frozen=True)
class StorageConfig:
    dir: Path
    max_bytes: int = 64 * 1024 * 1024

    def validate(self, where: str) -> None:
        if self.max_bytes < 64 * 1024:
            raise ConfigError(f"{where}.max_bytes: must be at least 65536")


@dataclass(frozen=True)
class ControlConfig:
    """The local control socket (agent/adapters/control.py): `status` and `monitor` read the
    running agent through it. Under systemd's RuntimeDirectory=tcu-agent by default."""
    socket: Path = Path("/run/tcu-agent/control.sock")
    enabled: bool = True
    group: str = "tcu-agent"  # may connect besides root and the agent's own user

    def validate(self, where: str) -> None:
        if len(os.fsencode(self.socket)) > 107:  # sun_path
            raise ConfigError(f"{where}.socket: {self.socket}: longer than a Unix socket path "
                              "may be (107 bytes)")


@dataclass(frozen=True)
class TlsConfig:
    ca: Path | None = None  # CA bundle that signed the broker's certificate; enables TLS
    cert: Path | None = None  # client certificate (mutual TLS)
    key: Path | None = None  # its private key

    def validate(self, where: str) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError(f"{where}: cert and key go together (mutual TLS)")
        if self.cert is not None and self.ca is None:
            raise ConfigError(f"{where}.ca: needed with a client certificate")
        for name in ("ca", "cert", "key"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ConfigError(f"{where}.{name}: no such file: {path}")


@dataclass(frozen=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883  # 8883 with TLS in production
    client_id: str = ""  # default "tcu-{vin}"
    username: str = ""
    password_file: Path | None = None  # first line is the password; keep it 0600
    keepalive: int = 30  # s
    protocol: str = "auto"  # "5", "3.1.1", or auto: 5, falling back to 3.1.1 if refused
    reconnect_min_s: float = 0.5  # first retry delay; doubles (with jitter) up to the cap
    reconnect_max_s: float = 60.0
    max_inflight: int = 32  # QoS 1 messages published but not yet acknowledged
    tls: TlsConfig = TlsConfig()

    def validate(self, where: str) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"{where}.port: must be 1..65535")
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise ConfigError(f"{where}.protocol: must be \"auto\", \"5\" or \"3.1.1\"")
        if not 5 <= self.keepalive <= 3600:
            raise ConfigError(f"{where}.keepalive: must be 5..3600 s")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ConfigError(f"{where}: need 0 < reconnect_min_s <= reconnect_max_s")
        if not 1 <= self.max_inflight <= 65535:
            raise ConfigError(f"{where}.max_inflight: must be 1..65535")
        if self.password_file is not None and not self.password_file.is_file():
            raise ConfigError(f"{where}.password_file: no such file: {self.password_file}")


@dataclass(frozen=True)
class Pkcs11Config:
    module: Path  # the token's PKCS#11 library (.so)
    token: str  # token label
    key_label: str  # label of the key pair (tcu-agent keys generate --pkcs11 ...)
    pin_file: Path  # user PIN, first line, mode 0600

    def validate(self, where: str) -> None:
        if not self.module.is_file():
            raise ConfigError(f"{where}.module: no such file: {self.module}")
        for name in ("token", "key_label"):
            value = getattr(self, name)
            if not value or len(value) > 32 or not value.isprintable():
                raise ConfigError(f"{where}.{name}: must be 1-32 printable characters")
        if not self.pin_file.is_file():
            raise ConfigError(f"{where}.pin_file: no such file: {self.pin_file}")


@dataclass(frozen=True)
class SigningConfig:
    key_file: Path | None = None  # Ed25519 or P-256 private key, PKCS#8 PEM, mode 0600
    pkcs11: Pkcs11Config | None = None  # or a key in a PKCS#11 token (never leaves it)

    def validate(self, where: str) -> None:
        if (self.key_file is None) == (self.pkcs11 is None):
            raise ConfigError(f"{where}: set exactly one of key_file and pkcs11")


@dataclass(frozen=True)
class FrameConfig:
    message: str  # DBC message to send
    signals: Mapping[str, Any] = field(default_factory=dict)  # value, or "{param}"
    defaults: Mapping[str, Any] = field(default_factory=dict)  # when no copy was received
    bus: str = ""  # default: the first bus whose DBC has the message
    repeat: int = 1
    interval_ms: int = 100
    counter: str = ""  # signal incremented (mod its range) in every frame sent
    checksum: str = ""  # signal set to the sum of the frame's other bytes, mod 256

    def validate(self, where: str) -> None:
        if not 1 <= self.repeat <= 100 or not 0 <= self.interval_ms <= 10_000:
            raise ConfigError(f"{where}: repeat 1..100, interval_ms 0..10000")


@dataclass(frozen=True)
class ActionConfig:
    """How one command name acts on the vehicle. Conditions: `Message.Signal OP value`."""

    name: str  # the command name, e.g. "charge.start"
    actuator: str = ""  # concurrency group; default: the name's part before the first dot
    preconditions: tuple[str, ...] = ()  # all must hold, else REJECTED PRECONDITION_FAILED
    already: tuple[str, ...] = ()  # if all hold, SUCCEEDED at once without sending
    confirm: tuple[str, ...] = ()  # all must hold within timeout_ms, else TIMED_OUT
    timeout_ms: int = 5000
    stale_ms: int = 2000  # a signal older than this fails every condition
    frame: tuple[FrameConfig, ...] = ()
    # Sent first when the action's bus is asleep (network-management frames from the DBC);
    # without them a command on a sleeping bus is REJECTED PRECONDITION_FAILED.
    wake: tuple[FrameConfig, ...] = ()
    wake_timeout_ms: int = 3000  # for the bus to come alive and the preconditions to hold

    def validate(self, where: str) -> None:
        if not self.confirm:
            raise ConfigError(f"{where}.confirm: needed: SUCCEEDED only when the vehicle "
                              "confirms")
        if not self.frame:
            raise ConfigError(f"{where}.frame: at least one frame to send")
        if self.timeout_ms <= 0 or self.stale_ms <= 0:
            raise ConfigError(f"{where}: timeout_ms and stale_ms must be > 0")
        if not 100 <= self.wake_timeout_ms <= 60_000:
            raise ConfigError(f"{where}.wake_timeout_ms: must be 100..60000")


@dataclass(frozen=True)
class CommandsConfig:
    trust_store: Path  # TOML file of [[key]] name / public_key / allow; reloaded on SIGHUP
    max_skew_ms: int = 30_000  # how far in the future `iat` may be (clock skew)
    max_lifetime_ms: int = 600_000  # longest accepted exp - iat
    max_message_bytes: int = 65_536  # larger messages on the commands topic: BAD_ENVELOPE
    queue_size: int = 8  # commands waiting per actuator; more: REJECTED BUSY
    reject_rate_per_s: float = 20.0  # garbage/rejected messages handled (and answered) per s
    reject_burst: int = 40
    garbage_rate_per_s: float = 1.0  # of those, answers to garbage and unknown keys (at most)
    garbage_burst: int = 5
    verify_rate_per_s: float = 20.0  # signature checks per trusted key per s (core/ratelimit.py)
    verify_burst: int = 40
    verify_sample: float = 0.05  # over a key's budget: share of its messages verified anyway
    redelivery_interval_ms: int = 5000  # one command answered at most once per interval
    lane_size: int = 256  # commands waiting for the core thread; more are dropped and counted
    action: tuple[ActionConfig, ...] = ()

    def validate(self, where: str) -> None:
        if self.max_skew_ms < 0 or self.max_lifetime_ms <= 0 or self.max_message_bytes < 1024:
            raise ConfigError(f"{where}: max_skew_ms >= 0, max_lifetime_ms > 0, "
                              "max_message_bytes >= 1024")
        if self.queue_size < 1 or self.reject_rate_per_s <= 0 or self.reject_burst < 1:
            raise ConfigError(f"{where}: queue_size, reject_rate_per_s, reject_burst must be > 0")
        if self.verify_rate_per_s <= 0 or self.verify_burst < 1 or self.lane_size < 1 \
                or self.garbage_rate_per_s <= 0 or self.garbage_burst < 1 \
                or not 0 <= self.verify_sample <= 1 or self.redelivery_interval_ms < 0:
            raise ConfigError(f"{where}: verify_rate_per_s, verify_burst, garbage_rate_per_s, "
                              "garbage_burst, lane_size must be > 0, "
                              "verify_sample 0..1, redelivery_interval_ms >= 0")


@dataclass(frozen=True)
class SimulatorConfig:
    """The simulated EV of dbc/demo_ev.dbc (agent/sim), run inside the agent's process."""

    enabled: bool = False
    bus: str = ""  # which [[bus]] it sits on (default: the first); use interface "virtual"
    soc: float = 50.0
    plugged: bool = True
    speed_kph: float = 0.0
    locked: bool = True
    charge_limit: int = 80
    charge_rate_pct_per_s: float = 0.0  # 0: a 7.4 kW charger (32 A, 230 V) on 64 kWh
    drive: bool = False  # follow the built-in drive cycle (0-60 km/h, stops); overrides speed
    timeline: tuple[Mapping[str, Any], ...] = ()  # [{at_s = 5, plugged = false}, ...]
    battery_v: float = 12.6  # the 12 V battery (BCM_Power.BatteryVoltage); a timeline may sag it

    def validate(self, where: str) -> None:
        if not 0 <= self.soc <= 100 or not 50 <= self.charge_limit <= 100:
            raise ConfigError(f"{where}: soc 0..100 and charge_limit 50..100")
        if not 0 <= self.speed_kph <= 250 or self.charge_rate_pct_per_s < 0:
            raise ConfigError(f"{where}: speed_kph 0..250 and charge_rate_pct_per_s >= 0")
        for i, entry in enumerate(self.timeline):
            if type(entry.get("at_s")) not in (int, float) or entry["at_s"] < 0:
                raise ConfigError(f"{where}.timeline.{i}.at_s: a number of seconds >= 0 is needed")
            for key, value in entry.items():
                _check_timeline_value(f"{where}.timeline.{i}.{key}", key, value)


# What a simulator timeline entry may change, with its type and range.
_TIMELINE = {"soc": (float, 0, 100), "speed_kph": (float, 0, 250), "charge_limit": (int, 50, 100),
             "plugged": (bool,), "locked": (bool,), "drive": (bool,), "fault": (bool,),
             "driver_door_open": (bool,), "gear": (str, ("P", "R", "N", "D")),
             "asleep": (bool,), "battery_v": (float, 0, 20)}


def _check_timeline_value(key: str, name: str, value: Any) -> None:
    if name == "at_s":
        return
    spec = _TIMELINE.get(name)
    if spec is None:
        raise ConfigError(f"{key}: unknown key (known: at_s, {', '.join(_TIMELINE)})")
    kind = spec[0]
    if kind is float:
        ok = type(value) in (int, float) and spec[1] <= value <= spec[2]
        want = f"a number {spec[1]}..{spec[2]}"
    elif kind is int:
        ok = type(value) is int and spec[1] <= value <= spec[2]
        want = f"an integer {spec[1]}..{spec[2]}"
    elif kind is str:
        ok = value in spec[1]
        want = "one of " + ", ".join(spec[1])
    else:
        ok = type(value) is bool
        want = "true or false"
    if not ok:
        raise ConfigError(f"{key}: expected {want}, got {value!r}")


@dataclass(frozen=True)
class ModemConfig:
    port: str  # serial device, e.g. /dev/ttyUSB2
    baud: int = 115200
    poll_interval_s: float = 30.0  # identity once, then signal/registration/operator polls
    command_timeout_s: float = 5.0
    signal_hysteresis_db: float = 3.0  # report a new signal strength only past this change
    # Link recovery (README "Power"): broker unreachable this long and the modem not
    # registered or without a data bearer -> escalate, re-read / radio off-on / reset /
    # power cycle; 0 = off.
    recovery_after_s: float = 120.0
    recovery_backoff_s: float = 30.0  # before the next step; doubles with each step
    recovery_max_per_hour: int = 6
    power_cycle_command: tuple[str, ...] = ()  # argv, e.g. a GPIO toggle; the last step
    power_cycle_timeout_s: float = 30.0
    modemmanager: bool = False  # ModemManager owns the modem: the agent only observes
    read_voltage: bool = False  # poll AT+CBC: Vehicle.Connectivity.SupplyVoltage (volts)

    def validate(self, where: str) -> None:
        if self.recovery_after_s < 0 or self.recovery_backoff_s < 0.1 or \
                not 1 <= self.recovery_max_per_hour <= 60 or self.power_cycle_timeout_s <= 0:
            raise ConfigError(f"{where}: recovery_after_s >= 0, recovery_backoff_s >= 0.1, "
                              "recovery_max_per_hour 1..60, power_cycle_timeout_s > 0")
        if not self.port:
            raise ConfigError(f"{where}.port: must name a serial device, e.g. /dev/ttyUSB2")
        if self.baud <= 0:
            raise ConfigError(f"{where}.baud: must be > 0")
        if not 1 <= self.poll_interval_s <= 86400 or not 0.1 <= self.command_timeout_s <= 300:
            raise ConfigError(f"{where}: poll_interval_s 1..86400 and command_timeout_s 0.1..300")
        if not 0 <= self.signal_hysteresis_db <= 40:
            raise ConfigError(f"{where}.signal_hysteresis_db: must be 0..40")


@dataclass(frozen=True)
class PowerConfig:
    """Following the vehicle's power state (PROTOCOL.md §10, README "Power")."""

    sleep_after_s: float = 60.0  # every bus silent this long: asleep; 0 = never
    slow_poll_s: float = 600.0  # modem polls and GNSS fixes while asleep or in protect
    heartbeat_s: float = 3600.0  # the signed status record while asleep or in protect
    keepalive_s: int = 900  # MQTT keepalive while asleep
    first_batch_ms: int = 250  # after start and wake: the first batch closes this early
    quiet_after_ms: int = 300  # every bus silent this long: no timeouts (keep < any timeout)
    on_sleep_command: tuple[str, ...] = ()  # argv run on entering asleep (e.g. suspend)
    on_sleep_timeout_s: float = 10.0
    battery_signal: str = ""  # "Message.Signal" or a value name: the 12 V reading (volts)
    protect_below_v: float = 11.8  # protect below this ...
    protect_resume_v: float = 12.2  # ... until back at this or above

    def validate(self, where: str) -> None:
        if self.sleep_after_s < 0 or not 1 <= self.slow_poll_s <= 86400:
            raise ConfigError(f"{where}: sleep_after_s >= 0 and slow_poll_s 1..86400")
        if not 10 <= self.heartbeat_s <= 86400 or not 5 <= self.keepalive_s <= 3600:
            raise ConfigError(f"{where}: heartbeat_s 10..86400 and keepalive_s 5..3600")
        if not 50 <= self.quiet_after_ms <= 60_000:
            raise ConfigError(f"{where}.quiet_after_ms: must be 50..60000")
        if not 0 < self.first_batch_ms <= 60_000 or self.on_sleep_timeout_s <= 0:
            raise ConfigError(f"{where}: first_batch_ms 1..60000 and on_sleep_timeout_s > 0")
        if self.protect_resume_v <= self.protect_below_v:
            raise ConfigError(f"{where}: protect_resume_v must be above protect_below_v "
                              "(hysteresis)")


@dataclass(frozen=True)
class GnssConfig:
    port: str  # serial device emitting NMEA 0183, e.g. /dev/ttyUSB1
    baud: int = 9600

    def validate(self, where: str) -> None:
        if not self.port:
            raise ConfigError(f"{where}.port: must name a serial device, e.g. /dev/ttyUSB1")
        if self.baud <= 0:
            raise ConfigError(f"{where}.baud: must be > 0")


@dataclass(frozen=True)
class UpdatesConfig:
    """Software updates (update.stage / update.activate / update.cancel) from TUF repositories."""

    trusted_root: Path  # root.json shipped with the vehicle: the update trust anchor
    allowed_repositories: tuple[str, ...]  # URL prefixes a command's `repository` must start with
    hardware_id: str  # targets must name it in their custom metadata
    installed_version: str  # the version running now (until an update commits)
    dir: Path | None = None  # A/B slot directories; default {storage.dir}/slots
    preconditions: tuple[str, ...] = ()  # for update.activate, e.g. 'VCU_Status.Gear == "P"'
    stale_ms: int = 2000  # a signal older than this fails a precondition
    health_timeout_s: float = 60.0  # after the restart: buses open and broker reached within it
    max_boot_attempts: int = 3  # starts of an unconfirmed slot before it is rolled back
    max_resume_age_s: float = 6 * 3600  # an interrupted download younger than this is resumed
    min_free_bytes: int = 16 << 20  # left free after the download

    def validate(self, where: str) -> None:
        if not self.trusted_root.is_file():
            raise ConfigError(f"{where}.trusted_root: no such file: {self.trusted_root}")
        if not self.allowed_repositories:
            raise ConfigError(f"{where}.allowed_repositories: at least one URL prefix")
        for i, prefix in enumerate(self.allowed_repositories):
            if not prefix.startswith(("http://", "https://")) or prefix.count("/") < 3:
                raise ConfigError(f"{where}.allowed_repositories.{i}: {prefix!r} must be an "
                                  "http(s) URL prefix ending in a path, e.g. "
                                  "\"https://updates.example.com/\"")
        if not self.hardware_id:
            raise ConfigError(f"{where}.hardware_id: must not be empty")
        if not self.preconditions:
            raise ConfigError(f"{where}.preconditions: at least one condition is needed "
                              "(PROTOCOL.md: no update.activate unless the vehicle is parked), "
                              "e.g. ['VCU_Status.Gear == \"P\"']")
        from .core.protocol import parse_version
        from .errors import UpdateError

        try:
            parse_version(self.installed_version)
        except UpdateError as e:
            raise ConfigError(f"{where}.installed_version: {e}") from None
        if self.stale_ms <= 0 or self.health_timeout_s <= 0 or self.max_boot_attempts < 1:
            raise ConfigError(f"{where}: stale_ms, health_timeout_s, max_boot_attempts must be > 0")


@dataclass(frozen=True)
class TrustRefreshConfig:
    """The trust store as a TUF target of the update repository (trust.refresh, periodic)."""

    repository: str = ""  # refresh from here every interval_s; "" = only on trust.refresh
    target: str = "trust.toml"  # the target name in that repository
    interval_s: float = 3600.0  # 0 = no periodic refresh

    def validate(self, where: str) -> None:
        if self.interval_s < 0:
            raise ConfigError(f"{where}.interval_s: must be >= 0")
        if self.repository and not self.repository.startswith(("http://", "https://")):
            raise ConfigError(f"{where}.repository: must be an http:// or https:// URL")
        if not self.target:
            raise ConfigError(f"{where}.target: must not be empty")


@dataclass(frozen=True)
class PidConfig:
    """One OBD-II mode 01 PID polled as a telemetry signal (default name `OBD.<PID name>`)."""

    pid: int | str  # number (0x0D) or its name in the PID table ("VehicleSpeed")
    interval_ms: int = 1000
    name: str = ""  # output name (e.g. a VSS path); default "OBD.<PID name>"
    state: bool = False
    deadband: float | None = None
    min_interval_ms: int | None = None
    heartbeat_s: float | None = None

    def validate(self, where: str) -> None:
        from .core.diag import pid_number

        try:
            pid_number(self.pid)
        except ValueError as e:
            raise ConfigError(f"{where}.pid: {e}") from None
        if not 50 <= self.interval_ms <= 86_400_000:
            raise ConfigError(f"{where}.interval_ms: must be 50..86400000")


@dataclass(frozen=True)
class DidConfig:
    """A UDS data identifier that diag.read_data decodes (udsoncan codec)."""

    did: int  # 0..0xFFFF
    codec: str = "hex"  # "hex" (raw), "ascii" (needs length), or a struct format (">H", ">hB")
    length: int = 0  # bytes, for "ascii"
    scale: float = 1.0  # one-number codecs: value * scale + offset
    offset: float = 0.0
    name: str = ""

    def validate(self, where: str) -> None:
        import struct

        if not 0 <= self.did <= 0xFFFF:
            raise ConfigError(f"{where}.did: must be 0..65535")
        if self.codec == "ascii":
            if not 1 <= self.length <= 4000:
                raise ConfigError(f"{where}.length: an ascii codec needs length 1..4000")
        elif self.codec != "hex":
            try:
                struct.calcsize(self.codec)
            except struct.error:
                raise ConfigError(f"{where}.codec: {self.codec!r} is not \"hex\", \"ascii\" or "
                                  "a struct format such as \">H\"") from None


@dataclass(frozen=True)
class EcuConfig:
    name: str
    request_id: int  # physical request id (0x7E0); 29-bit with extended = true
    response_id: int  # its answers (0x7E8)
    protocol: str = "uds"  # "uds" (ISO 14229) or "obd" (SAE J1979)
    bus: str = ""  # default: the first [[bus]]
    extended: bool = False  # 29-bit identifiers
    padding: int | bool = 0xCC  # fill byte of short frames; false: no padding
    transport: str = "python"  # "python" (can-isotp on python-can) or "kernel" (CAN_ISOTP)
    p2_ms: int | None = None
    p2_star_ms: int | None = None
    request_spacing_ms: int | None = None
    dtc_interval_s: float | None = None
    pid: tuple[PidConfig, ...] = ()
    did: tuple[DidConfig, ...] = ()

    def validate(self, where: str) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum() \
                or len(self.name) > 32:
            raise ConfigError(f"{where}.name: 1-32 letters, digits, '-' or '_'")
        if self.protocol not in ("uds", "obd"):
            raise ConfigError(f"{where}.protocol: must be \"uds\" or \"obd\"")
        top = 0x1FFFFFFF if self.extended else 0x7FF
        for key in ("request_id", "response_id"):
            if not 0 <= getattr(self, key) <= top:
                raise ConfigError(f"{where}.{key}: must be 0..{top:#x}"
                                  f"{'' if self.extended else ' (or set extended = true)'}")
        if self.request_id == self.response_id:
            raise ConfigError(f"{where}: request_id and response_id must differ")
        if self.padding is True or (type(self.padding) is int and not 0 <= self.padding <= 255):
            raise ConfigError(f"{where}.padding: a byte 0..255, or false for none")
        if self.transport not in ("python", "kernel"):
            raise ConfigError(f"{where}.transport: must be \"python\" or \"kernel\"")
        for key in ("p2_ms", "p2_star_ms", "request_spacing_ms"):
            v = getattr(self, key)
            if v is not None and not 0 <= v <= 60_000:
                raise ConfigError(f"{where}.{key}: must be 0..60000")
        if self.dtc_interval_s is not None and self.dtc_interval_s < 0:
            raise ConfigError(f"{where}.dtc_interval_s: must be >= 0 (0: on command only)")
        if self.pid and self.protocol != "obd":
            raise ConfigError(f"{where}.pid: PIDs are OBD-II; set protocol = \"obd\"")
        dids = [d.did for d in self.did]
        if len(set(dids)) != len(dids):
            raise ConfigError(f"{where}.did: a DID is declared twice")


@dataclass(frozen=True)
class DiagnosticsConfig:
    """Remote diagnostics over ISO-TP (README "Diagnostics"). Defaults for every ECU."""

    ecu: tuple[EcuConfig, ...] = ()
    p2_ms: int = 200  # first answer (or 0x78 response pending) within this; J1979: 50 + margin
    p2_star_ms: int = 5000  # after each 0x78 response pending
    request_timeout_ms: int = 10_000  # a whole request, however many 0x78 came
    request_spacing_ms: int = 50  # quiet time between two requests to one ECU
    dtc_interval_s: float = 300.0  # periodic DTC read; 0: on command only
    dtc_status_mask: int = 0xFF  # UDS 0x19 0x02 status mask
    clear_preconditions: tuple[str, ...] = ('VCU_Status.Gear == "P"',)  # for diag.clear_dtcs
    stale_ms: int = 2000  # a signal older than this fails a precondition
    queue_size: int = 8  # diag commands waiting; more: REJECTED BUSY

    def validate(self, where: str) -> None:
        if not self.ecu:
            raise ConfigError(f"{where}.ecu: at least one [[diagnostics.ecu]]")
        names = [e.name for e in self.ecu]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"{where}.ecu: duplicate ECU name {dupes[0]!r}")
        if not 10 <= self.p2_ms <= 60_000 or not self.p2_ms <= self.p2_star_ms <= 60_000:
            raise ConfigError(f"{where}: need 10 <= p2_ms <= p2_star_ms <= 60000")
        if not self.p2_star_ms <= self.request_timeout_ms <= 600_000:
            raise ConfigError(f"{where}.request_timeout_ms: must be p2_star_ms..600000")
        if not 0 <= self.request_spacing_ms <= 60_000 or self.dtc_interval_s < 0:
            raise ConfigError(f"{where}: request_spacing_ms 0..60000 and dtc_interval_s >= 0")
        if not 0 <= self.dtc_status_mask <= 255 or self.stale_ms <= 0 or self.queue_size < 1:
            raise ConfigError(f"{where}: dtc_status_mask 0..255, stale_ms > 0, queue_size > 0")
        from .core.conditions import parse_condition

        for i, text in enumerate(self.clear_preconditions):
            parse_condition(text, f"{where}.clear_preconditions.{i}")


@dataclass(frozen=True)
class CampaignsConfig:
    """Collection campaigns (PROTOCOL.md §8), applied by `campaign.apply` commands."""

    max_buffer_bytes: int = 16 << 20  # every pre-trigger ring and window history together
    max_conditions: int = 512  # active condition campaigns (at least 256)
    max_campaigns: int = 1024
    stale_ms: int = 5000  # an input older than this makes a condition false
    assumed_period_ms: int = 10  # sizing rings of messages without a DBC cycle time
    max_capture_ms: int = 600_000  # pre_ms and post_ms at most
    max_window_ms: int = 600_000  # avg/min/max windows at most

    def validate(self, where: str) -> None:
        for name in ("max_buffer_bytes", "max_conditions", "max_campaigns", "stale_ms",
                     "assumed_period_ms", "max_capture_ms", "max_window_ms"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}.{name}: must be > 0")


@dataclass(frozen=True)
class Config:
    vehicle: VehicleConfig
    bus: tuple[BusConfig, ...]
    storage: StorageConfig
    telemetry: TelemetryConfig = TelemetryConfig()
    mqtt: MqttConfig | None = None  # absent: no uplink (replay, monitor, bench)
    signing: SigningConfig | None = None
    commands: CommandsConfig | None = None
    simulator: SimulatorConfig | None = None
    modem: ModemConfig | None = None
    gnss: GnssConfig | None = None
    updates: UpdatesConfig | None = None
    power: PowerConfig | None = None
    control: ControlConfig = ControlConfig()
    trust: TrustRefreshConfig | None = None  # needs [updates]: its TUF root and repositories
    diagnostics: DiagnosticsConfig | None = None
    campaigns: CampaignsConfig | None = None  # campaign.* commands; needs [commands]
    path: Path | None = None  # the file it came from (not a TOML key)

    def validate(self, where: str) -> None:
        if not self.bus:
            raise ConfigError("bus: at least one [[bus]] entry is required")
        names = [b.name for b in self.bus]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ConfigError(f"bus: duplicate bus name {sorted(dupes)[0]!r}")
        if self.updates is not None and self.commands is None:
            raise ConfigError("updates: needs a [commands] section (updates arrive as commands)")
        if self.campaigns is not None and self.commands is None:
            raise ConfigError("campaigns: needs a [commands] section (campaigns arrive as "
                              "commands)")
        if self.trust is not None and self.updates is None:
            raise ConfigError("trust: needs an [updates] section (its trusted_root, "
                              "allowed_repositories and hardware_id)")
        for i, ecu in enumerate(self.diagnostics.ecu if self.diagnostics else ()):
            if ecu.bus and ecu.bus not in names:
                raise ConfigError(f"diagnostics.ecu.{i}.bus: no bus named {ecu.bus!r} "
                                  f"(buses: {', '.join(names)})")

    @property
    def slots_dir(self) -> Path:
        return (self.updates.dir if self.updates and self.updates.dir
                else self.storage.dir / "slots")

    def bus_named(self, name: str) -> BusConfig:
        for b in self.bus:
            if b.name == name:
                return b
        raise ConfigError(f"no bus named {name!r} (buses: {', '.join(b.name for b in self.bus)})")


# -- loading ----------------------------------------------------------------------------

def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override and validate a config file. Raises ConfigError with a one-line message."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    return config_from_dict(raw, base=path.parent, source=path, overrides=overrides)


def config_from_dict(raw: dict, base: Path, source: Path | None = None,
                     overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Validate an already-parsed TOML document (tests and the demo build configs in code)."""
    label = str(source) if source else "config"
    keys = {apply_override(raw, item): item for item in overrides}
    try:
        cfg = _build(Config, raw, "", base)
    except ConfigError as e:
        # A key that only a --set put there (or a value it gave) is the --set's fault.
        bad = str(e).split(":", 1)[0]
        item = next((i for k, i in keys.items() if bad == k or bad.startswith(k + ".")), None)
        raise ConfigError(f"--set {item!r}: {e}" if item else f"{label}: {e}") from None
    return dataclasses.replace(cfg, path=source)


def apply_override(raw: dict, item: str) -> str:
    """Apply one `KEY=VALUE` override (dotted key, TOML-typed value) to a parsed document.

    Array-of-tables entries are addressed by index or by their `name` (bus.0 / bus.powertrain).
    A value that is not valid TOML is taken as a plain string. Returns the key as the config's
    errors name it (entries by index).
    """
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    parts = key.split(".")
    node: Any = raw
    depth = 0
    canon: list[str] = []
    while depth < len(parts):
        part = parts[depth]
        if isinstance(node, list):
            # An entry's name may itself contain dots (a VSS path such as Vehicle.Speed).
            depth, part = _dotted_name(node, parts, depth)
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        depth += 1
        if isinstance(node, list):
            idx = _list_index(node, part, where, item)
            canon.append(str(idx))
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            canon.append(part)
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"--set {item!r}: {where} is not a table")
    return ".".join(canon)


def _dotted_name(node: list, parts: list[str], depth: int) -> tuple[int, str]:
    """The longest run of parts from `depth` that is an entry's name (leaving at least one
    part for the key inside it); else just parts[depth]. Returns (last depth used, name)."""
    names = {e.get("name") for e in node if isinstance(e, dict)}
    for end in range(len(parts) - 1, depth, -1):
        joined = ".".join(parts[depth:end])
        if joined in names:
            return end - 1, joined
    return depth, parts[depth]


def _list_index(node: list, part: str, where: str, item: str) -> int:
    if part.isdigit():
        idx = int(part)
        if idx < len(node):
            return idx
        raise ConfigError(f"--set {item!r}: {where}: no entry {idx} (there are {len(node)})")
    for idx, entry in enumerate(node):
        if isinstance(entry, dict) and entry.get("name") == part:
            return idx
    raise ConfigError(f"--set {item!r}: {where}: no entry named {part!r}")


def build_section(cls: type, data: Any, where: str, base: Path) -> Any:
    """Validate one section on its own (e.g. `tcu-agent simulate --set` without a config)."""
    return _build(cls, data, where, base)


def _build(cls: type, data: Any, where: str, base: Path) -> Any:
    """Build dataclass `cls` from a TOML table, checking keys and types."""
    label = where or "(top level)"
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a table, got {_tname(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "path"}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{_join(where, unknown[0])}: unknown key (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        key = _join(where, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: missing required key")
            continue
        kwargs[name] = _convert(hints[name], data[name], key, base)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(label)
    return obj


def _convert(hint: Any, value: Any, key: str, base: Path) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own error says more than "expected X"
            return _convert(options[0], value, key, base)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key, base)
            except ConfigError as e:
                errors.append(e)
        wanted = " or ".join(_hname(a) for a in args if a is not type(None))
        raise ConfigError(f"{key}: expected {wanted}, got {_tname(value)}")
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected an array, got {_tname(value)}")
        return tuple(_convert(args[0], v, f"{key}.{i}", base) for i, v in enumerate(value))
    if hint is Mapping[str, Any] or origin in (Mapping, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {_tname(value)}")
        return types.MappingProxyType(dict(value))
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key, base)
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a path string, got {_tname(value)}")
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(os.path.normpath(base / p))
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_tname(value)}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_tname(value)}")
        return value
    if hint in (str, bool):
        if type(value) is not hint:
            raise ConfigError(f"{key}: expected {_hname(hint)}, got {_tname(value)}")
        return value
    raise ConfigError(f"{key}: unsupported schema type {hint!r}")  # a bug in the schema


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _tname(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "a table"}
    return names.get(type(value), type(value).__name__)


def _hname(hint: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", Path: "a path"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))
