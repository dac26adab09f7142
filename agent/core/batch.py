"""Telemetry batches (PROTOCOL.md §3): samples grouped per signal with a shared time base."""

from __future__ import annotations

from dataclasses import dataclass

import cbor2


@dataclass(frozen=True, slots=True)
class Batch:
    """A closed batch. `sig` maps output name -> [(dt_ms, value), ...] in time order (CBOR
    arrays on the wire; tuples, because tuples of numbers and strings leave the garbage
    collector's young generations at its first pass, where lists stay in them)."""

    t0: int  # UTC ms of the first sample
    t_end: int  # UTC ms of the last sample
    sig: dict
    samples: int

    def payload(self, vin: str, seq: int, drop: int = 0) -> dict:
        """The protocol payload for this batch. `drop` = samples lost since the previous one."""
        body = {"v": 1, "vin": vin, "seq": seq, "t0": self.t0, "sig": self.sig}
        if drop:
            body["drop"] = drop
        return body


def encode_payload(payload: dict) -> bytes:
    """Deterministic CBOR (canonical: sorted keys, shortest float that keeps the value)."""
    return cbor2.dumps(payload, canonical=True)


class Column:
    """The samples of one output name in the open batch (SignalState extends it)."""

    __slots__ = ("out", "buf")

    def __init__(self, out: str):
        self.out = out
        # The open batch's rows as they will be sent: (dt_ms from the batch's t0, value)
        # (built as samples arrive, so that closing a batch is not another pass over them).
        self.buf: list = []


class BatchBuilder:
    """Accumulates samples in columns; closes a batch by age or estimated size.

    The hot path in TelemetryCore inlines add(); keep them in step.
    """

    __slots__ = ("max_age_ms", "max_bytes", "touched", "t0", "budget", "closed",
                 "closed_samples", "late")

    def __init__(self, max_age_ms: int = 1000, max_bytes: int = 65536):
        self.max_age_ms = max_age_ms
        self.max_bytes = max_bytes
        self.closed: list[Batch] = []
        self.closed_samples = 0  # samples in every batch closed so far
        self.touched: list[Column] = []  # columns with samples in the open batch
        self.t0 = -1  # time of the first sample of the open batch
        self.budget = max_bytes - 64  # estimated bytes left before the batch must close
        # A sample earlier than t0 or than its column's previous one (clocks of two buses, or
        # a frame and a tick, may disagree): close() then puts the rows back in time order.
        self.late = False

    @property
    def open_samples(self) -> int:
        # Counted when asked (status, the end of a replay), not on the hot path.
        return sum(len(col.buf) for col in self.touched)

    @property
    def deadline_ms(self) -> int | None:
        """When the open batch must close by age, or None when nothing is open."""
        return None if self.t0 < 0 else self.t0 + self.max_age_ms

    def open_column(self, col: Column, t_ms: int) -> int:
        """Before the first sample of `col` in the open batch (at `t_ms`): its dt."""
        self.touched.append(col)
        self.budget -= len(col.out) + 4
        if self.t0 < 0:
            self.t0 = t_ms
        elif t_ms < self.t0:
            self.late = True
        return t_ms - self.t0

    def add(self, col: Column, t_ms: int, value) -> None:
        buf = col.buf
        if not buf:
            self.open_column(col, t_ms)
        dt = t_ms - self.t0
        if dt < 0 or (buf and dt < buf[-1][0]):
            self.late = True
        buf.append((dt, value))
        # Worst-case CBOR size of a sample: array(1) + dt(<=5) + value(<=9, or the string).
        self.budget -= 15 if type(value) is not str else 15 + len(value)
        if self.budget <= 0:
            self.close()

    def close(self) -> Batch | None:
        """Close the open batch (if any) and append it to `closed`."""
        if not self.touched:
            return None
        n = self.open_samples
        sig = {}
        if self.late:
            t0, t_end = self._reorder(sig)
        else:  # the rows are ready as they are
            t0 = self.t0
            t_end = t0
            for col in self.touched:
                buf = col.buf
                sig[col.out] = buf
                col.buf = []
                if buf[-1][0] + t0 > t_end:
                    t_end = buf[-1][0] + t0
        batch = Batch(t0, t_end, sig, n)
        self.closed.append(batch)
        self.closed_samples += n
        self.touched = []
        self.t0 = -1
        self.budget = self.max_bytes - 64
        self.late = False
        return batch

    def _reorder(self, sig: dict) -> tuple[int, int]:
        """Rows against the earliest sample, each signal in time order (a late sample is
        taken at its predecessor's time)."""
        base = self.t0
        t0 = min(base + col.buf[0][0] for col in self.touched)
        t_end = t0
        for col in self.touched:
            last = t0
            rows = []
            for dt, v in col.buf:
                t = base + dt
                if t < last:
                    t = last
                rows.append((t - t0, v))
                last = t
            sig[col.out] = rows
            col.buf = []
            if last > t_end:
                t_end = last
        return t0, t_end

    def take(self) -> list[Batch]:
        out, self.closed = self.closed, []
        return out
