"""Readers for the three source formats: Phy/Kilosort folders, NWB files, binned .npz.

Each reader validates its input and returns a ``Recording``: everything the writer
needs, with the spike data left on disk (memory-mapped, read block by block) so that
memory stays bounded whatever the recording length.

The readers live in ``source_phy``, ``source_nwb`` and ``source_npz``, what they share in
``source_common``; this module dispatches to them (``read_source``) and keeps their public
names importable from ``preprocess.sources``.
"""

from __future__ import annotations

from fractions import Fraction

from .errors import UsageError
from .source_common import (COUNT_MAX, DEFAULT_MAX_BINS, HASH_PIECE_BYTES, INT32, MAX_UNITS, UNIT_SELECTIONS,
                            LocalCopy, PhySpikes, Recording, Trials, check_float32, check_n_bins, check_n_units,
                            check_trials, combine_hashes, detect_format, exact_number, hash_piece, hash_pieces,
                            int32_labels, label_column, read_trials_table, read_tsv, thread_buffer)
from .source_npz import read_npz
from .source_nwb import count_nwb_block, read_nwb
from .source_phy import (DENSE_LUT_IDS, PARAMS_PY_MAX_BYTES, UnsortedSpikes, cluster_labels, cluster_spike_counts,
                         count_phy_block, iter_npy_chunks, parse_params_py, read_phy, sample_rate_of_params)
from .store import filesystem  # re-exported: bin_spikes calls sources.filesystem

__all__ = [
    "COUNT_MAX", "DEFAULT_MAX_BINS", "DENSE_LUT_IDS", "HASH_PIECE_BYTES", "INT32", "MAX_UNITS",
    "PARAMS_PY_MAX_BYTES", "UNIT_SELECTIONS", "LocalCopy", "PhySpikes", "Recording", "Trials", "UnsortedSpikes",
    "check_float32", "check_n_bins", "check_n_units", "check_trials", "cluster_labels", "cluster_spike_counts",
    "combine_hashes", "count_nwb_block", "count_phy_block", "detect_format", "exact_number", "filesystem",
    "hash_piece", "hash_pieces", "int32_labels", "iter_npy_chunks", "label_column", "parse_params_py",
    "read_npz", "read_nwb", "read_phy", "read_source", "read_trials_table", "read_tsv", "sample_rate_of_params",
    "thread_buffer",
]


def read_source(source: str, fmt: str, local: str, bin_size: Fraction | None, units: str,
                sample_rate: Fraction | None, trials_path: str | None,
                max_bins: int = DEFAULT_MAX_BINS, behavior: list[str] | None = None) -> Recording:
    """Dispatch to the reader of ``fmt`` (``local`` is a local path of ``source``);
    ``behavior``: the NWB TimeSeries to bin (None: every numeric one but voltage)."""
    if behavior is not None and fmt != "nwb":
        why = "an .npz stores all its float arrays" if fmt == "npz" else "a Phy folder has no behaviour"
        raise UsageError(f"--behavior applies to NWB files only ({why}); drop it")
    if fmt == "npz":
        if trials_path:
            raise UsageError("--trials applies to Phy folders only (an .npz carries its own 'trial' array)")
        return read_npz(local, source, bin_size, max_bins)
    if bin_size is None:
        bin_size = Fraction(1, 10)
    if fmt == "phy":
        return read_phy(local, source, bin_size, units, sample_rate, trials_path, max_bins)
    if trials_path:
        raise UsageError("--trials applies to Phy folders only (an NWB file carries its own trials table)")
    return read_nwb(local, source, bin_size, units, max_bins, behavior)
