"""python-can's slcan bus, read in chunks.

python-can's slcanBus reads its serial port one byte per call (a system call or two per
byte, some 27 bytes per frame): 126-165 µs of CPU per frame, and a reader that saturated near
5,500 frames/s. Here `_read` takes whatever the port holds in one read, returns the first
complete message and queues the rest (python-can's `_recv_internal` takes queued messages
first). Everything else, the parsing included, is python-can's.
"""

from __future__ import annotations

import re
import time

from can.interfaces.slcan import error_check, slcanBus

_MESSAGE = re.compile(rb"[^\r\a]*[\r\a]")  # ends in CR (a frame, OK) or BEL (error)


class BufferedSlcanBus(slcanBus):
    def _read(self, timeout: float | None) -> str | None:
        buf = self._buffer
        port = self.serialPortOrig
        deadline = None if timeout is None else time.monotonic() + timeout
        with error_check("Could not read from serial device"):
            while True:
                first = self._split(buf)
                if first is not None:
                    return first
                chunk = port.read(max(1, port.in_waiting))  # at most the port's timeout
                if chunk:
                    buf.extend(chunk)
                elif deadline is not None and time.monotonic() >= deadline:
                    return None

    def _split(self, buf: bytearray) -> str | None:
        """The first complete message in buf; the other complete ones go to the queue."""
        first = None
        end = 0
        for m in _MESSAGE.finditer(buf):
            text = m.group().decode(errors="replace")
            if first is None:
                first = text
            else:
                self._queue.put(text)
            end = m.end()
        if end:
            del buf[:end]
        return first
