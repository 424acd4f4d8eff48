"""Peak memory of ``bin_spikes`` on an NWB file as labs write it; prints one JSON line.

The file (written in chunks, so writing it needs little memory either): ``--minutes`` of
``--channels`` channels of raw int16 voltage at 30 kHz in acquisition (an
``ElectricalSeries``), LFP at 1 kHz in ``processing/ecephys``, ``--units`` units of Poisson
spikes, and a 100 Hz 2-d behavioural series. The issue's bound: a 10-minute, 32-channel file
bins at <= 0.5 GB peak RSS (the voltage was once averaged into bins: 11 GB). Measured: the
peak RSS of the ``bin_spikes`` process tree (sampled every 20 ms, see benchmarks/binning.py),
its wall time, the file size, and that the store's behaviour holds the velocity only.

Usage: python benchmarks/nwb_memory.py [--minutes 10] [--channels 32] [--units 64] [--bin-voltage] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.binning import run_bin_spikes  # noqa: E402

RAW_RATE, LFP_RATE = 30_000.0, 1_000.0


def noise_series(n_samples: int, channels: int, seed: int):
    """An hdmf chunk iterator over (n_samples, channels) int16 noise, generated per chunk
    (deterministic per chunk start): the raw series never sits in memory whole."""
    from hdmf.data_utils import GenericDataChunkIterator

    class Noise(GenericDataChunkIterator):
        def _get_data(self, selection):
            rows = selection[0]
            rng = np.random.default_rng((seed, rows.start or 0))
            block = rng.integers(-500, 500, size=(rows.stop - (rows.start or 0), channels), dtype=np.int16)
            return block[:, selection[1]]

        def _get_maxshape(self):
            return (n_samples, channels)

        def _get_dtype(self):
            return np.dtype(np.int16)

    return Noise(buffer_gb=0.05, chunk_shape=(min(n_samples, 30_000), channels), display_progress=False)


def write_lab_nwb(path: Path, minutes: float, channels: int, n_units: int, seed: int = 0) -> None:
    from pynwb import NWBHDF5IO, NWBFile, TimeSeries
    from pynwb.behavior import BehavioralTimeSeries
    from pynwb.ecephys import LFP, ElectricalSeries

    duration = minutes * 60.0
    nwb = NWBFile(session_description="lab-style file", identifier="bench",
                  session_start_time=datetime(2020, 1, 1, tzinfo=timezone.utc))
    rng = np.random.default_rng(seed)
    for _ in range(n_units):
        nwb.add_unit(spike_times=np.sort(rng.uniform(0, duration, size=int(rng.uniform(2, 20) * duration))))
    device = nwb.create_device(name="probe")
    group = nwb.create_electrode_group(name="shank", description="s", location="CA1", device=device)
    for _ in range(channels):
        nwb.add_electrode(group=group, location="CA1")
    region = nwb.create_electrode_table_region(list(range(channels)), "all")

    nwb.add_acquisition(ElectricalSeries(name="raw", data=noise_series(int(duration * RAW_RATE), channels, seed + 1),
                                         electrodes=region, rate=RAW_RATE))
    ecephys = nwb.create_processing_module("ecephys", "LFP")
    lfp = noise_series(int(duration * LFP_RATE), channels, seed + 2)
    ecephys.add(LFP(electrical_series=ElectricalSeries(name="lfp", data=lfp,
                                                       electrodes=region, rate=LFP_RATE)))
    behavior = nwb.create_processing_module("behavior", "behaviour")
    t = np.arange(0, duration, 0.01)
    behavior.add(BehavioralTimeSeries(time_series=[
        TimeSeries(name="velocity", data=np.stack([np.sin(t), np.cos(t)], 1), unit="cm/s", timestamps=t)]))
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--units", type=int, default=64)
    p.add_argument("--bin-size", default="0.1")
    p.add_argument("--bin-voltage", action="store_true",
                   help="also bin the raw voltage (--behavior raw --behavior velocity): read in chunks too")
    p.add_argument("--keep", default=None, help="write the file and store here (kept) instead of a temp folder")
    args = p.parse_args()
    import zarr

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        nwb, store = folder / "lab.nwb", folder / "lab.zarr"
        if not nwb.exists():
            write_lab_nwb(nwb, args.minutes, args.channels, args.units)
        wall, peak_gb = run_bin_spikes([str(nwb), "--out", str(store), "--bin-size", args.bin_size, "--units", "all",
                                        "--overwrite", *(["--behavior", "raw", "--behavior", "velocity"]
                                                         if args.bin_voltage else [])])
        g = zarr.open_group(str(store), mode="r")
        result = {"minutes": args.minutes, "channels": args.channels, "raw_rate_hz": RAW_RATE,
                  "file_gb": round(nwb.stat().st_size / 1024**3, 3), "peak_rss_gb": round(peak_gb, 3),
                  "wall_s": round(wall, 2), "bins": int(g["counts"].shape[0]), "units": int(g["counts"].shape[1]),
                  "behavior": sorted(g["behavior"].keys()), "bound_gb": 0.5, "within_bound": peak_gb <= 0.5}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
