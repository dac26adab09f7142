"""Real-broker test harness: a throw-away RabbitMQ node with the MQTT plugin (MQTT 3.1.1).

Usage::

    from tests.support.rabbitmq import RabbitMQ

    with RabbitMQ(cafile=..., certfile=..., keyfile=...) as broker:
        broker.ctl("add_user", "alice", "secret")       # rabbitmqctl against this node
        ... broker.host, broker.port (MQTT), broker.tls_port (MQTTS, mutual TLS)

The node is private to the test: its own node name, Erlang cookie, data/log/config
directories (in a temp dir owned by the ``rabbitmq`` user when we are root, as Debian runs it),
and free loopback ports for AMQP, MQTT, MQTTS, Erlang distribution and its own ``epmd``
(``ERL_EPMD_PORT``), so it never meets a system RabbitMQ or epmd. Readiness is RabbitMQ's
"Server startup complete" log line plus the MQTT port accepting connections.

Like ``Mosquitto``, it offers ``start/stop/kill/restart/close`` and never leaves processes
behind (finalizers, and the kernel's parent-death signal when started from the main thread).
Retained messages live in the node's data directory (the DETS store), so they survive
``restart()``; so do users and permissions.
"""

from __future__ import annotations

import functools
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
import weakref
from pathlib import Path

from .mosquitto import LOOPBACK, PathLike, _free_port, _port_accepts, _reap, _setpriv_pdeathsig

__all__ = ["RabbitMQ", "find_rabbitmq"]

_INSTALL_HINT = ("run `.ci/install-system-deps` (installs the Debian 'rabbitmq-server' "
                 "package, which carries the rabbitmq_mqtt plugin)")
_SCRIPTS = Path("/usr/lib/rabbitmq/bin")
_READY = "Server startup complete"


class _PortTaken(Exception):
    pass


def find_rabbitmq() -> Path:
    """Directory of RabbitMQ's own scripts (not Debian's su wrappers), or RuntimeError."""
    if (_SCRIPTS / "rabbitmq-server").is_file():
        return _SCRIPTS
    found = shutil.which("rabbitmq-server")
    if found:
        return Path(found).resolve().parent
    raise RuntimeError(f"rabbitmq-server not found: {_INSTALL_HINT}")


@functools.cache
def _has_pdeathsig() -> bool:
    return bool(_setpriv_pdeathsig())


def _epmd() -> str:
    found = shutil.which("epmd") or next(iter(sorted(Path("/usr/lib/erlang").glob(
        "erts-*/bin/epmd"))), None)
    if not found:
        raise RuntimeError(f"epmd (Erlang) not found: {_INSTALL_HINT}")
    return str(found)


class RabbitMQ:
    """A RabbitMQ node with the MQTT plugin on 127.0.0.1, for a test session or module.

    Parameters
    ----------
    cafile, certfile, keyfile:
        Open an MQTTS listener (``tls_port``) requiring a client certificate signed by
        ``cafile``; the certificate's CN is the user name (``mqtt.ssl_cert_login``).
    start_timeout:
        Seconds ``start()`` waits for the node (Erlang boots slowly on a loaded machine).
    """

    host = LOOPBACK
    protocol = "3.1.1"  # all the MQTT plugin of RabbitMQ 3.x speaks
    name = "rabbitmq"

    def __init__(self, *, cafile: PathLike | None = None, certfile: PathLike | None = None,
                 keyfile: PathLike | None = None, start_timeout: float = 90.0) -> None:
        tls_parts = (cafile, certfile, keyfile)
        if any(tls_parts) and not all(tls_parts):
            raise ValueError("TLS needs cafile, certfile and keyfile together")
        self.scripts = find_rabbitmq()
        self.workdir = Path(tempfile.mkdtemp(prefix="rabbitmq-"))
        self._dir_finalizer = weakref.finalize(self, shutil.rmtree, str(self.workdir),
                                               ignore_errors=True)
        self.node = f"tcu-test-{uuid.uuid4().hex[:8]}@localhost"
        self.start_timeout = start_timeout
        self.log_path = self.workdir / "rabbitmq.log"
        # As root, run as the 'rabbitmq' user, like the Debian service: it owns the node's files.
        self._user = None
        if os.geteuid() == 0:
            try:
                self._user = pwd.getpwnam("rabbitmq")
            except KeyError:
                pass
        self.tls = all(tls_parts)
        if self.tls:
            tls_dir = self.workdir / "tls"
            tls_dir.mkdir()
            for src, dst in ((cafile, "ca.pem"), (certfile, "server.pem"), (keyfile, "server.key")):
                shutil.copyfile(src, tls_dir / dst)  # readable by the node's user, not ours
        self._pick_ports()
        self._write_files()
        self._proc: subprocess.Popen | None = None
        self._epmd_proc: subprocess.Popen | None = None
        self._finalizers: list[weakref.finalize] = []
        self._lock = threading.RLock()
        self._starts = 0

    # -- files --------------------------------------------------------------------------------

    def _pick_ports(self) -> None:
        self.amqp_port, self.port, self.dist_port, self.epmd_port = (_free_port() for _ in "1234")
        self.tls_port = _free_port() if self.tls else None

    def _write_files(self) -> None:
        """The node's directories, cookie and configuration, and a rabbitmqctl for it."""
        w = self.workdir
        for d in ("mnesia", "log", "plugins-expand"):
            (w / d).mkdir(exist_ok=True)
        if not (w / ".erlang.cookie").exists():
            (w / ".erlang.cookie").write_text(secrets.token_hex(20).upper())
        (w / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq/rabbitmq-env.conf
        (w / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        lines = [
            "# generated by tests/support/rabbitmq.py",
            f"listeners.tcp.default = {LOOPBACK}:{self.amqp_port}",
            f"mqtt.listeners.tcp.default = {LOOPBACK}:{self.port}",
            "mqtt.allow_anonymous = false",  # every client logs in (tests make users)
            "mqtt.vhost = /",
            "mqtt.exchange = amq.topic",
            # no guest/guest: the seeded administrator has a password nobody knows (rabbitmqctl
            # needs none: it authenticates with the Erlang cookie)
            f"default_user = admin-{secrets.token_hex(4)}",
            f"default_pass = {secrets.token_hex(16)}",
            "log.console = true",
            "log.console.level = info",
            "log.file = false",
        ]
        if self.tls:
            t = w / "tls"
            lines += [
                f"mqtt.listeners.ssl.default = {LOOPBACK}:{self.tls_port}",
                f"ssl_options.cacertfile = {t / 'ca.pem'}",
                f"ssl_options.certfile = {t / 'server.pem'}",
                f"ssl_options.keyfile = {t / 'server.key'}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = true",
                "mqtt.ssl_cert_login = true",
                "ssl_cert_login_from = common_name",
            ]
        (w / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        # rabbitmqctl for this node, for scripts (configs/brokers/rabbitmq-permissions.sh)
        env = " ".join(f"{k}={v!s}" for k, v in self._env().items())
        ctl = w / "rabbitmqctl"
        ctl.write_text("#!/bin/sh\n"
                       f"exec env {env} {' '.join(self._as_user())} "
                       f"{self.scripts / 'rabbitmqctl'} -q -n {self.node} \"$@\"\n")
        ctl.chmod(0o755)
        self.ctl_path = ctl
        if self._user is not None:
            for path in [w, *w.rglob("*")]:
                os.chown(path, self._user.pw_uid, self._user.pw_gid, follow_symlinks=False)
            os.chmod(w, 0o755)  # the ctl wrapper is ours to run, too
        (w / ".erlang.cookie").chmod(0o400)
        if self.tls:
            (w / "tls" / "server.key").chmod(0o600)

    def _env(self) -> dict[str, str]:
        w = self.workdir
        return {
            "HOME": str(w),  # the Erlang cookie
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_CONF_ENV_FILE": str(w / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(w / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(w / "advanced.config"),
            "RABBITMQ_MNESIA_BASE": str(w / "mnesia"),
            "RABBITMQ_LOG_BASE": str(w / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(w / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(w / "plugins-expand"),
            "RABBITMQ_PID_FILE": str(w / "rabbitmq.pid"),
            "RABBITMQ_NODE_IP_ADDRESS": LOOPBACK,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": LOOPBACK,
        }

    def _as_user(self, pdeathsig: bool = False) -> list[str]:
        """Prefix running a command as the node's user; *pdeathsig*: and SIGTERMed by the
        kernel if we die (set after the user switch, which would clear it)."""
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            return ["runuser", "-u", "rabbitmq", "--"] if self._user else []
        argv = [setpriv]
        if self._user is not None:
            argv += ["--reuid", "rabbitmq", "--regid", "rabbitmq", "--init-groups"]
        if pdeathsig and _has_pdeathsig():
            argv += ["--pdeathsig", "TERM"]
        return argv + ["--"] if len(argv) > 1 else []

    # -- status -------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def epmd_pid(self) -> int | None:
        return self._epmd_proc.pid if self._epmd_proc else None

    def log_text(self) -> str:
        try:
            return re.sub(r"\x1b\[[0-9;]*m", "", self.log_path.read_text(errors="replace"))
        except FileNotFoundError:
            return ""

    def version(self) -> str:
        """"RabbitMQ 3.10.8 on Erlang 25.2.3", from the node's own start banner."""
        m = re.search(r"Starting (RabbitMQ \S+ on Erlang \S+)", self.log_text())
        return m.group(1) if m else "RabbitMQ (version unknown)"

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<RabbitMQ {self.node} mqtt={self.port} mqtts={self.tls_port} {state}>"

    # -- lifecycle ----------------------------------------------------------------------------

    def _spawn(self, argv: list[str], log, **env: str) -> subprocess.Popen:
        # PDEATHSIG fires when the spawning *thread* exits: only from the main thread
        main = threading.current_thread() is threading.main_thread()
        proc = subprocess.Popen([*self._as_user(pdeathsig=main), *argv], env={**os.environ,
                                **self._env(), **env}, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._finalizers.append(weakref.finalize(self, _reap, proc))
        return proc

    def start(self) -> "RabbitMQ":
        """Start the node; return once it logged startup complete and MQTT accepts connections.
        Raises RuntimeError with the node's log if it does not come up in time."""
        with self._lock:
            if self.running:
                return self
            for attempt in range(3):
                try:
                    return self._start_once()
                except _PortTaken:
                    # lost the race for a freshly picked port: other ports, if never started
                    if self._starts or attempt == 2:
                        self._fail("a port was taken")
                    self._stop_epmd()
                    self._pick_ports()
                    self._write_files()
            raise AssertionError("unreachable")

    def _start_once(self) -> "RabbitMQ":
        with self._lock:
            with open(self.log_path, "ab") as log:
                log.write(f"===== harness: start #{self._starts + 1} of {self.node}\n".encode())
                log.flush()
                offset = log.tell()
                if self._epmd_proc is None or self._epmd_proc.poll() is not None:
                    # our own epmd in the foreground: it goes when we stop it
                    self._epmd_proc = self._spawn([_epmd(), "-port", str(self.epmd_port),
                                                   "-address", LOOPBACK], log)
                # RUNNING_UNDER_SYSTEMD: the script execs the Erlang VM instead of forking it, so
                # our signals reach the VM itself (SIGTERM: clean shutdown; SIGKILL: a crash)
                self._proc = self._spawn([str(self.scripts / "rabbitmq-server")], log,
                                         RUNNING_UNDER_SYSTEMD="true")
            deadline = time.monotonic() + self.start_timeout
            ports = [self.port] + ([self.tls_port] if self.tls else [])
            while True:
                rc = self._proc.poll()
                epmd_gone = self._epmd_proc.poll() is not None  # (its port was taken)
                if rc is not None or epmd_gone:
                    if epmd_gone or "eaddrinuse" in self._log_since(offset):
                        self.kill()
                        raise _PortTaken()
                    self._fail(f"exited (rc={rc})")
                if _READY in self._log_since(offset) and all(
                        _port_accepts(self.host, p) for p in ports):
                    self._starts += 1
                    return self
                if time.monotonic() >= deadline:
                    self._fail(f"not ready within {self.start_timeout:.0f} s")
                time.sleep(0.1)

    def _log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def _fail(self, why: str) -> None:
        self.kill()
        raise RuntimeError(f"RabbitMQ node {self.node} did not start ({why}).\n"
                           f"--- log ({self.log_path}) ---\n{self.log_text()[-6000:]}")

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful stop (SIGTERM: the Erlang VM shuts RabbitMQ down cleanly). Idempotent."""
        with self._lock:
            if self._proc is not None:
                _reap(self._proc, timeout)
                self._proc = None

    def kill(self) -> None:
        """Abrupt stop (SIGKILL of the Erlang VM), like a crash. Idempotent."""
        with self._lock:
            if self._proc is not None:
                if self._proc.poll() is None:
                    try:
                        os.kill(self._proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self._proc.wait(10)
                self._proc = None

    def restart(self, *, kill: bool = False) -> "RabbitMQ":
        """Stop (or kill) and start again on the same ports, with the same data."""
        with self._lock:
            self.kill() if kill else self.stop()
            return self.start()

    def _stop_epmd(self) -> None:
        if self._epmd_proc is not None:
            _reap(self._epmd_proc)
            self._epmd_proc = None

    def close(self) -> None:
        """Stop the node and its epmd, remove the temp dir."""
        self.stop()
        self._stop_epmd()
        self._dir_finalizer()

    def __enter__(self) -> "RabbitMQ":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- administration -----------------------------------------------------------------------

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run rabbitmqctl against this node; its output, or AssertionError saying why not."""
        out = subprocess.run([str(self.ctl_path), *args], capture_output=True, text=True,
                             timeout=timeout, cwd=self.workdir)
        if out.returncode != 0:
            raise AssertionError(f"rabbitmqctl {' '.join(args)}: rc={out.returncode}\n"
                                 f"{out.stdout}{out.stderr}")
        return out.stdout
