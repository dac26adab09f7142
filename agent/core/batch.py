"""Telemetry batches (PROTOCOL.md §3): samples grouped per signal with a shared time base."""

from __future__ import annotations

import cbor2


class Batch:
    """A closed batch. `sig` maps output name -> [[dt_ms, value], ...] in time order.

    BatchBuilder.close() only takes the columns' sample lists (`Batch.of`); t0, t_end and
    `sig` are worked out on first use, which for live telemetry is on the thread that signs
    and stores the batch (app/batchstore.py), not in the core loop."""

    __slots__ = ("_t0", "_t_end", "_sig", "_cols", "samples")

    def __init__(self, t0: int, t_end: int, sig: dict, samples: int):
        self._t0, self._t_end, self._sig = t0, t_end, sig
        self._cols: list | None = None
        self.samples = samples

    @classmethod
    def of(cls, cols: list[tuple[str, list]], samples: int) -> "Batch":
        """From (output name, [(t_ms, value), ...]) columns, each in arrival order."""
        b = cls.__new__(cls)
        b._cols, b.samples = cols, samples
        return b

    @property
    def t0(self) -> int:  # UTC ms of the first sample
        self._build()
        return self._t0

    @property
    def t_end(self) -> int:  # UTC ms of the last sample
        self._build()
        return self._t_end

    @property
    def sig(self) -> dict:
        self._build()
        return self._sig

    def _build(self) -> None:
        cols = self._cols
        if cols is None:
            return
        t0 = min(buf[0][0] for _out, buf in cols)
        t_end = t0
        sig = {}
        for out, buf in cols:
            rows = []
            last = t0
            for t, v in buf:
                if t < last:
                    t = last  # clocks of two buses may disagree; keep each signal in time order
                rows.append([t - t0, v])
                last = t
            sig[out] = rows
            if last > t_end:
                t_end = last
        self._t0, self._t_end, self._sig, self._cols = t0, t_end, sig, None

    def __eq__(self, other) -> bool:
        return (type(other) is type(self) and self.samples == other.samples
                and self.t0 == other.t0 and self.t_end == other.t_end and self.sig == other.sig)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(t0={self.t0}, t_end={self.t_end}, samples={self.samples})"

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
        self.buf: list = []  # (t_ms, value) of the open batch


class BatchBuilder:
    """Accumulates samples in columns; closes a batch by age or estimated size.

    The hot path in TelemetryCore inlines add(); keep the two in step.
    """

    __slots__ = ("max_age_ms", "max_bytes", "touched", "t0", "n", "budget", "closed",
                 "closed_samples")

    def __init__(self, max_age_ms: int = 1000, max_bytes: int = 65536):
        self.max_age_ms = max_age_ms
        self.max_bytes = max_bytes
        self.closed: list[Batch] = []
        self.closed_samples = 0  # samples in every batch closed so far
        self.touched: list[Column] = []  # columns with samples in the open batch
        self.t0 = -1  # time of the first sample of the open batch
        self.n = 0
        self.budget = max_bytes - 64  # estimated bytes left before the batch must close

    @property
    def open_samples(self) -> int:
        return self.n

    @property
    def deadline_ms(self) -> int | None:
        """When the open batch must close by age, or None when nothing is open."""
        return None if self.t0 < 0 else self.t0 + self.max_age_ms

    def add(self, col: Column, t_ms: int, value) -> None:
        buf = col.buf
        if not buf:
            self.touched.append(col)
            self.budget -= len(col.out) + 4
            if self.t0 < 0:
                self.t0 = t_ms
        buf.append((t_ms, value))
        self.n += 1
        # Worst-case CBOR size of a sample: array(1) + dt(<=5) + value(<=9, or the string).
        self.budget -= 15 if type(value) is not str else 15 + len(value)
        if self.budget <= 0:
            self.close()

    def close(self) -> Batch | None:
        """Close the open batch (if any) and append it to `closed`: O(columns), the rows are
        built when the batch is first read."""
        if not self.n:
            return None
        cols = []
        for col in self.touched:
            cols.append((col.out, col.buf))
            col.buf = []
        batch = Batch.of(cols, self.n)
        self.closed.append(batch)
        self.closed_samples += self.n
        self.touched = []
        self.t0 = -1
        self.n = 0
        self.budget = self.max_bytes - 64
        return batch

    def take(self) -> list[Batch]:
        out, self.closed = self.closed, []
        return out
