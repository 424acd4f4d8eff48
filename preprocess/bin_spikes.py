"""``python -m preprocess.bin_spikes SOURCE --out URL``: spike-sort output -> recording store.

SOURCE is a Kilosort/Phy folder, an NWB file or a binned .npz (detected, or forced
with --format), as a path or any fsspec URL. The store is written with exact
half-open bins and published atomically; see ``preprocess.store``.

Large recordings are binned out of core: the spike files are memory-mapped and each
block of bins (one Zarr shard) is counted with searchsorted + bincount and written by
its own dask task, so writes never share a shard and memory stays bounded.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
import uuid
from fractions import Fraction

import dask
import dask.local
import dask.multiprocessing
import dask.threaded
import numpy as np
from dask.callbacks import Callback
from tqdm import tqdm

from . import allocator, binning, source_nwb, sources
from .errors import OneLineParser, UsageError, UserError, run_cli, setup_logging
from .block_tasks import CountOverflow, write_block
from .store import COUNTS_COMPRESSOR, StoreLayout, StoreWriter, count_dtype, quality_codes

log = logging.getLogger("preprocess.bin_spikes")
PROG = "python -m preprocess.bin_spikes"
# the get functions themselves: dask.compute given a scheduler's name imports dask.distributed
# (when installed) to look for a client, 0.2-0.4 s of a run's serial start-up
LOCAL_GETS = {"threads": dask.threaded.get, "processes": dask.multiprocessing.get, "synchronous": dask.local.get_sync}
LOCAL_SCHEDULERS = tuple(LOCAL_GETS)
MAX_WORKERS = 1024
PROCESSES_FROM_BLOCKS = 8  # below this many blocks, starting worker processes costs more than it saves


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Bin spike-sorted units into a recording store (Zarr v3): exact half-open bins "
                    "[k*b, (k+1)*b) from t = 0, published atomically.",
        epilog="Examples:\n"
               "  python -m preprocess.bin_spikes kilosort_out/ --out session.zarr --bin-size 0.01\n"
               "  python -m preprocess.bin_spikes session.nwb --out s3://bucket/session.zarr \\\n"
               "      --storage-options '{\"anon\": false}'\n"
               "  python -m preprocess.bin_spikes binned.npz --out binned.zarr\n"
               "Units: --units good keeps clusters labelled good; mua keeps good and mua; all keeps every "
               "cluster with spikes (noise and unlabelled too). Spike times must be sorted (Kilosort writes "
               "them sorted); unsorted input is refused, not silently sorted.\n"
               f"Bounds: at most --max-bins bins (default {sources.DEFAULT_MAX_BINS}) and {sources.MAX_UNITS} units "
               "(distinct cluster ids); a bin size of at least one sample period (NWB: the units table's "
               "resolution, when given); counts up to 2**32-1; trial labels that fit int32; NWB behaviour of at "
               f"most {source_nwb.MAX_BEHAVIOUR_BYTES >> 30} GiB in memory. Larger inputs are refused before "
               "anything is allocated.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE", help="Phy/Kilosort folder, .nwb file or binned .npz (path or URL)")
    p.add_argument("--out", required=True, metavar="URL", help="where to write the store (path, memory://, s3://...)")
    p.add_argument("--format", choices=("phy", "nwb", "npz"), help="force the source format (default: detect)")
    p.add_argument("--bin-size", metavar="SECONDS",
                   help="bin size in seconds (default 0.1; an .npz uses its own); at least one sample period "
                        "when the sample rate is known")
    p.add_argument("--max-bins", metavar="N", default=str(sources.DEFAULT_MAX_BINS),
                   help=f"refuse outputs of more than N bins (rows), before allocating anything "
                        f"(default {sources.DEFAULT_MAX_BINS} = 2**31)")
    p.add_argument("--units", choices=tuple(sources.UNIT_SELECTIONS), default="good",
                   help="which sorted units to keep (default: good)")
    p.add_argument("--trials", metavar="TABLE.tsv",
                   help="Phy only: trials table with start_s, stop_s and optional label columns (e.g. target)")
    p.add_argument("--behavior", action="append", metavar="NAME",
                   help="NWB only: bin only this TimeSeries as behaviour/NAME (repeatable; an unknown name is an "
                        "error listing the file's series); default: every numeric TimeSeries except "
                        "ElectricalSeries (voltage) and IntervalSeries")
    p.add_argument("--sample-rate", metavar="HZ", help="sample rate of spike_times.npy (default: params.py)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    p.add_argument("--storage-options", metavar="JSON", default="{}",
                   help="fsspec storage options for SOURCE and --out, as JSON (e.g. endpoint, credentials)")
    p.add_argument("--scheduler", metavar="ADDR", default="auto",
                   help="dask.distributed scheduler address (tcp://host:port; SOURCE and --out must be reachable "
                        "from its workers), or a local one: processes, threads, synchronous; default auto: "
                        "processes (spawned, so fsspec stays safe) for large local or object-storage outputs, "
                        "threads otherwise")
    p.add_argument("--workers", metavar="N", default=None,
                   help=f"local dask workers, 1 to {MAX_WORKERS} (default: CPU count)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _positive_fraction(text: str | None, option: str) -> Fraction | None:
    if text is None:
        return None
    exponent = re.search(r"[eE]\s*([-+]?\d+)", text)
    if len(text) > 100 or (exponent and abs(int(exponent.group(1))) > 400):  # Fraction would compute 10**exp
        raise UsageError(f"{option} {text:.40}: out of range or too many digits; give a decimal number with at "
                         "most 18 significant digits")
    try:
        value = binning.to_fraction(text.strip())
    except (ValueError, ZeroDivisionError, OverflowError):
        raise UsageError(f"{option} {text!r:.40}: not a number")
    if value <= 0:
        raise UsageError(f"{option} {text:.40}: must be > 0")
    if not sources.exact_number(value):
        raise UsageError(f"{option} {text:.40}: out of range or too many digits; give a decimal number with at "
                         "most 18 significant digits")
    return value


def _int_option(text: str | None, option: str, low: int, high: int) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{option} {text!r:.40}: not an integer")
    if not low <= value <= high:
        raise UsageError(f"{option} {value}: must be between {low} and {high}")
    return value


def _check_scheduler(scheduler: str) -> None:
    if scheduler not in ("auto", *LOCAL_SCHEDULERS) and "://" not in scheduler:
        raise UsageError(f"--scheduler {scheduler!r:.60}: expected auto, {', '.join(LOCAL_SCHEDULERS)} or a "
                         "dask.distributed address such as tcp://host:8786")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    bin_size = _positive_fraction(args.bin_size, "--bin-size")
    sample_rate = _positive_fraction(args.sample_rate, "--sample-rate")
    max_bins = _int_option(args.max_bins, "--max-bins", 1, 2**62)
    workers = _int_option(args.workers, "--workers", 1, MAX_WORKERS)
    _check_scheduler(args.scheduler)
    behavior = None if args.behavior is None else list(dict.fromkeys(args.behavior))
    if behavior is not None and any(not name.strip() for name in behavior):
        raise UsageError("--behavior: empty name; give the name of an NWB TimeSeries, e.g. --behavior velocity")
    try:
        storage_options = json.loads(args.storage_options)
        if not isinstance(storage_options, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise UsageError(f"--storage-options: not a JSON object ({err})")
    fmt = args.format or sources.detect_format(args.source, storage_options)
    started = time.perf_counter()
    with sources.LocalCopy(args.source, storage_options) as local:
        if args.format and not sources.filesystem(local)[0].exists(local):
            raise UserError(f"{args.source}: no such file or directory")
        rec = sources.read_source(args.source, fmt, local, bin_size, args.units, sample_rate, args.trials,
                                  max_bins, behavior)
        summary = write_recording(rec, args.out, storage_options, args.overwrite, args.scheduler,
                                  workers, progress=not args.no_progress)
    seconds = time.perf_counter() - started
    summary["seconds"] = round(seconds, 3)
    print(f"wrote {args.out}: {rec.n_rows} bins x {rec.n_units} units of {float(rec.bin_size)} s, "
          f"{summary['spikes']} spikes, counts {summary['dtype']}, in {seconds:.1f} s", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- running the block tasks


class _TqdmCallback(Callback):
    """Advance a tqdm bar for each finished task whose key starts with ``prefix``."""

    def __init__(self, bar: tqdm, prefixes: tuple[str, ...]):
        super().__init__()
        self.bar, self.prefixes = bar, prefixes

    def _posttask(self, key, result, dsk, state, worker_id):
        name = key[0] if isinstance(key, tuple) else key
        if isinstance(name, str) and name.startswith(self.prefixes):
            self.bar.update(1)


def run_tasks(tasks: list, scheduler: str, workers: int | None, progress: bool, desc: str) -> list:
    """Compute dask delayed ``tasks`` on a local scheduler or a dask.distributed cluster."""
    bar = tqdm(total=len(tasks), desc=desc, unit="block", disable=not progress or len(tasks) < 2,
               file=sys.stderr, dynamic_ncols=True)
    try:
        if scheduler in LOCAL_SCHEDULERS:
            with _TqdmCallback(bar, ("block-", "hash-")):
                return list(dask.compute(*tasks, scheduler=LOCAL_GETS[scheduler], num_workers=workers))
        try:
            from distributed import Client, as_completed
        except ImportError:
            raise UsageError("--scheduler ADDR needs the 'distributed' package")
        try:
            client = Client(scheduler, timeout="5s")
        except (OSError, TimeoutError) as err:
            raise UserError(f"--scheduler {scheduler}: cannot connect to the dask scheduler ({err})")
        except (ValueError, TypeError) as err:
            raise UsageError(f"--scheduler {scheduler!r:.60}: not a dask.distributed address ({err}); "
                             "give one such as tcp://host:8786")
        with client:
            futures = client.compute(tasks)
            for _ in as_completed(futures):
                bar.update(1)
            return client.gather(futures)
    finally:
        bar.close()


# --------------------------------------------------------------------------- writing


def write_recording(rec: sources.Recording, out: str, storage_options: dict, overwrite: bool,
                    scheduler: str = "auto", workers: int | None = None, progress: bool = True,
                    layout: StoreLayout | None = None) -> dict:
    """Bin ``rec`` into a new store at ``out`` and publish it. Returns a summary dict.

    ``layout`` overrides the chunk/shard geometry (tests and benchmarks use small chunks)."""
    layout = layout or StoreLayout.for_counts(rec.n_rows, rec.n_units)
    if scheduler == "auto":
        # compression holds the GIL part of the time: processes scale better on large outputs.
        # Only Phy data stays on disk (in-memory npz/NWB arrays would be pickled to every task),
        # and memory:// lives in this process only.
        on_disk = rec.phy is not None and not out.startswith("memory://")
        scheduler = "processes" if on_disk and len(layout.blocks()) >= PROCESSES_FROM_BLOCKS else "threads"
    dtype = count_dtype(rec.max_count_bound)
    pieces = sources.hash_pieces(rec.files)
    try:
        return _write_store(rec, out, storage_options, overwrite, scheduler, workers, progress, layout, dtype, pieces)
    except OSError as err:  # disk full, permissions, a file system that refuses the writes (/proc, ...)
        raise UserError(f"--out {out}: writing the store failed ({type(err).__name__}: {err}); "
                        "check the location, its permissions and free space") from None


def _write_store(rec: sources.Recording, out: str, storage_options: dict, overwrite: bool, scheduler: str,
                 workers: int | None, progress: bool, layout: StoreLayout, dtype: np.dtype, pieces: list) -> dict:
    with StoreWriter(out, storage_options, overwrite) as writer:
        while True:
            create_arrays(writer, rec, layout, dtype)
            attempt = uuid.uuid4().hex  # a retry recreates the arrays: blocks must not reuse the old ones
            tasks = [dask.delayed(write_block, pure=False)(rec, writer.staging_url, storage_options, r0, r1, dtype.name,
                                                           attempt, dask_key_name=f"block-{i}")
                     for i, (r0, r1) in enumerate(layout.blocks())]
            hashes = [dask.delayed(sources.hash_piece, pure=True)(p, dask_key_name=f"hash-{i}")
                      for i, p in enumerate(pieces)]
            try:
                results = run_tasks(tasks + hashes, scheduler, workers, progress, f"binning {rec.n_rows} bins")
                break
            except CountOverflow:
                if dtype == np.uint32:
                    raise UserError(f"{rec.path}: a bin holds more than 2**32-1 spikes; use a smaller --bin-size")
                log.info("a bin exceeds 65535 spikes: rewriting counts as uint32")
                dtype = np.dtype(np.uint32)
        block_results, digests = results[:len(tasks)], results[len(tasks):]
        n_spikes = sum(block_results)
        if rec.expected_spikes is not None and n_spikes != rec.expected_spikes:
            raise UserError(f"{rec.path}: binned {n_spikes} spikes but the selected units have "
                            f"{rec.expected_spikes}; spike times are not sorted or lie beyond the end")
        attrs = {
            "bin_size_s": float(rec.bin_size),
            "bin_size_exact": str(rec.bin_size),
            "source": {"format": rec.format, "path": rec.path, "content_hash": sources.combine_hashes(pieces, digests),
                       "files": [f.rsplit("/", 1)[-1] for f in sorted(rec.files)]},
            "n_spikes": n_spikes,
        }
        if rec.sample_rate_hz is not None:
            attrs["sample_rate_hz"] = rec.sample_rate_hz
        writer.commit(attrs)
    return {"spikes": n_spikes, "dtype": dtype.name, "rows": rec.n_rows, "units": rec.n_units}


def per_bin_arrays(rec: sources.Recording) -> dict[str, tuple[np.dtype, int, dict]]:
    """name -> (dtype, columns (0 for 1-D), attributes) of every per-bin array of the store."""
    arrays = {"bin_start_s": (np.dtype(np.float64), 0, {"description": "start of each bin, seconds from recording start"}),
              "trial": (np.dtype(np.int32), 0, {"description": "trial index, -1 outside trials"})}
    for name, values in rec.labels.items():
        arrays[f"labels/{name}"] = (values.dtype, 0, {})
    if rec.trials is not None:
        for name in rec.trials.labels:
            attrs = {"categories": rec.trials.categories[name]} if name in rec.trials.categories else {}
            arrays[f"labels/{name}"] = (np.dtype(np.int32), 0, attrs)
    for name, values in rec.behavior.items():
        arrays[f"behavior/{name}"] = (np.dtype(np.float32), int(np.prod(values.shape[1:], dtype=int)) or 1, {})
    return dict(sorted(arrays.items()))


def create_arrays(writer: StoreWriter, rec: sources.Recording, layout: StoreLayout, dtype: np.dtype) -> None:
    """Create every array of the store; per-bin arrays are chunked by whole blocks (shards of
    ``counts``) so that each block task writes objects no other task touches."""
    writer.create_array("counts", (rec.n_rows, rec.n_units), dtype, chunks=(layout.chunk_rows, rec.n_units),
                        shards=(layout.shard_rows, rec.n_units), dimension_names=("time", "unit"),
                        attributes={"description": "spike counts per bin; rate = counts / bin_size_s"},
                        compressors=COUNTS_COMPRESSOR)
    for name, (arr_dtype, columns, attrs) in per_bin_arrays(rec).items():
        shape, chunks, dims = (rec.n_rows,), (layout.shard_rows,), ("time",)
        if name.startswith("behavior/"):
            shape, chunks, dims = (rec.n_rows, columns), (layout.shard_rows, columns), ("time", f"{name[9:]}_dim")
        writer.create_array(name, shape, arr_dtype, chunks=chunks, dimension_names=dims, attributes=attrs,
                            fill_value=np.nan if arr_dtype.kind == "f" and name != "bin_start_s" else 0)
    writer.write_array("units/id", np.asarray(rec.unit_ids, dtype=np.int64), ("unit",))
    codes, categories = quality_codes(rec.unit_quality)
    writer.write_array("units/quality", codes, ("unit",), {"categories": categories})


if __name__ == "__main__":
    # process-wide, so only where this process is the command: main() also runs inside other
    # processes (the demo, benchmarks, tests), whose allocator is not ours to change
    allocator.keep_freed_memory()
    sys.exit(run_cli(main, None, PROG))
