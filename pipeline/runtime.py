"""Runtime helpers, in one place: thread counts (torch and BLAS), seeding, run-directory
names, batches to the device, and the per-thread intra-op limit of the augmenting threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import threadpoolctl
import torch

# --------------------------------------------------------------------------- helpers


BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def set_threads(threads: int, images: bool = False) -> int:
    """torch intra-op threads: ``threads``, or auto. Returns the number set.

    Auto, recording stores: 1. The MLPs are small: one thread was faster than two on this
    2-core machine both on its own (12.1 vs 10.8 reach MYOW steps/s) and with a busy process
    beside it (7.8 vs 7.1), and a team of OpenMP threads that shares its cores with other
    busy processes waits at every barrier for a descheduled member
    (``python benchmarks/contention.py``).

    ``images`` (image data on a CPU): auto = every core but one, which is left to the
    streams' augmenting threads. An OpenMP team that shares its cores with other busy
    threads waits at every barrier for a descheduled member: on 2 cores, 2 trainer threads
    next to the augmenting threads made the MNIST convnet step 4x slower (2.8 s) than 1
    thread (0.7 s).

    BLAS (OpenBLAS/MKL under numpy, scipy and scikit-learn's read-outs) gets the same count:
    by default it starts a thread per core, and on 2 cores shared with one other busy
    process its spinning threads made a logistic-regression read-out 54x slower (2.4 s vs
    0.045 s for 4 fits of 1100 x 64).
    """
    if threads <= 0:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        threads = max(1, cores - 1) if images else 1
    torch.set_num_threads(threads)
    # BLAS/OpenMP libraries loaded from now on read the count from the environment when they
    # load (scipy's and scikit-learn's own OpenBLAS/libgomp come with the read-outs' lazy
    # imports, after this call); threadpoolctl limits those already loaded (numpy's). With
    # the limit only on the loaded ones, the final read-out's logistic fits ran at 2 BLAS
    # threads: 2.1 s instead of 0.04 s per fit on a busy 2-core machine, 35 s of a 68 s run.
    for var in BLAS_THREAD_VARIABLES:
        os.environ[var] = str(threads)
    threadpoolctl.threadpool_limits(threads)
    return threads


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def default_run_dir(name: str) -> Path:
    """The one run-directory namer: a new ``runs/<name>-<YYYYmmdd-HHMMSS>[-i]``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{name}-{stamp}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def move_to_device(batch, device: torch.device, channels_last: bool = False):
    """Batch tensors to ``device`` (asynchronously from pinned memory); image batches in
    channels_last memory format when the model is (ResNets on CUDA)."""
    if device.type == "cpu" or batch is None:
        return batch
    if isinstance(batch, torch.Tensor):
        if channels_last and batch.dim() == 4:
            return batch.to(device, non_blocking=True, memory_format=torch.channels_last)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device, channels_last) for k, v in batch.items()}
    return type(batch)(move_to_device(v, device, channels_last) for v in batch)

# --------------------------------------------------------------------------- threads


_OPENMP: bool | None = None


def limit_intra_op_threads(n: int | None) -> None:
    """Let torch ops of the calling thread use at most ``n`` intra-op threads.

    Augmenting a batch is many small ops: on 2 cores, 2 OpenMP threads made it 3-6x slower
    than 1 (fork/join overhead, and the trainer's thread competes for the same cores).
    With torch's OpenMP backend the setting is per thread, so a Prefetcher's producer
    thread can take 1 without touching the trainer's threads; with any other backend it
    would be process-wide, so nothing is changed there (nor in the main thread).
    """
    global _OPENMP
    if not n or threading.current_thread() is threading.main_thread():
        return  # only producer threads: never change the trainer's own thread
    if _OPENMP is None:
        _OPENMP = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    if _OPENMP and torch.get_num_threads() != n:
        torch.set_num_threads(int(n))


# --------------------------------------------------------------------------- logging


class _Hold(logging.Handler):
    """Keeps records below ``release_at``; passes the others to the root logger at once."""

    def __init__(self, release_at: int) -> None:
        super().__init__(logging.NOTSET)
        self.release_at = release_at
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= self.release_at:
            logging.getLogger().handle(record)
        else:
            self.records.append(record)


@contextlib.contextmanager
def held_logs(name: str = "pipeline", release_at: int = logging.WARNING) -> Iterator[None]:
    """Hold the INFO records of logger ``name`` (and its children) while a run starts: they
    are passed on if the block succeeds and dropped if it raises, so a run refused after
    its data loaded says one line on stderr (the error), not "loaded ..." then the error.
    Records at ``release_at`` and above pass at once (a warning is never held back)."""
    logger = logging.getLogger(name)
    hold = _Hold(release_at)
    propagate = logger.propagate
    logger.propagate = False
    logger.addHandler(hold)
    try:
        yield
    finally:
        logger.removeHandler(hold)
        logger.propagate = propagate
    for record in hold.records:  # only reached when the block succeeded
        logging.getLogger().handle(record)
