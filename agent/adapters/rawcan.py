"""Reading a SocketCAN CAN_RAW socket in bulk: recvmmsg(2), up to VLEN frames per system call.

Python's socket module has no recvmmsg; one recvmsg per frame costs a system call and a
handful of Python objects (the ancillary list, its tuples) per frame, which at a full bus
was about half of the reader thread's CPU. Here one ctypes call fills VLEN `struct can_frame`
slots and their control blocks (SO_TIMESTAMPNS, SO_RXQ_OVFL) laid out at fixed offsets, and
two struct.iter_unpack passes read them. ctypes releases the GIL for the call.

Where libc has no recvmmsg (or ctypes cannot load it), `RawReader` falls back to one
recvmsg per frame with the same results.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct

# linux/can.h, socket(7)
CAN_ERR_FLAG, CAN_RTR_FLAG = 0x20000000, 0x40000000
CAN_MTU, CANFD_MTU = 16, 72
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)
VLEN = 64  # frames per recvmmsg call

_TIMESPEC = struct.Struct("@ll")
_U32 = struct.Struct("=I")
_TS_SPACE = socket.CMSG_SPACE(_TIMESPEC.size)
_CTRL = _TS_SPACE + socket.CMSG_SPACE(_U32.size)  # control bytes per frame
_HDR = socket.CMSG_LEN(0)  # struct cmsghdr
# One frame's control block, as the kernel fills it (timestamp first, then the drop count
# when the socket has dropped any): only the timespec and the cmsg type of the second.
_CMSG = struct.Struct(f"@{_HDR - 4}xi")  # cmsg_type of a cmsghdr at offset 0
_TIMES = struct.Struct(f"@{_HDR}xll{_CTRL - _HDR - _TIMESPEC.size}x")
_HEAD = struct.Struct("=IB")


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.c_void_p), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


def _libc_recvmmsg():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.recvmmsg
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


_recvmmsg = _libc_recvmmsg()


class RawReader:
    """Reads (index, t, can_id, data) tuples from a CAN_RAW socket that has SO_TIMESTAMPNS
    and SO_RXQ_OVFL on. `fd`: CAN FD frames may arrive (72-byte slots, else 16)."""

    def __init__(self, sock: socket.socket, fd: bool = False, bulk: bool = True):
        self.sock = sock
        self.mtu = CANFD_MTU if fd else CAN_MTU
        # Data as the kernel's slot holds it: 8 bytes for classic frames, 64 for FD; cut
        # to the frame's length only when it is shorter.
        self._frame = struct.Struct(f"=IB3x{self.mtu - 8}s")
        self.full = self.mtu - 8
        self.bulk = bulk and _recvmmsg is not None
        if self.bulk:
            self._setup()

    def _setup(self) -> None:
        n, mtu = VLEN, self.mtu
        self._frames = ctypes.create_string_buffer(n * mtu)
        self._control = ctypes.create_string_buffer(n * _CTRL)
        self._iov = (_Iovec * n)()
        self._msgs = (_Mmsghdr * n)()
        base_f, base_c = ctypes.addressof(self._frames), ctypes.addressof(self._control)
        for i in range(n):
            self._iov[i].iov_base = base_f + i * mtu
            self._iov[i].iov_len = mtu
            h = self._msgs[i].msg_hdr
            h.msg_iov = ctypes.addressof(self._iov[i])
            h.msg_iovlen = 1
            h.msg_control = base_c + i * _CTRL
            h.msg_controllen = _CTRL
        # The kernel rewrites msg_controllen and msg_flags: restored from this copy each call.
        self._pristine = bytes(self._msgs)
        self._msgs_addr = ctypes.addressof(self._msgs)
        self._size = ctypes.sizeof(self._msgs)

    def read(self, index: int, out: list, limit: int, lo: float, hi: float,
             now: float) -> tuple[int, int | None]:
        """Append what is waiting (at most up to `limit` frames in `out`), stamping frames
        whose timestamp is missing or outside (lo, hi) with `now`. Returns (error frames
        seen, the socket's drop count from the last frame that carried one, or None)."""
        if not self.bulk:
            return self._read_each(index, out, limit, lo, hi, now)
        fd = self.sock.fileno()
        frame_iter, times_iter = self._frame.iter_unpack, _TIMES.iter_unpack
        mtu, full, append = self.mtu, self.full, out.append
        errors, drops = 0, None
        while len(out) < limit:
            ctypes.memmove(self._msgs_addr, self._pristine, self._size)
            ctypes.memset(self._control, 0, len(self._control))  # no stale timestamps
            n = _recvmmsg(fd, self._msgs_addr, min(VLEN, limit - len(out)),
                          socket.MSG_DONTWAIT, None)
            if n < 0:
                err = ctypes.get_errno()
                if err in (errno.EAGAIN, errno.EINTR):
                    break
                raise OSError(err, f"recvmmsg: {errno.errorcode.get(err, err)}")
            if n == 0:
                break
            frames = self._frames.raw[:n * mtu]
            control = self._control.raw[:n * _CTRL]
            for (can_id, size, data), (sec, ns) in zip(frame_iter(frames), times_iter(control)):
                if can_id & (CAN_ERR_FLAG | CAN_RTR_FLAG):
                    if can_id & CAN_ERR_FLAG:
                        errors += 1
                    continue
                t = sec + ns * 1e-9
                if not lo < t < hi:
                    t = now
                append((index, t, can_id, data if size == full else data[:size]))
            last = (n - 1) * _CTRL + _TS_SPACE  # the last frame's second control message
            if _CMSG.unpack_from(control, last)[0] == SO_RXQ_OVFL:
                drops = _U32.unpack_from(control, last + _HDR)[0]
            if n < VLEN:
                break
        return errors, drops

    def _read_each(self, index, out, limit, lo, hi, now) -> tuple[int, int | None]:
        recv, head, timespec = self.sock.recvmsg, _HEAD.unpack_from, _TIMESPEC.unpack_from
        errors, drops = 0, None
        while len(out) < limit:
            try:
                cf, ancillary, _flags, _addr = recv(CANFD_MTU, _CTRL, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            t = now
            for _level, kind, value in ancillary:
                if kind == SO_TIMESTAMPNS:
                    sec, ns = timespec(value)
                    t = sec + ns * 1e-9
                elif kind == SO_RXQ_OVFL:
                    drops = _U32.unpack_from(value)[0]
            can_id, size = head(cf)
            if can_id & (CAN_ERR_FLAG | CAN_RTR_FLAG):
                if can_id & CAN_ERR_FLAG:
                    errors += 1
                continue
            if not lo < t < hi:
                t = now
            out.append((index, t, can_id, cf[8:8 + size]))
        return errors, drops
