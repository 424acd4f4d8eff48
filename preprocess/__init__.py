"""Offline stages: spike-sort output or binned arrays -> recording store (Zarr v3).

Modules:
    store       the recording-store schema (docs/contracts.md section 4), atomic writer and validating reader
    binning     exact, pure binning functions (integer sample indices or float seconds)
    sources     readers for Phy/Kilosort folders, NWB files and binned .npz files
    bin_spikes  the ``python -m preprocess.bin_spikes`` command
    simulate    a simulated center-out reach session (Phy folder + trials table, and NWB)
"""

__version__ = "0.1.0"
