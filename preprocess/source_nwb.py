"""NWB files: the units table (spike times in seconds), the trials table and behavioural
time series read through pynwb into a ``Recording``, and the per-block spike counts.
"""

from __future__ import annotations

import logging
import math
from fractions import Fraction

import numpy as np

from . import binning
from .errors import UserError
from .source_common import (DEFAULT_MAX_BINS, UNIT_SELECTIONS, Recording, Trials, check_float32, check_n_bins,
                            check_n_units, check_trials, int32_labels, label_column)

# log records keep the logger name they had before the split
log = logging.getLogger("preprocess.sources")


def read_nwb(path: str, source: str, bin_size: Fraction, units: str, max_bins: int = DEFAULT_MAX_BINS,
             behavior: list[str] | None = None) -> Recording:
    """Units table (spike times in seconds), trials table, behavioural time series (every
    numeric one but voltage and intervals, or only those named in ``behavior``)."""
    import warnings

    try:
        from pynwb import NWBHDF5IO
    except ImportError as err:  # pragma: no cover - dependency of the package
        raise UserError(f"{source}: reading NWB needs pynwb ({err})")
    io_ = None
    # a file that is not HDF5 (truncated, random bytes, another format) raises OSError in h5py;
    # an HDF5 file that is not NWB raises whatever hdmf/pynwb meet first (ValueError, KeyError,
    # TypeError, their own exception classes): all mean "not a readable NWB file"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hdmf/pynwb warn about namespaces and versions on stderr
        try:
            io_ = NWBHDF5IO(path, mode="r", load_namespaces=True)
            nwb = io_.read()
        except Exception as err:
            if io_ is not None:
                try:
                    io_.close()
                except Exception:
                    pass
            raise UserError(f"{source}: not a readable NWB file ({type(err).__name__}: {str(err)[:200]}); "
                            "check that it is a complete NWB (HDF5) file") from None
        try:
            return _read_nwb_open(nwb, source, path, bin_size, units, max_bins, behavior)
        except UserError:
            raise
        except MemoryError:
            raise UserError(f"{source}: not enough memory to read the NWB contents; use a larger --bin-size or "
                            "select fewer series with --behavior NAME") from None
        except (OSError, KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
            # lazily read datasets of a damaged file fail here
            raise UserError(f"{source}: cannot read the NWB contents ({type(err).__name__}: {str(err)[:200]}); "
                            "check that the file is complete") from None
        finally:
            io_.close()


def _read_nwb_open(nwb, source: str, path: str, bin_size: Fraction, units: str,
                   max_bins: int = DEFAULT_MAX_BINS, behavior: list[str] | None = None) -> Recording:
    if nwb.units is None or len(nwb.units) == 0:
        raise UserError(f"{source}: the NWB file has no units table (nwbfile.units); add the sorted units")
    table = nwb.units
    _check_resolution(table, bin_size, source)
    # the series are found (names checked) before any spike time is read
    series = list(_behaviour_series(nwb, source, behavior))
    columns = set(table.colnames)
    if "spike_times" not in columns:
        raise UserError(f"{source}: units table has no 'spike_times' column")
    ids = np.asarray(table.id[:], dtype=np.int64)
    check_n_units(len(ids), f"{source}: the units table has {len(ids)} rows")
    quality = None
    for col in ("quality", "group", "KSLabel"):
        if col in columns:
            quality = np.array([str(v) for v in table[col][:]], dtype=object)
            break
    if quality is None:
        quality = np.array(["unsorted"] * len(ids), dtype=object)
    wanted = UNIT_SELECTIONS[units]
    if wanted is None:
        keep = np.arange(len(ids))
    else:
        if (quality == "unsorted").all():
            raise UserError(f"{source}: the units table has no 'quality' column; use --units all")
        keep = np.flatnonzero(np.isin(quality, wanted))
        if keep.size == 0:
            raise UserError(f"{source}: no unit has quality {' or '.join(wanted)} "
                            f"(found {sorted(set(quality))}); choose --units mua or all")
    unit_times = []
    for i in keep:
        t = np.asarray(table["spike_times"][int(i)], dtype=np.float64)
        if t.size and (np.any(t < 0) or not np.all(np.isfinite(t))):
            raise UserError(f"{source}: units row {i}: spike times must be finite and >= 0 seconds")
        if np.any(np.diff(t) < 0):
            t = np.sort(t)  # per-unit times in NWB are not required to be sorted: sorting is exact
        unit_times.append(t)
    t_end = max((float(t[-1]) for t in unit_times if t.size), default=0.0)

    trials = None
    if nwb.trials is not None and len(nwb.trials) > 0:
        df_cols = [c for c in nwb.trials.colnames if c not in ("start_time", "stop_time")]
        start = np.asarray(nwb.trials["start_time"][:], dtype=np.float64)
        stop = np.asarray(nwb.trials["stop_time"][:], dtype=np.float64)
        labels, cats = {}, {}
        for col in df_cols:
            values = nwb.trials[col][:]
            arr = np.asarray(values)
            if arr.ndim != 1:
                continue
            if arr.dtype.kind in "iub":
                labels[col] = int32_labels(arr, f"{source}: trials column '{col}'")
            elif arr.dtype.kind == "f":
                if np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
                    labels[col] = int32_labels(arr, f"{source}: trials column '{col}'")
                else:
                    log.info("trials column %r is not integer-valued: not stored as a label", col)
            else:
                labels[col], cats[col] = label_column([str(v) for v in arr], f"{source}: trials column '{col}'")
                if cats[col] is None:
                    del cats[col]
        trials = check_trials(Trials(start, stop, labels, cats), f"{source}: trials table")
        t_end = max(t_end, float(stop.max()))

    for _, ts, shape in series:
        t_end = max(t_end, float(_series_times(ts, shape[0] - 1, shape[0])[0]))
    if not math.isfinite(t_end):
        raise UserError(f"{source}: a behavioural time series has non-finite timestamps; fix its timestamps or rate")
    if t_end <= 0:
        raise UserError(f"{source}: no spikes in the selected units")
    if float(bin_size) > t_end:
        raise UserError(f"--bin-size {float(bin_size)}: longer than the recording ({t_end:.6g} s); "
                        "choose a smaller bin size")
    needed = math.floor(Fraction(t_end) / bin_size) + 1
    check_n_bins(needed, max_bins, f"{source}: the recording ends at {t_end:.6g} s: {needed:.6g} bins of "
                                   f"{float(bin_size):.6g} s")
    n_rows = int(binning.bin_index_seconds(np.array([t_end]), bin_size)[0]) + 1
    _check_behaviour_memory(series, n_rows, bin_size, source)
    binned = {}
    for name, ts, shape in series:
        binned[name] = _average_series(ts, shape, n_rows, bin_size, f"{source}: TimeSeries '{ts.name}'")
    return Recording(format="nwb", path=source, bin_size=bin_size, n_rows=n_rows, unit_ids=ids[keep],
                     unit_quality=quality[keep], files=[path], unit_times_s=unit_times, trials=trials,
                     behavior=binned)


def _check_resolution(table, bin_size: Fraction, source: str) -> None:
    """A bin shorter than the units table's ``resolution`` (the smallest possible difference
    between two spike times, 1/sample rate as spike sorters write it) is refused, like a bin
    shorter than one sample of a Phy folder."""
    resolution = getattr(table, "resolution", None)
    try:
        resolution = float(resolution) if resolution is not None else None
    except (TypeError, ValueError):
        return
    if resolution is None or not math.isfinite(resolution) or resolution <= 0:
        return
    if float(bin_size) < resolution * (1 - 1e-9):
        rate = 1 / resolution
        least = (f"1/{round(rate)} s ({resolution:.6g} s: one sample at {round(rate)} Hz)"
                 if round(rate) >= 1 and abs(rate - round(rate)) <= 1e-9 * rate else f"{resolution!r} s")
        raise UserError(f"--bin-size {float(bin_size):.6g}: shorter than the spike-time resolution of {source} "
                        f"(units table: {resolution:.6g} s); choose a bin size of at least {least}")


# the binned behaviour of an NWB file is held in memory (sums while averaging, float32 results
# until written): refused beyond this, before anything is allocated
MAX_BEHAVIOUR_BYTES = 1 << 30


def _check_behaviour_memory(series: list, n_rows: int, bin_size: Fraction, source: str) -> None:
    if not series:
        return
    columns = [int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1 for _, _, shape in series]
    # float32 results of every series + the float64 sums, counts and temporaries of the largest
    needed = n_rows * (4 * sum(columns) + 16 * max(columns) + 16)
    if needed > MAX_BEHAVIOUR_BYTES:
        names = ", ".join(name for name, _, _ in series[:5]) + (", ..." if len(series) > 5 else "")
        raise UserError(f"{source}: binning its behaviour ({names}: {sum(columns)} values per bin) into {n_rows} "
                        f"bins of {float(bin_size):.6g} s needs {needed / 2**30:.3g} GiB of memory, more than "
                        f"{MAX_BEHAVIOUR_BYTES >> 30} GiB; use a larger --bin-size or select fewer series with "
                        "--behavior NAME")


BEHAVIOUR_CHUNK_VALUES = 1 << 22  # values of a behavioural series read at a time (32 MiB as float64)


def _all_series(nwb):
    """(unique name, TimeSeries) of every TimeSeries in acquisition and the processing modules.

    The one naming rule of both modes (default and ``--behavior``): a series keeps its own
    name; a later one of the same name is prefixed by its container (``<container>_<name>``,
    then ``_2``, ``_3``, ... should that collide too).
    """
    from pynwb import TimeSeries

    containers = list(nwb.acquisition.values())
    for module in nwb.processing.values():
        containers += list(module.data_interfaces.values())
    taken: set[str] = set()
    for obj in containers:
        children = [obj] if isinstance(obj, TimeSeries) else [
            c for c in getattr(obj, "children", []) if isinstance(c, TimeSeries)]
        for ts in children:
            name = ts.name if ts.name not in taken else f"{obj.name}_{ts.name}"
            base, i = name, 1
            while name in taken:
                i += 1
                name = f"{base}_{i}"
            taken.add(name)
            yield name, ts


def _series_shape(ts) -> tuple[tuple[int, ...], np.dtype]:
    data = ts.data
    shape = tuple(getattr(data, "shape", None) or np.shape(data))
    dtype = getattr(data, "dtype", None)
    dtype = np.dtype(dtype) if dtype is not None else np.asarray(data[:1]).dtype
    return shape, dtype


def _binnable(shape: tuple[int, ...], dtype: np.dtype) -> bool:
    return dtype.kind in "iuf" and len(shape) in (1, 2) and shape[0] > 0


def _behaviour_series(nwb, source: str = "NWB file", names: list[str] | None = None):
    """(name, series, shape) of the TimeSeries binned as behaviour, from the processing
    modules and acquisition, named by :func:`_all_series` (the same names in both modes).

    By default every numeric TimeSeries but voltage: ElectricalSeries (the raw acquisition,
    LFP, spike snippets) are skipped with an info line, as are IntervalSeries (+1/-1 interval
    marks, not values). Labs keep them in the same file, and averaging 32 channels of 30 kHz
    raw data into bins made a 10-minute file need 11 GB. With ``names`` (``--behavior``),
    exactly the series of those names (as stored: ``behavior/<name>``), whatever their type;
    a name the file does not have is an error listing the ones it has. Nothing is read here
    but the shape; :func:`_average_series` reads the samples in chunks.
    """
    from pynwb.ecephys import ElectricalSeries
    from pynwb.misc import IntervalSeries

    if names is not None:
        yield from _named_series(nwb, source, names)
        return
    for name, ts in _all_series(nwb):
        if isinstance(ts, (ElectricalSeries, IntervalSeries)):
            log.info("%s: %s '%s' is not behaviour: not binned", source, type(ts).__name__, ts.name)
            continue
        shape, dtype = _series_shape(ts)
        if not _binnable(shape, dtype):
            continue
        yield name, ts, shape


def _named_series(nwb, source: str, names: list[str]):
    found = {name: (ts, type(ts).__name__) for name, ts in _all_series(nwb)}
    for name in names:
        if name not in found:
            listing = ", ".join(f"{n} ({kind})" for n, (_, kind) in sorted(found.items())[:20]) or "none"
            if len(found) > 20:
                listing += f", ... ({len(found)} in all)"
            raise UserError(f"--behavior {name}: {source} has no TimeSeries of that name; its TimeSeries are: "
                            f"{listing}")
    for name in names:
        ts = found[name][0]
        shape, dtype = _series_shape(ts)
        if not _binnable(shape, dtype):
            raise UserError(f"--behavior {name}: TimeSeries '{ts.name}' of {source} holds {dtype} data of shape "
                            f"{shape}; only numeric (n,) or (n, k) series can be averaged into bins")
        yield name, ts, shape


def _series_times(ts, lo: int, hi: int) -> np.ndarray:
    """(hi - lo,) float64 seconds of samples [lo, hi) of ``ts`` (its timestamps, or its rate)."""
    if ts.timestamps is not None:
        return np.asarray(ts.timestamps[lo:hi], dtype=np.float64)
    return float(ts.starting_time or 0.0) + np.arange(lo, hi, dtype=np.float64) / float(ts.rate)


def _average_series(ts, shape: tuple[int, ...], n_rows: int, bin_size: Fraction, where: str) -> np.ndarray:
    """Mean of the samples of ``ts`` (its data of ``shape`` (n,) or (n, k)) over each of
    ``n_rows`` bins, read in chunks of about ``BEHAVIOUR_CHUNK_VALUES`` values (memory: the
    (n_rows, k) sums, not the series). Returns (n_rows, k) float32, NaN for bins without
    (finite) samples."""
    n, k = int(shape[0]), int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    sums = np.zeros((n_rows, k), dtype=np.float64)
    counts = np.zeros(n_rows, dtype=np.float64)
    step = max(1, BEHAVIOUR_CHUNK_VALUES // max(1, k))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        data = np.asarray(ts.data[lo:hi])
        check_float32(data, where)
        binning.accumulate_in_bins(sums, counts, _series_times(ts, lo, hi), data.reshape(hi - lo, -1), bin_size)
    return binning.mean_of_bins(sums, counts)


def count_nwb_block(unit_times: list[np.ndarray], row0: int, row1: int, bin_size: Fraction) -> np.ndarray:
    return binning.count_seconds(unit_times, row0, row1 - row0, bin_size)
