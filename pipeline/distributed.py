"""Everything distributed, for ``torchrun --nproc_per_node=N -m pipeline.train``.

One code path for every world size: without torchrun's variables (RANK, WORLD_SIZE,
LOCAL_RANK) :func:`init_distributed` returns a world of one, no process group is created
and every helper below returns its input unchanged. Under torchrun each rank samples its
own anchors and pool (B and L per rank), the target representations of the pools and
their metadata are all-gathered (:func:`all_gather_pool`) so every rank mines in the same
global pool of world_size x L candidates, and DDP averages the online gradients.

Call order in the trainer::

    env = init_distributed(cfg.run.device); configure_rank_logging(env)
    run_dir = broadcast_object(run_dir, env)            # rank 0 chooses
    ddp = wrap_ddp(model, env)                          # optimizer over model.online_parameters()
    train_step(..., gather=functools.partial(all_gather_pool, env=env))
    logged = all_reduce_mean(out, env)
    shutdown(env)
"""

from __future__ import annotations

import gc
import inspect
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from preprocess.errors import UserError

__all__ = ["DistEnv", "init_distributed", "shutdown", "all_gather_pool", "all_reduce_mean",
           "broadcast_object", "gather_object", "barrier", "RankFilter", "configure_rank_logging", "wrap_ddp"]

Meta = dict[str, torch.Tensor]


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank in [0, world_size), GPU index on its node, device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # "nccl" | "gloo"; None without a process group (world of one)

    @property
    def is_main(self) -> bool:
        """Rank 0: writes the run directory, checkpoints, evaluations."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} must be an integer (torchrun sets it)") from None


def init_distributed(device_name: str = "auto", timeout_s: float = 120) -> DistEnv:
    """Read torchrun's environment, pick the device and join the process group (world > 1).

    device_name: "auto" (CUDA when available), "cpu" or "cuda". On CUDA rank r of a node
    uses cuda:LOCAL_RANK and NCCL; on CPU, gloo. ``timeout_s`` bounds every collective, so
    a rank that died makes the others fail instead of hanging. Idempotent.
    """
    if device_name not in ("auto", "cpu", "cuda"):
        raise UserError(f"run.device={device_name!r} is not one of auto, cpu, cuda")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device=cuda but no CUDA device is available; use run.device=auto or cpu")
    rank, world, local_rank = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    device = torch.device("cpu")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                            "are visible; lower --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world == 1:
        return DistEnv(rank, world, local_rank, device, None)
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run a single process")
    if not dist.is_initialized():
        # device_id binds NCCL to this rank's GPU up front (barriers then need no device guess).
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=device if use_cuda else None)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())


def shutdown(env: DistEnv) -> None:
    """Leave the process group, if one exists (safe to call twice, and for a world of one).

    Drop the DDP wrapper first (``del ddp``): an object still holding the group keeps
    gloo's worker threads alive into interpreter shutdown, where one that releases a
    tensor aborts the process ("terminate called without an active exception", exit 134;
    1 process in 8 with torch 2.14.1 and gloo when the wrapper outlived the group).
    """
    if env.distributed and dist.is_initialized():
        gc.collect()  # wrappers and tensors in reference cycles: release them while Python is alive
        dist.destroy_process_group()


def _gather_rows(x: torch.Tensor, sizes: list[int], env: DistEnv) -> torch.Tensor:
    """(sizes[rank], ...) on each rank -> (sum(sizes), ...) in rank order, on every rank.

    all_gather needs equal shapes (gloo insists): pad to max(sizes) rows, gather, trim.
    """
    rows = max(sizes)
    padded = torch.zeros((rows, *x.shape[1:]), dtype=x.dtype, device=env.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]).to(x.device)


@torch.no_grad()
def all_gather_pool(y: torch.Tensor, meta: Meta, env: DistEnv) -> tuple[torch.Tensor, Meta]:
    """Global candidate pool: the target representations and metadata of every rank.

    Args:
        y: (L, D) target representations of this rank's pool (L may differ per rank).
        meta: (L,) tensors (trial, time, store, label, ...); same keys and dtypes on every rank.

    Returns:
        ((L_total, D), {key: (L_total,)}), L_total = sum of every rank's L, rank r's rows
        at block r (same order on every rank); detached (the pool is target output, no grad).
        A world of one returns the inputs themselves.

    Usable as ``train_step``'s ``gather`` via ``functools.partial(all_gather_pool, env=env)``.
    Metadata of one dtype travel as one (L, k) tensor in that dtype, so float64 times stay
    exact: one collective for the sizes, one for y, one per metadata dtype.
    """
    if not env.distributed:
        return y, meta
    size = torch.tensor([y.shape[0]], dtype=torch.int64, device=env.device)
    all_sizes = [torch.empty_like(size) for _ in range(env.world_size)]
    dist.all_gather(all_sizes, size)
    sizes = torch.cat(all_sizes).tolist()  # [L of rank 0, L of rank 1, ...]
    pool_y = _gather_rows(y, sizes, env)
    by_dtype: dict[torch.dtype, list[str]] = {}
    for key in sorted(meta):  # sorted: the same collective order on every rank
        by_dtype.setdefault(meta[key].dtype, []).append(key)
    pool_meta: Meta = {}
    for keys in by_dtype.values():
        cols = torch.stack([meta[k].to(env.device) for k in keys], dim=1)  # (L, k)
        gathered = _gather_rows(cols, sizes, env)
        for i, key in enumerate(keys):
            pool_meta[key] = gathered[:, i].to(meta[key].device)
    return pool_y, {key: pool_meta[key] for key in meta}


def all_gather_with_grad(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """(b, ...) rows of every rank -> (world_size * b, ...), rank r's at block r, WITH gradient:
    the backward pass sums every rank's gradient of its rows back to the rank that made them
    (``torch.distributed.nn.functional.all_gather``). Equal b on every rank (the anchor batches
    are). When every rank computes the same loss of the gathered rows and DDP averages the
    parameter gradients, the update is the single-process gradient of that global loss
    (SimCLR's negatives from every rank). A world of one returns ``x`` itself."""
    if not env.distributed:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x))


def all_reduce_mean(values: dict[str, float | None], env: DistEnv) -> dict[str, float | None]:
    """Mean of each metric over the ranks that have it (None where no rank has it).

    One collective for all values (every rank must pass the same keys). A NaN on one rank
    makes the mean NaN on all, so a divergence check after this stops every rank together.
    """
    if not env.distributed:
        return dict(values)
    buf = torch.tensor([[0.0, 0.0] if v is None else [float(v), 1.0] for v in values.values()],
                       dtype=torch.float64, device=env.device).reshape(-1, 2)  # (K, [sum, count])
    dist.all_reduce(buf)
    return {key: None if count == 0 else total / count for key, (total, count) in zip(values, buf.tolist())}


def broadcast_object(obj: Any, env: DistEnv, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (picklable; e.g. the run directory rank 0 chose)."""
    if not env.distributed:
        return obj
    box = [obj if env.rank == src else None]
    dist.broadcast_object_list(box, src=src, device=env.device)
    return box[0]


def gather_object(obj: Any, env: DistEnv, dst: int = 0) -> list | None:
    """Every rank's ``obj`` (picklable: e.g. its data streams' state) as a list in rank order
    on rank ``dst``, None on the others; a world of one gets ``[obj]``."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size if env.rank == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def barrier(env: DistEnv) -> None:
    """Wait for every rank (e.g. until rank 0 has written a checkpoint)."""
    if env.distributed:
        dist.barrier()


class RankFilter(logging.Filter):
    """Sets ``record.rank``; on ranks other than 0 passes only WARNING and above."""

    def __init__(self, rank: int, min_level_other_ranks: int = logging.WARNING) -> None:
        super().__init__()
        self.rank = rank
        self.min_level_other_ranks = min_level_other_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return self.rank == 0 or record.levelno >= self.min_level_other_ranks


def configure_rank_logging(env: DistEnv) -> None:
    """Put a :class:`RankFilter` on the root logger's handlers (call after logging is set up).

    Handlers, not the root logger: a logger's filters do not see records propagated from
    child loggers (``pipeline.train``, ...). Calling twice adds nothing.
    """
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RankFilter) for f in handler.filters):
            handler.addFilter(RankFilter(env.rank))


# torch >= 2.13 renamed broadcast_buffers (deprecated) to forward_sync_buffers.
_NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False}
                           if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                           else {"broadcast_buffers": False})


def wrap_ddp(module: nn.Module, env: DistEnv, sync_bn: bool = False,
             find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel around the MYOW module (a world of one: ``module`` itself).

    DDP broadcasts rank 0's parameters (the frozen EMA target's too) at construction and
    averages gradients during backward. Only parameters with requires_grad join its
    buckets, so the target network (requires_grad False) is never reduced: each rank
    updates it by EMA from identical online weights, which keeps it identical.

    Every grad-carrying computation must go through the wrapper's forward with ``mode=``
    (``ddp(x1, x2, mode="augmented_loss")``, ...; see :mod:`model.myow`). MYOW's step sums
    its two losses (augmented + lambda x mined) before ONE backward, so gradients are
    reduced once per step, and ``zero_mined_loss`` keeps every parameter in the graph,
    hence no ``find_unused_parameters`` (except for multi-session models, whose other
    sessions' read-in layers are unused at a step: pass ``find_unused_parameters=True``).

    BatchNorm buffers are not synchronised at each forward. In training, BN normalises with
    batch statistics, so running statistics never change a gradient; they only serve
    eval-mode forwards (evaluation, embeddings), which rank 0 runs on its own copy, and
    rank 0's statistics from its 1/world of the batches estimate the same quantity. A sync
    would broadcast every buffer (online and target) from rank 0 at each of the 2-3 DDP
    forwards of a step. (torch >= 2.13 still copies rank 0's buffers once at construction;
    older versions do not, which changes nothing: every rank builds or loads the same
    model.) With ``sync_bn`` (CUDA only) BN uses global batch statistics and the running
    statistics are identical on every rank anyway.
    """
    if not env.distributed:
        return module
    if sync_bn:
        if env.device.type != "cuda":
            raise UserError("sync_bn needs CUDA (torch's SyncBatchNorm does not run on CPU); turn it off")
        # Every rank must then run the same BN forwards in train mode (MYOW's step does).
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return DistributedDataParallel(
        module, device_ids=[env.device.index] if env.device.type == "cuda" else None,
        # Grads live in DDP's buckets: no copy in and out of them, less memory.
        gradient_as_bucket_view=True, find_unused_parameters=find_unused_parameters, **_NO_FORWARD_BUFFER_SYNC)
