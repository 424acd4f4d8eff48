"""Exact binning: pure functions against reference histograms."""

from fractions import Fraction

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from preprocess import binning


def reference_counts(times, units, n_units, spb: Fraction, n_rows):
    """Per-unit histogram with exact rational edges (half-open, each spike once)."""
    out = np.zeros((n_rows, n_units), dtype=np.int64)
    for t, u in zip(times.tolist(), units.tolist()):
        k = int(Fraction(t) / spb)  # floor for non-negative values
        if u >= 0 and k < n_rows:
            out[k, u] += 1
    return out


def test_spike_on_edge_counted_once_in_later_bin():
    times = np.array([0, 299, 300, 600, 601], dtype=np.uint64)
    counts = binning.count_samples(times, np.zeros(5, dtype=np.int64), 0, 3, 1, Fraction(300))
    assert counts[:, 0].tolist() == [2, 1, 2]
    assert counts.sum() == len(times)


def test_fractional_samples_per_bin():
    # 0.01 s at 29999.7 Hz = 299.997 samples per bin: edges at ceil(k * 299.997)
    spb = binning.to_fraction("0.01") * binning.to_fraction("29999.7")
    assert spb == Fraction(299997, 1000)
    assert binning.first_sample(1, spb) == 300
    assert binning.first_sample(1000, spb) == 299997
    times = np.array([299, 300, 299996, 299997], dtype=np.int64)
    rows = binning.count_samples(times, np.zeros(4, dtype=np.int64), 0, 1001, 1, spb)[:, 0]
    assert rows[0] == 1 and rows[1] == 1 and rows[999] == 1 and rows[1000] == 1


@settings(max_examples=60, deadline=None)
@given(spikes=st.lists(st.tuples(st.integers(0, 5000), st.integers(-1, 3)), max_size=200),
       p=st.integers(1, 700), q=st.integers(1, 7), row0=st.integers(0, 5))
def test_count_samples_matches_reference(spikes, p, q, row0):
    spb = Fraction(p, q)
    times, units, n_rows, keep = _block(spikes, spb, row0, 5000, np.int64)
    got = binning.count_samples(times[keep], units[keep], row0, n_rows, 4, spb)
    ref = reference_counts(times, units, 4, spb, row0 + n_rows)[row0:]
    np.testing.assert_array_equal(got, ref)


def _block(spikes, spb: Fraction, row0: int, last_sample: int, unit_dtype):
    """Sorted (times, units) of (time, unit) pairs, the block's rows from row0 to the bin of
    last_sample, and which spikes lie in it."""
    spikes = sorted(spikes)
    times = np.array([s[0] for s in spikes], dtype=np.int64)
    units = np.array([s[1] for s in spikes], dtype=unit_dtype)
    n_rows = binning.n_bins_for_samples(last_sample, spb) - row0
    lo, hi = binning.first_sample(row0, spb), binning.first_sample(row0 + n_rows, spb)
    return times, units, n_rows, (times >= lo) & (times < hi)


@settings(max_examples=30, deadline=None)
@given(spikes=st.lists(st.tuples(st.integers(0, 400), st.integers(-1, 4095)), max_size=300),
       p=st.integers(1, 9), row0=st.integers(0, 5), checked=st.booleans())
def test_count_samples_across_many_tiles(spikes, p, row0, checked):
    """4096 columns: a tile is 16 rows, so a block spans many tiles (the in-place cells)."""
    spb = Fraction(p)
    times, units, n_rows, keep = _block(spikes, spb, row0, 401, np.int32)
    kept_times, kept_units = times[keep], units[keep]
    before = kept_times.copy()
    got = binning.count_samples(kept_times, kept_units, row0, n_rows, 4096, spb, np.uint16, times_checked=checked)
    np.testing.assert_array_equal(got, reference_counts(times, units, 4096, spb, row0 + n_rows)[row0:])
    np.testing.assert_array_equal(kept_times, before)  # the caller's times are never changed


def test_unsorted_times_are_refused_unless_the_caller_checked_them():
    times = np.array([5, 3], dtype=np.int64)
    try:
        binning.count_samples(times, np.zeros(2, dtype=np.int64), 0, 10, 1, Fraction(1))
    except ValueError as err:
        assert "not sorted" in str(err)
    else:
        raise AssertionError("unsorted times were counted")


def test_seconds_binning_is_exact_against_stored_edges():
    b = Fraction(1, 10)
    edges = binning.bin_starts_s(0, 100, b)
    # every stored edge belongs to the bin it starts; the float just below belongs to the previous bin
    k = binning.bin_index_seconds(edges, b)
    np.testing.assert_array_equal(k, np.arange(100))
    below = np.nextafter(edges[1:], -np.inf)
    np.testing.assert_array_equal(binning.bin_index_seconds(below, b), np.arange(99))
    # 0.3 / 0.1 = 2.9999999999999996 in floats, yet 0.3 >= edges[3] decides
    assert binning.bin_index_seconds(np.array([0.3]), b)[0] == (3 if 0.3 >= edges[3] else 2)


def test_count_seconds_blocks_add_up():
    rng = np.random.default_rng(1)
    units = [np.sort(rng.uniform(0, 10, size=200)) for _ in range(3)]
    b = Fraction(1, 20)
    whole = binning.count_seconds(units, 0, 200, b)
    parts = np.concatenate([binning.count_seconds(units, r, 50, b) for r in range(0, 200, 50)])
    np.testing.assert_array_equal(whole, parts)
    assert whole.sum() == sum(len(u) for u in units)


def test_assign_trials_half_open():
    starts = np.array([0.0, 1.0, 2.5])
    stops = np.array([0.5, 2.0, 3.0])
    bins = binning.bin_starts_s(0, 31, Fraction(1, 10))
    trial = binning.assign_trials(bins, starts, stops)
    assert trial[0] == 0 and trial[4] == 0 and trial[5] == -1
    assert trial[10] == 1 and trial[19] == 1 and trial[20] == -1
    assert trial[25] == 2 and trial[30] == -1
    assert trial.dtype == np.int32


def test_average_in_bins_nan_for_empty_bins():
    t = np.array([0.01, 0.02, 0.25])
    v = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    avg = binning.average_in_bins(t, v, 4, Fraction(1, 10))
    np.testing.assert_allclose(avg[0], [2.0, 3.0])
    assert np.isnan(avg[1]).all()
    np.testing.assert_allclose(avg[2], [5.0, 6.0])
    assert avg.dtype == np.float32
