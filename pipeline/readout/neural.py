"""Neural read-outs: embed a recording with a frozen encoder, read out every task of the
store (docs/contracts.md section 8), combine sessions, and evaluate a saved neural run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from model.encoders import set_session
from preprocess.errors import UserError

from ..checkpoint import CHECKPOINT_NAME, EVALUATE_FIX, check_normalization, checkpoint_error, state_dict_problem
from ..config import Config
from ..data.augment import Normalization, normalizations_from
from ..data.neural import session_urls
from ..data.recording import Recording, hand_speed, open_store, split_rows
from .pictures import save_plots
from .probes import MAX_CLASSES, classification_readout, frozen_features, reach_readout
from .runs import export_arrays

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- embedding + tasks


@torch.no_grad()
def embed(encoder: torch.nn.Module, rates: torch.Tensor | Recording, normalization: Normalization,
          device: str | torch.device = "cpu", batch_size: int = 8192) -> np.ndarray:
    """Frozen-encoder representation of every row: (T, N) Hz -> (T, D) float32, row order kept.

    ``rates`` is a (T, N) tensor or a Recording (read block by block when it is streamed,
    so a store larger than memory is embedded in bounded memory). Runs in eval mode
    (BatchNorm running statistics) on un-augmented normalised input and restores the
    encoder's previous mode.
    """
    if isinstance(rates, Recording):
        blocks = [rates.rates] if rates.in_memory else (x for _, x in rates.iter_rates())
    else:
        blocks = [rates]
    features = frozen_features(encoder, (normalization(x[i:i + batch_size]).to(device)
                                         for x in blocks for i in range(0, x.shape[0], batch_size)))
    if features is None:
        return np.zeros((0, getattr(encoder, "out_dim", 0)), dtype=np.float32)
    return features.numpy().astype(np.float32, copy=False)


def _task_rows(rec: Recording, splits: dict, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(splits[s][valid[splits[s]]] for s in ("train", "val", "test"))


def reach_task_rows(rec: Recording, split=(0.7, 0.1, 0.2), min_speed: float = 5.0) -> dict[str, np.ndarray]:
    """Store rows of the reach task per split: labelled bins with hand speed > min_speed.

    The one definition of the reach rows: the SSL evaluation and the baselines (supervised
    MLP, raw-rate read-out) all use it, so every method is scored on the same bins.
    """
    speed = hand_speed(rec)
    if "target" not in rec.labels or speed is None:
        raise UserError(f"{rec.url}: the reach task needs labels/target and behavior/velocity")
    valid = (speed > min_speed) & (rec.labels["target"] >= 0)
    return {name: rows[valid[rows]] for name, rows in split_rows(rec.trial, split).items()}


def evaluate_embedding(embedding: np.ndarray, rec: Recording, split=(0.7, 0.1, 0.2), tasks="auto",
                       reach_min_speed: float = 5.0) -> dict:
    """Every task the recording has, on ``embedding`` (T, D) rows aligned with the store.

    ``tasks``: "auto" (all) or a list of task names ("reach" and/or label names).
    """
    def wanted(name: str) -> bool:
        return tasks == "auto" or name in tasks

    splits = split_rows(rec.trial, split)
    results: dict = {}
    speed = hand_speed(rec)
    has_reach = "target" in rec.labels and speed is not None
    moving = speed > reach_min_speed if speed is not None else None
    if has_reach and wanted("reach"):
        target = rec.labels["target"]
        rows = reach_task_rows(rec, split, reach_min_speed)
        tr, va, te = rows["train"], rows["val"], rows["test"]
        results.update(reach_readout(embedding[tr], target[tr], embedding[va], target[va],
                                     embedding[te], target[te]))
    main = rec.main_label
    for name in sorted(rec.labels, key=lambda n: (n != main, n)):
        if not wanted(name):
            continue
        y = rec.labels[name]
        valid = y >= 0  # -1 = unknown (e.g. outside trials)
        if name == "target" and has_reach:
            valid &= moving
        classes = np.unique(y[valid])
        if len(classes) < 2 or len(classes) > MAX_CLASSES:
            log.info("label %r: %d classes, not evaluated as a classification task", name, len(classes))
            continue
        tr, va, te = _task_rows(rec, splits, valid)
        res = classification_readout(embedding[tr], y[tr], embedding[va], y[va], embedding[te], y[te])
        if not res:
            log.info("label %r: fewer than 2 classes in the train split, skipped", name)
            continue
        results.update({f"{name}_{k}": v for k, v in res.items()})
        if name == main:
            results.update(accuracy=res["accuracy"], macro_f1=res["macro_f1"], weighted_f1=res["weighted_f1"])
    return results


def combine_sessions(results: list[dict], urls: list[str]) -> dict:
    """One session: its metrics. Several: the mean of every metric all sessions have, and
    ``sessions``: each session's metrics with its ``url``."""
    if len(results) == 1:
        return results[0]
    shared = [k for k, v in results[0].items()
              if isinstance(v, (int, float)) and all(isinstance(r.get(k), (int, float)) for r in results)]
    out = {k: float(np.mean([r[k] for r in results])) for k in shared}
    out["sessions"] = [{"url": u, **r} for u, r in zip(urls, results)]
    return out


def evaluate_session(model, index: int, rec: Recording, normalization: Normalization, cfg: Config, *,
                     device="cpu", run_dir=None, plots: bool = False, multi: bool = False) -> tuple[np.ndarray, dict]:
    """Session ``index`` of a run: embed its store ``rec`` with the frozen online encoder
    ((T, D) float32, returned), read out every task, and (``plots``) write the t-SNE and
    mining-agreement PNGs into ``run_dir`` (suffixed by the session when ``multi``)."""
    set_session(model, index)
    emb = embed(model.encoder, rec, normalization, device)
    results = evaluate_embedding(emb, rec, cfg.data.split, cfg.eval.tasks, cfg.eval.reach_min_speed)
    if plots:
        save_plots(run_dir, emb, rec, cfg.data.split, cfg.eval.reach_min_speed, cfg.eval.tsne, cfg.run.seed,
                   suffix=f"-session{index}" if multi else "")
    return emb, results


def evaluate_sessions(model, sessions, cfg: Config, *, device="cpu", run_dir=None, plots: bool = False) -> dict:
    """Every session of a neural run (``TrainData.sessions``) by :func:`evaluate_session`;
    several sessions -> :func:`combine_sessions`."""
    per_session = [evaluate_session(model, i, s.recording, s.normalization, cfg, device=device, run_dir=run_dir,
                                    plots=plots, multi=len(sessions) > 1)[1] for i, s in enumerate(sessions)]
    return combine_sessions(per_session, [s.recording.url for s in sessions])


def evaluate_neural_run(run_dir: str | os.PathLike, cfg: Config, ckpt: dict, data: str | None = None,
                        export: str | None = None, plots: bool = True, *, build: Callable) -> dict:
    """``python -m pipeline.evaluate --run RUN_DIR`` (``build``: the method's model builder) for a run on recording stores: rebuild
    the model from the checkpoint (its normalisation is stored in it), embed every chosen
    session (``data``: one store of the run, or a store to evaluate on) and read it out by
    :func:`evaluate_session`. ``export`` (checked beforehand by
    :func:`pipeline.readout.runs.export_target`): the (T, D) embedding with ``bin_start_s``
    and ``trial``, atomically."""
    ckpt_path = Path(run_dir) / CHECKPOINT_NAME
    n_units = check_normalization(ckpt, None, ckpt_path, EVALUATE_FIX)  # a crafted or foreign checkpoint
    norms = normalizations_from(ckpt["normalization"])
    norms = norms if isinstance(norms, list) else [norms]
    so = cfg.data.storage_options
    if not (data or cfg.data.path):
        raise UserError("the run's config has no data.path; pass --data STORE_URL")
    trained_on = session_urls(cfg.data.path, so) if cfg.data.path else [data]
    if data is None:
        chosen = list(range(len(norms)))
    elif len(norms) == 1:
        chosen, trained_on = [0], [data]
    elif data in trained_on:
        chosen = [trained_on.index(data)]
    else:
        raise UserError(f"--data {data}: not one of the run's {len(norms)} sessions; pass one of {trained_on}")
    if len(trained_on) != len(norms):
        raise UserError(f"{cfg.data.path}: holds {len(trained_on)} stores, the run was trained on {len(norms)}; "
                        "pass the store to evaluate with --data")
    if export and len(chosen) > 1:
        raise UserError("--export-embeddings needs one session: pass it with --data STORE_URL")
    model = build(cfg, n_units if len(norms) > 1 else n_units[0])
    try:
        model.load_state_dict(ckpt["model"])
    except Exception as err:  # weights of another model than its config describes
        raise checkpoint_error(ckpt_path, "its model weights do not fit the model of its config "
                                          f"({state_dict_problem(err)})", EVALUATE_FIX) from None
    per_session = []
    for i in chosen:
        url = trained_on[i]
        rec = open_store(url, so, attempts=cfg.data.read_retries + 1)
        if norms[i].mean.shape[0] != rec.n_units:
            raise UserError(f"{url}: has {rec.n_units} units but the run was trained on {norms[i].mean.shape[0]}; "
                            "pass the store the run was trained on (--data)")
        emb, results = evaluate_session(model, i, rec, norms[i], cfg, run_dir=run_dir, plots=plots,
                                        multi=len(norms) > 1)
        per_session.append(results)
        if export:
            # (T, D) float32 embedding of every bin, with its start time and trial
            export_arrays(export, embedding=emb.astype(np.float32), bin_start_s=rec.bin_start_s, trial=rec.trial)
    results = combine_sessions(per_session, [trained_on[i] for i in chosen])
    results["step"] = int(ckpt["step"])
    return results


