"""Real-broker test harness: a throw-away ``mosquitto`` plus small MQTT helpers.

Usage::

    from tests.support.mosquitto import Mosquitto, Consumer, publish

    with Mosquitto() as broker:                       # 127.0.0.1:<free port>
        with Consumer(broker.host, broker.port, "t/#") as c:
            publish(broker.host, broker.port, "t/1", b"hi")
            c.wait_for(lambda msgs: any(m.payload == b"hi" for m in msgs))

TLS (server auth): ``Mosquitto(cafile=..., certfile=..., keyfile=...)``;
mutual TLS: add ``require_certificate=True`` (and ``use_identity_as_username=True``
to make the certificate's CN the user name). Persistence (retained messages
survive ``restart()``): ``Mosquitto(persistence=True)``. Access control:
``acl_file=``, ``password_file=`` (see ``make_password_file``), ``allow_anonymous=False``.
The clients speak MQTT 5 unless given ``protocol="3.1.1"``; ``username=``/``password=``
log in.

Processes are never left behind: every spawned broker is terminated when the
``Mosquitto`` object is closed, garbage-collected, or at interpreter exit, and
(when ``setpriv`` is available and the broker is started from the main
thread) the kernel sends it SIGTERM if the test process dies abruptly.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import paho.mqtt.client as mqtt

__all__ = [
    "Mosquitto",
    "Consumer",
    "Message",
    "ConnectResult",
    "publish",
    "try_connect",
    "try_publish",
    "find_mosquitto",
    "make_password_file",
    "topics",
]

LOOPBACK = "127.0.0.1"
_INSTALL_HINT = "run `.ci/install-system-deps` (installs the Debian 'mosquitto' package)"

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------
# locating the binary
# --------------------------------------------------------------------------


def find_mosquitto() -> str:
    """Path of the mosquitto binary, or RuntimeError with an install hint."""
    found = shutil.which("mosquitto")
    if found:
        return found
    # Debian installs it in /usr/sbin, which is not on every user's PATH.
    for cand in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(cand, os.X_OK):
            return cand
    raise RuntimeError(f"mosquitto binary not found on PATH or in /usr/sbin: {_INSTALL_HINT}")


def _setpriv_pdeathsig() -> list[str]:
    """Prefix that makes the kernel SIGTERM the child if its parent dies."""
    setpriv = shutil.which("setpriv")
    if not setpriv:
        return []
    try:
        out = subprocess.run(
            [setpriv, "--help"], capture_output=True, text=True, timeout=5
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [setpriv, "--pdeathsig", "TERM", "--"] if "--pdeathsig" in out else []


_PDEATHSIG_PREFIX: list[str] | None = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _reap(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Terminate *proc* (SIGTERM, then SIGKILL) and wait for it. Idempotent."""
    if proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------
# broker
# --------------------------------------------------------------------------


class Mosquitto:
    """A real mosquitto broker on 127.0.0.1:<port> for one test (or module).

    Parameters
    ----------
    port:
        Fixed port, or ``None`` to pick a free one on first ``start()``.
        Once chosen the port never changes (``restart()`` reuses it).
    cafile, certfile, keyfile:
        Enable TLS on the listener (all three needed).
    require_certificate:
        Mutual TLS: clients must present a cert signed by ``cafile``.
    persistence:
        Keep retained messages / sessions across ``restart()``. The database
        lives in ``persistence_dir`` (default: ``<workdir>/persist``) and is
        saved on every change, so it survives ``kill()`` too.
    workdir:
        Where config, log and (default) persistence go. A temp dir, removed by
        ``close()``, is used when omitted.
    acl_file, password_file:
        Mosquitto's ``acl_file`` / ``password_file`` (per-client topic rights, logins).
    allow_anonymous:
        Let clients without a user name in (the default; off with an ACL).
    use_identity_as_username:
        Mutual TLS: the client certificate's CN is the user name (for the ACL).
    extra_config:
        Extra lines appended to the generated mosquitto.conf.
    start_timeout:
        Seconds ``start()`` waits for the port to accept connections.
    """

    host = LOOPBACK

    def __init__(
        self,
        *,
        port: int | None = None,
        cafile: PathLike | None = None,
        certfile: PathLike | None = None,
        keyfile: PathLike | None = None,
        require_certificate: bool = False,
        persistence: bool = False,
        persistence_dir: PathLike | None = None,
        workdir: PathLike | None = None,
        acl_file: PathLike | None = None,
        password_file: PathLike | None = None,
        allow_anonymous: bool = True,
        use_identity_as_username: bool = False,
        extra_config: Sequence[str] = (),
        start_timeout: float = 5.0,
        log_type: Sequence[str] = ("all",),
    ) -> None:
        tls_parts = (cafile, certfile, keyfile)
        if any(tls_parts) and not all(tls_parts):
            raise ValueError("TLS needs cafile, certfile and keyfile together")
        if require_certificate and not all(tls_parts):
            raise ValueError("require_certificate=True needs cafile/certfile/keyfile")
        self.binary = find_mosquitto()  # fail early, with the install hint

        self._owns_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="mosquitto-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"

        self._fixed_port = port is not None
        self._port: int | None = port
        self.cafile = Path(cafile) if cafile else None
        self.certfile = Path(certfile) if certfile else None
        self.keyfile = Path(keyfile) if keyfile else None
        self.require_certificate = require_certificate
        self.persistence = persistence or persistence_dir is not None
        self.persistence_dir = (
            Path(persistence_dir) if persistence_dir else self.workdir / "persist"
        )
        if use_identity_as_username and not require_certificate:
            raise ValueError("use_identity_as_username=True needs require_certificate=True")
        self.acl_file = Path(acl_file) if acl_file else None
        self.password_file = Path(password_file) if password_file else None
        self.allow_anonymous = allow_anonymous
        self.use_identity_as_username = use_identity_as_username
        self.extra_config = list(extra_config)
        self.start_timeout = start_timeout
        self.log_type = list(log_type)

        self._proc: subprocess.Popen | None = None
        self._proc_finalizer: weakref.finalize | None = None
        self._lock = threading.RLock()
        self._starts = 0
        if self._owns_workdir:
            self._dir_finalizer = weakref.finalize(
                self, shutil.rmtree, str(self.workdir), ignore_errors=True
            )

    # -- properties -------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("broker port not chosen yet: call start() first")
        return self._port

    @property
    def tls(self) -> bool:
        return self.certfile is not None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        """Everything mosquitto logged so far (all starts of this broker)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<Mosquitto {self.host}:{self._port} tls={self.tls} {state}>"

    # -- config -----------------------------------------------------------

    def _config_text(self, port: int) -> str:
        lines = ["# generated by tests/support/mosquitto.py"]
        if os.geteuid() == 0:
            # As root mosquitto drops to user 'mosquitto', which could not read
            # our 0600 keys nor write the workdir: stay who we are.
            lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
        lines += ["log_dest stderr"]
        lines += [f"log_type {t}" for t in self.log_type]
        lines += [
            "log_timestamp true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "connection_messages true",
        ]
        if self.persistence:
            self.persistence_dir.mkdir(parents=True, exist_ok=True)
            lines += [
                "persistence true",
                f"persistence_location {str(self.persistence_dir).rstrip('/')}/",
                "persistence_file mosquitto.db",
                # save after every change: the DB survives kill() as well
                "autosave_on_changes true",
                "autosave_interval 1",
            ]
        else:
            lines.append("persistence false")
        if self.acl_file:
            lines.append(f"acl_file {self.acl_file}")
        if self.password_file:
            lines.append(f"password_file {self.password_file}")
        lines += ["", f"listener {port} {LOOPBACK}",
                  f"allow_anonymous {'true' if self.allow_anonymous else 'false'}"]
        if self.tls:
            lines += [
                f"cafile {self.cafile}",
                f"certfile {self.certfile}",
                f"keyfile {self.keyfile}",
                f"require_certificate {'true' if self.require_certificate else 'false'}",
            ]
            if self.use_identity_as_username:
                lines.append("use_identity_as_username true")
        lines += self.extra_config
        return "\n".join(lines) + "\n"

    # -- lifecycle --------------------------------------------------------

    def start(self) -> "Mosquitto":
        """Start the broker; return once its port accepts TCP connections.

        Raises RuntimeError (including mosquitto's log) if it does not come up
        within ``start_timeout`` seconds. No-op if already running.
        """
        with self._lock:
            if self.running:
                return self
            deadline = time.monotonic() + self.start_timeout
            attempts = 0
            while True:
                attempts += 1
                if self._port is None:
                    self._port = _free_port()
                outcome = self._spawn_and_wait(deadline)
                if outcome == "ok":
                    return self
                if outcome == "in-use":
                    if not self._fixed_port and self._starts == 0 and attempts < 5:
                        # Lost the race for a freshly picked port: pick another.
                        self._port = None
                        continue
                    if time.monotonic() < deadline:
                        # Same port required (restart): e.g. TIME_WAIT, retry.
                        time.sleep(0.1)
                        continue
                raise RuntimeError(
                    f"mosquitto did not start on {self.host}:{self._port} "
                    f"within {self.start_timeout}s ({outcome}).\n"
                    f"config {self.config_path}:\n{self._safe_read(self.config_path)}\n"
                    f"--- mosquitto log ({self.log_path}) ---\n{self.log_text()}"
                )

    @staticmethod
    def _safe_read(p: Path) -> str:
        try:
            return p.read_text()
        except OSError as e:  # pragma: no cover
            return f"<unreadable: {e}>"

    def _spawn_and_wait(self, deadline: float) -> str:
        """Spawn once. Returns 'ok', 'in-use', 'exited (rc=N)' or 'timeout'."""
        global _PDEATHSIG_PREFIX
        port = self.port
        self.config_path.write_text(self._config_text(port))
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0

        if _PDEATHSIG_PREFIX is None:
            _PDEATHSIG_PREFIX = _setpriv_pdeathsig()
        # PDEATHSIG fires when the *thread* that spawned the child exits, so
        # only use it from the main thread (whose exit is the process's exit).
        prefix = (
            _PDEATHSIG_PREFIX if threading.current_thread() is threading.main_thread() else []
        )
        argv = [*prefix, self.binary, "-c", str(self.config_path)]
        with open(self.log_path, "ab") as log:
            log.write(
                f"===== harness: start #{self._starts + 1} on port {port}: "
                f"{' '.join(argv)}\n".encode()
            )
            log.flush()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,  # Ctrl-C in the terminal is ours to handle
            )
        self._proc = proc
        self._proc_finalizer = weakref.finalize(self, _reap, proc)

        while True:
            rc = proc.poll()
            if rc is not None:
                self._forget_proc()
                if "Address already in use" in self._log_since(log_offset):
                    return "in-use"
                return f"exited (rc={rc})"
            # "mosquitto version X running" is logged only after every
            # listener is bound: a foreign process holding the port can't
            # fool us into "ready".
            if " running" in self._log_since(log_offset) and _port_accepts(self.host, port):
                self._starts += 1
                return "ok"
            if time.monotonic() >= deadline:
                _reap(proc)
                self._forget_proc()
                return "timeout"
            time.sleep(0.02)

    def _forget_proc(self) -> None:
        if self._proc_finalizer is not None:
            self._proc_finalizer.detach()
        self._proc_finalizer = None
        self._proc = None

    def stop(self, timeout: float = 5.0) -> None:
        """Graceful stop (SIGTERM; SIGKILL after *timeout*). Idempotent."""
        with self._lock:
            if self._proc is not None:
                _reap(self._proc, timeout)
                self._forget_proc()

    def kill(self) -> None:
        """Abrupt stop (SIGKILL), like a crash / power loss. Idempotent."""
        with self._lock:
            proc = self._proc
            if proc is not None:
                if proc.poll() is None:
                    try:
                        os.kill(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait(timeout=5)
                self._forget_proc()

    def restart(self, *, kill: bool = False) -> "Mosquitto":
        """Stop (or kill) and start again on the same port."""
        with self._lock:
            self.kill() if kill else self.stop()
            return self.start()

    def close(self) -> None:
        """Stop the broker and remove the temp workdir (if we created it)."""
        self.stop()
        if self._owns_workdir:
            self._dir_finalizer()

    def __enter__(self) -> "Mosquitto":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------
# clients
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    qos: int = 0


@dataclass(frozen=True)
class ConnectResult:
    ok: bool
    detail: str


def make_password_file(path: PathLike, users: dict[str, str]) -> Path:
    """A mosquitto password file (hashed with mosquitto_passwd) for *users* (name: password)."""
    path = Path(path)
    path.write_text("".join(f"{u}:{p}\n" for u, p in users.items()))
    path.chmod(0o600)
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    subprocess.run([tool, "-U", str(path)], check=True, capture_output=True, timeout=30)
    return path


def _new_client(
    client_id: str | None,
    *,
    ca: PathLike | None,
    cert: PathLike | None,
    key: PathLike | None,
    reconnect: bool = True,
    protocol: str = "5",
    username: str | None = None,
    password: str | None = None,
    session: bool = False,
) -> mqtt.Client:
    if (cert is None) != (key is None):
        raise ValueError("client cert and key go together")
    if protocol not in ("5", "3.1.1"):
        raise ValueError(f"protocol must be '5' or '3.1.1', not {protocol!r}")
    v5 = protocol == "5"
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id or f"test-{uuid.uuid4().hex[:12]}",
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        # 3.1.1: a persistent session is clean_session=False (MQTT 5: see _connect)
        clean_session=None if v5 else not session,
        reconnect_on_failure=reconnect,
    )
    if username is not None:
        client.username_pw_set(username, password)
    if ca is not None or cert is not None:
        client.tls_set(
            ca_certs=str(ca) if ca is not None else None,
            certfile=str(cert) if cert is not None else None,
            keyfile=str(key) if key is not None else None,
        )
    return client


class _FirstOutcome:
    """Records the outcome of a client's first connection attempt: a CONNACK
    (success or refusal) or a disconnect before any CONNACK."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: ConnectResult | None = None

    def connack(self, reason_code) -> None:
        if self.result is None:
            self.result = ConnectResult(not reason_code.is_failure, f"CONNACK: {reason_code}")
        self.done.set()

    def dropped(self, reason_code) -> None:
        if self.result is None:
            self.result = ConnectResult(False, f"disconnected before CONNACK: {reason_code}")
        self.done.set()

    def wait(self, timeout: float) -> ConnectResult:
        if not self.done.wait(timeout):
            return ConnectResult(False, f"no CONNACK within {timeout}s")
        assert self.result is not None
        return self.result


def _connect(client: mqtt.Client, host: str, port: int, keepalive: int,
             session: bool = False) -> ConnectResult | None:
    """client.connect(); a ConnectResult on immediate failure, else None. *session*: keep
    the session (MQTT 5: clean start off, an hour's session expiry) across disconnects."""
    kw = {}
    if session and client.protocol == mqtt.MQTTv5:
        props = mqtt.Properties(mqtt.PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        kw = {"clean_start": False, "properties": props}
    try:
        client.connect(host, port, keepalive=keepalive, **kw)
    except Exception as e:  # ssl.SSLError, ConnectionRefusedError, ...
        return ConnectResult(False, f"connect() failed: {type(e).__name__}: {e}")
    return None


def try_connect(
    host: str,
    port: int,
    *,
    ca: PathLike | None = None,
    cert: PathLike | None = None,
    key: PathLike | None = None,
    client_id: str | None = None,
    timeout: float = 5.0,
    protocol: str = "5",
    username: str | None = None,
    password: str | None = None,
) -> ConnectResult:
    """Connect once (MQTT v5) and report whether the broker accepted us.

    ``ok`` is True only when a successful CONNACK arrived. TLS / TCP errors,
    a refusing CONNACK or a dropped connection all give ``ok=False`` with the
    reason in ``detail``. (With TLS 1.3 a rejected client certificate shows up
    after the handshake, as a dropped connection, not as a connect() error.)
    """
    client = _new_client(client_id, ca=ca, cert=cert, key=key, reconnect=False,
                         protocol=protocol, username=username, password=password)
    first = _FirstOutcome()
    client.on_connect = lambda c, u, f, rc, p: first.connack(rc)
    client.on_disconnect = lambda c, u, f, rc, p: first.dropped(rc)
    failed = _connect(client, host, port, 10)
    if failed is not None:
        return failed
    client.loop_start()
    try:
        return first.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()


def publish(
    host: str,
    port: int,
    topic: str,
    payload: bytes | str,
    *,
    qos: int = 1,
    retain: bool = False,
    ca: PathLike | None = None,
    cert: PathLike | None = None,
    key: PathLike | None = None,
    timeout: float = 5.0,
    protocol: str = "5",
    username: str | None = None,
    password: str | None = None,
) -> None:
    """Connect, publish one message, wait until the broker has it (QoS>0),
    disconnect. Raises AssertionError if the broker refuses us."""
    client = _new_client(None, ca=ca, cert=cert, key=key, reconnect=False,
                         protocol=protocol, username=username, password=password)
    first = _FirstOutcome()
    client.on_connect = lambda c, u, f, rc, p: first.connack(rc)
    client.on_disconnect = lambda c, u, f, rc, p: first.dropped(rc)
    res = _connect(client, host, port, 10)
    if res is None:
        client.loop_start()
        res = first.wait(timeout)
    try:
        if not res.ok:
            raise AssertionError(f"publish: could not connect to {host}:{port}: {res.detail}")
        info = client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout)
        if qos > 0 and not info.is_published():
            raise AssertionError(f"publish to {topic!r} not acknowledged within {timeout}s")
    finally:
        client.disconnect()
        client.loop_stop()


def try_publish(
    host: str,
    port: int,
    topic: str,
    payload: bytes | str,
    *,
    retain: bool = False,
    ca: PathLike | None = None,
    cert: PathLike | None = None,
    key: PathLike | None = None,
    timeout: float = 5.0,
    protocol: str = "5",
    username: str | None = None,
    password: str | None = None,
    client_id: str | None = None,
) -> str:
    """Publish one QoS 1 message and say what the broker did with it, for tests of refusals:
    "acked", "refused: <reason>" (an MQTT 5 PUBACK with a failure reason), "closed: <reason>"
    (the broker dropped the connection instead of a PUBACK), "not connected: <detail>" or
    "no PUBACK within <timeout>s"."""
    client = _new_client(client_id, ca=ca, cert=cert, key=key, reconnect=False,
                         protocol=protocol, username=username, password=password)
    first = _FirstOutcome()
    outcome: list[str] = []
    done = threading.Event()

    def on_publish(c, u, mid, rc, p):
        outcome.append(f"refused: {rc}" if rc.is_failure else "acked")
        done.set()

    def on_disconnect(c, u, f, rc, p):
        first.dropped(rc)
        outcome.append(f"closed: {rc}")
        done.set()

    client.on_connect = lambda c, u, f, rc, p: first.connack(rc)
    client.on_disconnect = on_disconnect
    client.on_publish = on_publish
    res = _connect(client, host, port, 10)
    if res is None:
        client.loop_start()
        res = first.wait(timeout)
    try:
        if not res.ok:
            return f"not connected: {res.detail}"
        client.publish(topic, payload, qos=1, retain=retain)
        if not done.wait(timeout):
            return f"no PUBACK within {timeout}s"
        return outcome[0]
    finally:
        client.disconnect()
        client.loop_stop()


class Consumer:
    """Subscribes to *topic* (QoS 1 by default) and records every message.

    Reconnects (and resubscribes) automatically if the broker restarts.
    ``messages`` returns a snapshot list of :class:`Message`. With ``session=True`` the
    broker keeps the subscription while we are away (a broker restart included, if it
    persists sessions) and delivers what was published meanwhile: give a ``client_id``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        topic: str = "#",
        *,
        qos: int = 1,
        client_id: str | None = None,
        ca: PathLike | None = None,
        cert: PathLike | None = None,
        key: PathLike | None = None,
        keepalive: int = 10,
        protocol: str = "5",
        username: str | None = None,
        password: str | None = None,
        session: bool = False,
    ) -> None:
        self.host, self.port, self.topic, self.qos = host, port, topic, qos
        self.keepalive = keepalive
        self.session = session
        self._client = _new_client(client_id, ca=ca, cert=cert, key=key, protocol=protocol,
                                   username=username, password=password, session=session)
        self._client.reconnect_delay_set(min_delay=0.1, max_delay=1)  # type: ignore[arg-type]
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._cond = threading.Condition()
        self._messages: list[Message] = []
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._errors: list[str] = []
        self._first = _FirstOutcome()
        self.connects = 0  # successful CONNACKs so far (reconnects included)
        self._started = False

    # -- paho callbacks (network thread) ---------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self._first.connack(reason_code)
        if reason_code.is_failure:
            self._errors.append(f"CONNACK: {reason_code}")
            return
        self.connects += 1
        self._connected.set()
        client.subscribe(self.topic, qos=self.qos)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self._first.dropped(reason_code)
        self._connected.clear()
        self._subscribed.clear()

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties):
        bad = [rc for rc in reason_code_list if rc.is_failure]
        if bad:
            self._errors.append(f"SUBACK for {self.topic!r}: {bad}")
        else:
            self._subscribed.set()

    def _on_message(self, client, userdata, msg):
        m = Message(msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos)
        with self._cond:
            self._messages.append(m)
            self._cond.notify_all()

    # -- API ------------------------------------------------------------------

    def start(self, timeout: float = 5.0) -> "Consumer":
        """Connect and subscribe; returns once the SUBACK arrived.

        Raises AssertionError at once if the first connection is refused
        (TLS rejection, CONNACK failure, ...), or after *timeout*.
        """
        end = time.monotonic() + timeout
        seen = len(self._errors)
        if not self._started:
            failed = _connect(self._client, self.host, self.port, self.keepalive, self.session)
            if failed is not None:
                raise AssertionError(f"consumer: {self.host}:{self.port}: {failed.detail}")
            self._client.loop_start()
            self._started = True
            res = self._first.wait(timeout)
            if not res.ok:
                self.stop()
                raise AssertionError(f"consumer: {self.host}:{self.port}: {res.detail}")
        self.wait_subscribed(max(0.0, end - time.monotonic()), since=seen)
        return self

    def wait_subscribed(self, timeout: float = 5.0, *, since: int | None = None) -> None:
        """Block until (re)connected and (re)subscribed; fail at once on a SUBACK refusing
        the filter (one after the first *since* errors: default, from now on)."""
        end = time.monotonic() + timeout
        seen = len(self._errors) if since is None else since
        while not self._subscribed.wait(min(0.05, max(0.0, end - time.monotonic()))):
            refused = any(e.startswith("SUBACK") for e in self._errors[seen:])
            if time.monotonic() < end and not refused:
                continue
            raise AssertionError(
                f"consumer for {self.topic!r} on {self.host}:{self.port} not subscribed "
                f"within {timeout}s (connected={self.connected}, errors={self._errors})"
            )

    def stop(self) -> None:
        if self._started:
            self._client.disconnect()
            self._client.loop_stop()
            self._started = False

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def errors(self) -> list[str]:
        """Refusals seen so far (a failed CONNACK, a SUBACK refusing the filter)."""
        return list(self._errors)

    def wait_disconnected(self, timeout: float = 5.0) -> None:
        end = time.monotonic() + timeout
        while self._connected.is_set():
            if time.monotonic() >= end:
                raise AssertionError(f"consumer still connected after {timeout}s")
            time.sleep(0.02)

    @property
    def messages(self) -> list[Message]:
        with self._cond:
            return list(self._messages)

    def clear(self) -> None:
        with self._cond:
            self._messages.clear()

    def wait_for(
        self,
        predicate: Callable[[list[Message]], object],
        timeout: float = 5.0,
        what: str | None = None,
    ) -> list[Message]:
        """Wait until ``predicate(messages)`` is truthy; return the messages.

        Raises AssertionError with a summary of what *was* received on timeout.
        """
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                snapshot = list(self._messages)
                if predicate(snapshot):
                    return snapshot
                remaining = end - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.1))
        raise AssertionError(self._summary(what or _describe(predicate), timeout, snapshot))

    def wait_for_count(self, n: int, timeout: float = 5.0) -> list[Message]:
        return self.wait_for(lambda ms: len(ms) >= n, timeout, what=f">= {n} messages")

    def _summary(self, what: str, timeout: float, msgs: list[Message]) -> str:
        lines = [
            f"timed out after {timeout}s waiting for {what}",
            f"  consumer: topic={self.topic!r} broker={self.host}:{self.port} "
            f"connected={self.connected} connects={self.connects} errors={self._errors}",
            f"  {len(msgs)} message(s) received" + (", last 20:" if len(msgs) > 20 else ":"),
        ]
        for m in msgs[-20:]:
            p = m.payload if len(m.payload) <= 80 else m.payload[:80] + b"..."
            lines.append(f"    {m.topic} retain={m.retain} qos={m.qos} {p!r}")
        return "\n".join(lines)

    def __enter__(self) -> "Consumer":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _describe(predicate: Callable) -> str:
    name = getattr(predicate, "__name__", repr(predicate))
    return "predicate" if name == "<lambda>" else f"predicate {name}"


def topics(msgs: Iterable[Message]) -> list[str]:
    """Convenience for predicates/assertions: the topics, in order."""
    return [m.topic for m in msgs]
