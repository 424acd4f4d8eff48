"""The one module that knows the data kinds: recording stores ("neural") and image shard
sets ("images"). It chooses, and everything else receives the result:

    data_kind(cfg)                      -> "neural" | "images"
    build_train_data(cfg, ...)          -> a TrainData (pipeline.data.interface) of that kind
    evaluate_data(data, model, cfg)     -> the read-outs of that kind (end of training)
    evaluate_run(run_dir, ...)          -> ``python -m pipeline.evaluate`` on a saved run

It sits above :mod:`pipeline.data` and :mod:`pipeline.readout` and below the loop and the
command-line modules.
"""

from __future__ import annotations

import os

from model.methods import NEURAL_ONLY_METHODS, DataNeeds
from preprocess.errors import UserError
from preprocess.shard_format import INDEX, SPLITS
from preprocess.store import filesystem, join_url

from .checkpoint import dir_write_error
from .config import IMAGE_ENCODERS, Config
from .data.images import build_image_train_data
from .data.interface import TrainData
from .data.neural import build_neural_train_data
from .data.recording import Recording
from .methods import build_method
from .readout.images import evaluate_image_data, evaluate_image_run
from .readout.neural import evaluate_neural_run, evaluate_sessions
from .readout.runs import export_target, load_run
from .runtime import set_threads


def data_kind(cfg: Config) -> str:
    """``data.kind``, with ``auto`` resolved: "images" when data.path holds an image shard set
    (index.json, or train/val/test sub-folders with one), else "neural" (a recording store,
    a list or a directory of stores; a missing path is left to the store reader to report)."""
    kind = cfg.data.kind
    if kind != "auto":
        return kind
    path = cfg.data.path
    if not path or isinstance(path, list):
        return "neural"
    try:
        fs, root = filesystem(path, cfg.data.storage_options)
        if fs.exists(join_url(root, "zarr.json")):
            return "neural"
        markers = [join_url(root, INDEX)] + [join_url(root, s, INDEX) for s in SPLITS]
        return "images" if any(fs.exists(m) for m in markers) else "neural"
    except Exception:  # noqa: BLE001 - unreachable storage: the store reader says what is wrong
        return "neural"


def check_kind(cfg: Config, kind: str, normalization=None) -> None:
    """The settings that only fit one data kind, checked in one place: the encoder, the
    method, the mining time gap, and a checkpoint's normalisation (``normalization``, the
    stored state) written for the other kind. UserError naming the key and the fix."""
    d = cfg.data
    ckpt_kind = None
    if normalization is not None:
        ckpt_kind = "images" if isinstance(normalization, dict) and normalization.get("kind") == "images" else "neural"
    if kind == "images":
        if cfg.model.encoder not in IMAGE_ENCODERS:
            raise UserError(f"{d.path} holds images: set model.encoder to one of {', '.join(IMAGE_ENCODERS)} "
                            f"(it is {cfg.model.encoder!r}; see configs/mnist_myow.yaml, configs/cifar10_myow.yaml)")
        if cfg.method.name in NEURAL_ONLY_METHODS:
            raise UserError(f"method.name {cfg.method.name} is a neural-data baseline; image runs take myow, byol "
                            "or simclr")
        if d.min_trial_gap:
            raise UserError("data.min_trial_gap is for neural data with trials: images have none; set it to 0")
        if d.min_time_gap_s:
            raise UserError("data.min_time_gap_s is for neural data: images have no time, mining only excludes the "
                            "anchor's own image; leave it null")
        if ckpt_kind == "neural":
            raise UserError("the checkpoint was written by a run on a recording store, data.path holds images; "
                            "resume with the same data, or use another run.dir to start over")
    else:
        if ckpt_kind == "images":
            raise UserError("the checkpoint was written by a run on image shards, data.path is a recording store; "
                            "resume with the same data, or use another run.dir to start over")
        if cfg.model.encoder != "mlp":
            raise UserError(f"data.path is neural data (recording stores): model.encoder must be mlp, not "
                            f"{cfg.model.encoder!r} (image encoders need image shards)")


def build_train_data(cfg: Config, recording: Recording | None = None, normalization=None, rank: int = 0,
                     world_size: int = 1, progress: bool = False, needs: DataNeeds | None = None) -> TrainData:
    """The run's data for ``rank`` of ``world_size``: image shard sets (:func:`data_kind`
    "images") by :func:`pipeline.data.images.build_image_train_data`, recording stores (or
    ``recording``) by :func:`pipeline.data.neural.build_neural_train_data`.
    ``normalization`` may be a checkpoint's stored state (``checkpoint["normalization"]``);
    ``needs``: what the method draws (default: :func:`pipeline.methods.build_method`'s)."""
    needs = needs or build_method(cfg).needs
    kind = "neural" if recording is not None else data_kind(cfg)
    check_kind(cfg, kind, normalization)
    if kind == "images":
        return build_image_train_data(cfg, normalization, rank=rank, world_size=world_size, needs=needs)
    return build_neural_train_data(cfg, recording, normalization, rank=rank, world_size=world_size,
                                   progress=progress, needs=needs)


def evaluate_data(data: TrainData, model, cfg: Config, *, device, run_dir=None, plots: bool = False) -> dict:
    """The read-outs of a trained model on its run's data (images: linear probe + kNN;
    recordings: every task of every session)."""
    if data.kind == "images":
        return evaluate_image_data(data, model, cfg, device=device, run_dir=run_dir, plots=plots)
    return evaluate_sessions(model, data.sessions, cfg, device=device, run_dir=run_dir, plots=plots)


def evaluate_run(run_dir: str | os.PathLike, data: str | None = None, export: str | None = None,
                 plots: bool = True, overwrite: bool = False) -> dict:
    """Evaluate a run's final checkpoint on its data (or ``data``); returns the metrics dict.
    ``export``: the embeddings' .npz (an existing file only with ``overwrite``)."""
    cfg, ckpt = load_run(run_dir)
    # the run's thread policy, BLAS included: with numpy's/scipy's default of a thread per
    # core, the read-outs' logistic fits took 34 of a 42 s evaluation of a reach run (1 s with it)
    set_threads(cfg.run.threads, images=ckpt.get("data_kind") == "images")
    if export:
        export_target(export, overwrite)  # before minutes of evaluation, not after
    if plots and dir_write_error(run_dir) is not None:
        raise UserError(f"--run {run_dir}: the run directory is not writable, so the plots cannot be saved; "
                        "pass --no-plots")
    build = build_method(cfg).build_model  # the run's method rebuilds its model from the checkpoint's config
    if ckpt.get("data_kind") == "images":
        return evaluate_image_run(run_dir, cfg, ckpt, data=data, export=export, plots=plots, build=build)
    return evaluate_neural_run(run_dir, cfg, ckpt, data=data, export=export, plots=plots, build=build)
