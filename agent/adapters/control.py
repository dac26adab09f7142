"""The running agent's local control socket: JSON lines over a Unix socket.

A request is one line `{"v": 1, "topic": "signals", ...}`; the answer is one line
`{"v": 1, "topic": "signals", "data": {...}}` or `{"v": 1, "topic": ..., "error": "..."}`. A
handler may instead return an iterator (`watch`): each item is sent as a line until the client
closes. One handler per topic (`register`), so other parts add theirs (diagnostics, power).
Handlers run on the connection's thread: they read thread-safe views or snapshots the core
thread took, never the core itself.

Who may connect: root, the agent's own user and members of the configured group (the peer's
uid from SO_PEERCRED); anyone else gets one JSON error line. The socket is mode 0660, in the
group where it exists.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import socket
import stat
import struct
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import ControlError

log = logging.getLogger("agent.adapters.control")

VERSION = 1
MAX_LINE = 64 * 1024
MAX_CLIENTS = 16
Handler = Callable[[dict], Any]  # request -> JSON-able data, or an iterator of them


class ControlServer:
    def __init__(self, path: str | os.PathLike, group: str = "tcu-agent"):
        self.path = Path(path)
        self.group = group
        self.handlers: dict[str, Handler] = {}
        self._sock: socket.socket | None = None
        self._ino = None
        self._stop = threading.Event()
        self._clients = threading.BoundedSemaphore(MAX_CLIENTS)
        self._thread: threading.Thread | None = None

    def register(self, topic: str, handler: Handler) -> None:
        if topic in self.handlers:
            raise ValueError(f"control topic {topic!r} registered twice")
        self.handlers[topic] = handler

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> "ControlServer":
        """Bind and listen; raises ControlError (the caller logs it and runs without)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if _answers(self.path):
                raise ControlError(f"{self.path}: another agent is answering on it")
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise ControlError(f"{self.path}: exists and is not a socket")
            self.path.unlink()  # a stale socket of an agent that died
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o117)  # never world-accessible, not even between bind and chmod
        try:
            sock.bind(str(self.path))
        except OSError as e:
            sock.close()
            raise ControlError(f"{self.path}: cannot bind: {e.strerror or e}") from None
        finally:
            os.umask(old)
        os.chmod(self.path, 0o660)
        gid = _gid(self.group)
        if gid is not None:
            try:
                os.chown(self.path, -1, gid)
            except OSError as e:  # not a member of the group: root and our uid still work
                log.warning("control socket %s: cannot give it to group %s: %s", self.path,
                            self.group, e.strerror)
        sock.listen(8)
        sock.settimeout(0.5)
        self._ino = os.stat(self.path).st_ino
        self._sock = sock
        self._thread = threading.Thread(target=self._accept, name="control", daemon=True)
        self._thread.start()
        log.info("control socket on %s", self.path)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._sock:
            _answers(self.path)  # a connection wakes accept() now, not at its next timeout
        if self._thread:
            self._thread.join(2)
        if self._sock:
            self._sock.close()
            try:
                if os.stat(self.path).st_ino == self._ino:  # still ours, not a newer agent's
                    self.path.unlink()
            except OSError:
                pass

    # -- connections ----------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if self._stop.is_set():
                conn.close()
                return
            if not self._clients.acquire(blocking=False):
                _send(conn, {"v": VERSION, "error": f"busy: {MAX_CLIENTS} clients connected"})
                conn.close()  # not lingering here: the accept thread must not wait
                continue
            threading.Thread(target=self._serve, args=(conn,), name="control-client",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(None)
            why = self._refused(conn)
            if why:
                _send(conn, {"v": VERSION, "error": why})
                _linger(conn)
                return
            reader = conn.makefile("rb")
            while not self._stop.is_set():
                line = reader.readline(MAX_LINE + 1)
                if not line:
                    return
                if not self._answer(conn, line):
                    return
        except OSError:
            pass  # the client went away
        finally:
            conn.close()
            self._clients.release()

    def _answer(self, conn: socket.socket, line: bytes) -> bool:
        """Answer one request line; False when the connection should end."""
        try:
            req = json.loads(line)
        except ValueError:
            return _send(conn, {"v": VERSION, "error": "not a JSON line"})
        if not isinstance(req, dict):
            return _send(conn, {"v": VERSION, "error": "a request is a JSON object"})
        topic = req.get("topic")
        head = {"v": VERSION, "topic": topic}
        if "id" in req:
            head["id"] = req["id"]
        if req.get("v") != VERSION:
            return _send(conn, {**head, "error": f"unsupported version {req.get('v')!r} "
                                                 f"(this agent speaks {VERSION})"})
        handler = self.handlers.get(topic)
        if handler is None:
            return _send(conn, {**head, "error": f"unknown topic {topic!r} (topics: "
                                                 f"{', '.join(sorted(self.handlers))})"})
        try:
            data = handler(req)
        except (ValueError, TypeError, ControlError) as e:  # a bad parameter
            return _send(conn, {**head, "error": str(e)})
        except Exception as e:  # a handler bug must not take the socket down
            log.exception("control topic %s failed", topic)
            return _send(conn, {**head, "error": f"internal error: {type(e).__name__}: {e}"})
        if isinstance(data, Iterator):
            for item in data:
                if self._stop.is_set() or not _send(conn, {**head, "data": item}):
                    return False
            return True
        return _send(conn, {**head, "data": data})

    def _refused(self, conn: socket.socket) -> str:
        pid, uid, gid = struct.unpack("3i", conn.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        if uid in (0, os.getuid()):
            return ""
        group = _gid(self.group)
        if group is not None and (gid == group or _member(uid, self.group)):
            return ""
        return (f"permission denied: uid {uid} is not root, the agent's user (uid "
                f"{os.getuid()}) or a member of group {self.group}")


def _send(conn: socket.socket, obj: dict) -> bool:
    try:
        conn.sendall(json.dumps(obj, default=str, separators=(",", ":")).encode() + b"\n")
        return True
    except OSError:
        return False


def _linger(conn: socket.socket) -> None:
    """Close after the last line was read: closing with the client's request unread would
    reset the connection and lose that line."""
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(1.0)
        while conn.recv(4096):
            pass
    except OSError:
        pass


def _gid(group: str) -> int | None:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        return None


def _member(uid: int, group: str) -> bool:
    try:
        user = pwd.getpwuid(uid)
        g = grp.getgrnam(group)
    except KeyError:
        return False
    return user.pw_gid == g.gr_gid or user.pw_name in g.gr_mem


def _answers(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


# -- the client side (tcu-agent status / monitor) ----------------------------------------------

class ControlClient:
    """One connection to a running agent's control socket."""

    def __init__(self, path: str | os.PathLike, timeout: float = 5.0):
        self.path = Path(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(self.path))
        except FileNotFoundError:
            self._sock.close()
            raise ControlError(f"no agent is running: no control socket at {self.path}") from None
        except ConnectionRefusedError:
            self._sock.close()
            raise ControlError(f"no agent is running: nothing answers on {self.path}") from None
        except PermissionError:
            self._sock.close()
            raise ControlError(f"{self.path}: permission denied (root, the agent's user or "
                               "group tcu-agent may connect)") from None
        except OSError as e:
            self._sock.close()
            raise ControlError(f"{self.path}: cannot connect: {e.strerror or e}") from None
        self._reader = self._sock.makefile("rb")

    def request(self, topic: str, **params) -> Any:
        self._write(topic, params)
        return self._data(self._line(), topic)

    def stream(self, topic: str, **params) -> Iterator[Any]:
        self._write(topic, params)
        self._sock.settimeout(None)
        while True:
            yield self._data(self._line(), topic)

    def close(self) -> None:
        self._reader.close()
        self._sock.close()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self, topic: str, params: dict) -> None:
        try:
            self._sock.sendall(json.dumps({"v": VERSION, "topic": topic, **params}).encode()
                               + b"\n")
        except OSError as e:
            raise ControlError(f"{self.path}: the agent closed the connection: "
                               f"{e.strerror or e}") from None

    def _line(self) -> dict:
        try:
            line = self._reader.readline(MAX_LINE * 64)
        except OSError as e:  # a timeout included
            raise ControlError(f"{self.path}: no answer from the agent: {e}") from None
        if not line:
            raise ControlError(f"{self.path}: the agent closed the connection")
        try:
            return json.loads(line)
        except ValueError:
            raise ControlError(f"{self.path}: not a JSON answer: {line[:80]!r}") from None

    def _data(self, answer: dict, topic: str) -> Any:
        if "error" in answer:
            raise ControlError(f"{self.path}: {answer['error']}")
        return answer.get("data")
