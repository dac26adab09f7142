"""BatchBuilder: rows built as samples arrive, put back in time order when a sample is late."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.batch import BatchBuilder, Column


def reference(samples):
    """What a closed batch must hold, computed from the samples alone: t0 the earliest first
    sample of a signal, each signal's times made non-decreasing (a late one takes its
    predecessor's time, never earlier than t0), dt from t0."""
    firsts: dict[str, int] = {}
    for name, t, _ in samples:
        firsts.setdefault(name, t)
    t0 = min(firsts.values())
    sig: dict[str, list] = {}
    last: dict[str, int] = {}
    for name, t, v in samples:
        t = max(t, last.get(name, t0))
        last[name] = t
        sig.setdefault(name, []).append((t - t0, v))
    return t0, max(last.values()), sig


samples_st = st.lists(st.tuples(st.sampled_from("abcd"), st.integers(1000, 1100),
                                st.integers(0, 9) | st.sampled_from(["x", "yy"])),
                      min_size=1, max_size=30)


@settings(max_examples=300, deadline=None)
@given(samples_st)
def test_closed_batch_equals_the_reference(samples):
    cols = {name: Column(name) for name in "abcd"}
    b = BatchBuilder(max_age_ms=10_000, max_bytes=1 << 20)
    for name, t, v in samples:
        b.add(cols[name], t, v)
    assert b.open_samples == len(samples)
    batch = b.close()
    t0, t_end, sig = reference(samples)
    assert (batch.t0, batch.t_end, batch.samples) == (t0, t_end, len(samples))
    assert batch.sig == sig
    assert all(not c.buf for c in cols.values()) and b.close() is None
    assert not b.late and b.t0 == -1  # the next batch starts clean


def test_in_order_rows_are_handed_over_as_built():
    """No late sample: the batch holds the rows built on the way, no second pass over them."""
    col = Column("a")
    b = BatchBuilder()
    for i, t in enumerate((1000, 1000, 1005, 1010)):
        b.add(col, t, i)
    rows = col.buf
    batch = b.close()
    assert batch.sig["a"] is rows and rows == [(0, 0), (0, 1), (5, 2), (10, 3)]


def test_a_sample_before_t0_in_a_new_column_is_late():
    a, c = Column("a"), Column("c")
    b = BatchBuilder()
    b.add(a, 1000, 1)
    b.add(c, 990, 2)  # another bus's clock lags: earlier than the batch's first sample
    assert b.late
    batch = b.close()
    assert batch.t0 == 990 and batch.sig == {"a": [(10, 1)], "c": [(0, 2)]}
