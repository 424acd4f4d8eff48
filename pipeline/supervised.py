"""Supervised MLP baseline (paper Table 3 and Fig. 4, "Supervised"): the reach task, or a label.

An MLP encoder (same architecture as MYOW's, with dropout after every block) and a linear
head predict (cos, sin) of the reach angle with an MSE loss and AdamW weight decay, on the
moving (speed > ``eval.reach_min_speed``), labelled bins of the TRAIN split. Validation
accuracy is measured every epoch and the weights of the best validation epoch give the
test metrics (same keys and metric code as :func:`pipeline.readout.probes.reach_readout`).
A store without a reach task (e.g. the sleep recording) trains a classifier of its main
label instead: class-balanced cross-entropy, the epoch chosen by validation weighted F1.

    python -m pipeline.train --config configs/reach_supervised.yaml --set data.path=STORE

Config keys used: data.split, eval.reach_min_speed, model.* (incl. model.dropout),
optim.lr / weight_decay / batch_size, train.epochs, train.log_every (in epochs here),
run.seed / dir / threads. The run directory gets config.yaml, metrics.jsonl (one line per
logged epoch) and eval.json; no MYOW checkpoint is written (pipeline.evaluate does not apply).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model import build_encoder

from .checkpoint import CHECKPOINT_NAME, atomic_write_text, save_checkpoint
from .cli import to_json
from .config import Config, config_to_dict, dump_config
from .data.augment import Normalization, normalization_state
from .data.recording import Recording, load_recording, split_rows
from .readout.neural import reach_task_rows
from .readout.probes import angle_accuracy
from .runtime import default_run_dir, set_threads
from .startup import check_run_dir, create_run_dir

log = logging.getLogger("pipeline.supervised")

__all__ = ["reach_task_rows", "fit_supervised", "supervised_task", "train_supervised"]


def _classification_rows(rec: Recording, label: str, split) -> dict[str, np.ndarray]:
    """Store rows per split with a known (>= 0) ``label``."""
    y = rec.labels[label]
    return {name: rows[y[rows] >= 0] for name, rows in split_rows(rec.trial, split).items()}


def fit_supervised(cfg: Config, rec: Recording, rows: dict[str, np.ndarray],
                   on_epoch=None, label: str | None = None, trained: dict | None = None) -> dict:
    """Train the supervised MLP on ``rows["train"]``; returns the test metrics of the best-val epoch.

    ``label`` None: the reach task (MSE on (cos, sin) of the target angle) -> {reach_acc,
    reach_delta_acc, reach_val_acc, reach_val_delta_acc, reach_train_acc, reach_best_epoch,
    reach_*_bins}. A label name: classification (class-balanced cross-entropy, epoch chosen
    by validation weighted F1) -> {<label>_accuracy, <label>_macro_f1, <label>_weighted_f1,
    <label>_val_*, <label>_best_epoch} and the bare accuracy / macro_f1 / weighted_f1.
    ``trained`` (a dict): receives the best-val ``encoder`` and the ``normalization``.
    """
    from sklearn.metrics import f1_score

    torch.manual_seed(cfg.run.seed)
    norm = Normalization.fit(rec.rates[torch.from_numpy(rows["train"])])
    step = 2 * np.pi / 8
    classes = np.unique(rec.labels[label][rows["train"]]) if label else None

    def xy(split):
        r = torch.from_numpy(rows[split])
        if label:
            y = np.searchsorted(classes, rec.labels[label][rows[split]])
            return norm(rec.rates[r]), torch.from_numpy(y).long(), y
        angle = torch.from_numpy(rec.labels["target"][rows[split]]).double() * step
        return norm(rec.rates[r]), torch.stack([angle.cos(), angle.sin()], 1).float(), angle.numpy()

    (xtr, ytr, atr), (xva, _, ava), (xte, _, ate) = xy("train"), xy("val"), xy("test")
    m = cfg.model
    n_out = len(classes) if label else 2
    net = nn.Sequential(build_encoder(m.encoder, in_dim=rec.n_units, hidden_dim=m.hidden_dim,
                                      num_blocks=m.num_blocks, out_dim=m.out_dim, dropout=m.dropout),
                        nn.Linear(m.out_dim, n_out))
    if label:  # class-balanced, as myow-neuro's sleep classifier
        counts = np.bincount(atr, minlength=n_out).astype(np.float64)
        weight = torch.tensor(len(atr) / (n_out * np.maximum(counts, 1)), dtype=torch.float32)
        loss_fn = nn.CrossEntropyLoss(weight=weight)
    else:
        loss_fn = nn.MSELoss()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    n, B = len(xtr), min(cfg.optim.batch_size, len(xtr))

    @torch.no_grad()
    def predict(x):
        net.eval()
        out = net(x).double().numpy()
        net.train()
        return out

    def scores(x, truth):
        """(accuracy, delta-accuracy) for reach; (weighted F1, accuracy, macro F1) for labels."""
        if not label:
            return angle_accuracy(predict(x), truth)
        if len(truth) == 0:
            return (float("nan"),) * 3
        pred = predict(x).argmax(1)
        return (float(f1_score(truth, pred, average="weighted", zero_division=0)), float(np.mean(pred == truth)),
                float(f1_score(truth, pred, average="macro", zero_division=0)))

    best = None
    for epoch in range(1, cfg.train.epochs + 1):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - B + 1, B):  # drop the last partial batch (BatchNorm needs > 1 row)
            idx = perm[i:i + B]
            loss = loss_fn(net(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        val = scores(xva, ava) if len(ava) else scores(xtr, atr)
        if best is None or val > best[0]:
            best = (val, epoch, copy.deepcopy(net.state_dict()))
        if on_epoch is not None:
            on_epoch(epoch, loss.item(), val)
    val, epoch, state = best
    net.load_state_dict(state)
    if trained is not None:
        trained.update(encoder=net[0], normalization=norm, epoch=epoch)
    if label:
        (wf1, acc, f1), (vwf1, vacc, vf1) = scores(xte, ate), val
        out = {"accuracy": acc, "macro_f1": f1, "weighted_f1": wf1, "val_accuracy": vacc, "val_macro_f1": vf1,
               "val_weighted_f1": vwf1, "best_epoch": epoch}
        return {**{f"{label}_{k}": v for k, v in out.items()}, "accuracy": acc, "macro_f1": f1, "weighted_f1": wf1}
    acc, delta = scores(xte, ate)
    return {"reach_train_bins": len(atr), "reach_val_bins": len(ava), "reach_test_bins": len(ate),
            "reach_acc": acc, "reach_delta_acc": delta, "reach_val_acc": val[0], "reach_val_delta_acc": val[1],
            "reach_train_acc": angle_accuracy(predict(xtr), atr)[0], "reach_best_epoch": epoch}


def supervised_task(rec: Recording, cfg: Config) -> tuple[dict[str, np.ndarray], str | None]:
    """(rows per split, label): the reach task when the store has one (label None), else its main label."""
    if "target" in rec.labels and rec.behavior.get("velocity") is not None:
        return reach_task_rows(rec, cfg.data.split, cfg.eval.reach_min_speed), None
    if rec.main_label is None:
        from preprocess.errors import UserError

        raise UserError(f"{rec.url}: no labels to train the supervised baseline on (labels/<name>)")
    return _classification_rows(rec, rec.main_label, cfg.data.split), rec.main_label


def train_supervised(cfg: Config) -> tuple[Path, dict]:
    """Run the supervised baseline as a run (config.yaml, metrics.jsonl, eval.json)."""
    from preprocess.errors import UserError

    set_threads(cfg.run.threads)
    if not cfg.data.path:
        raise UserError("data.path is not set: pass --set data.path=STORE_URL")
    run_dir = Path(cfg.run.dir) if cfg.run.dir else default_run_dir("supervised")
    check_run_dir(run_dir)  # writes nothing; the data is read before anything is written
    rec = load_recording(cfg.data.path, cfg.data.storage_options)
    rows, label = supervised_task(rec, cfg)
    create_run_dir(run_dir)
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    with open(run_dir / "metrics.jsonl", "w") as f:
        def on_epoch(epoch, loss, val):
            if epoch % cfg.train.log_every == 0 or epoch == cfg.train.epochs:
                keys = ("val_weighted_f1", "val_acc", "val_macro_f1") if label else ("val_acc", "val_delta_acc")
                f.write(to_json({"epoch": epoch, "loss": loss, **dict(zip(keys, val))}) + "\n")
        trained: dict = {}
        results = fit_supervised(cfg, rec, rows, on_epoch, label, trained)
    # a checkpoint like the trainer's, so pipeline.evaluate and --export-embeddings read this
    # run as any other: the encoder's weights under "encoder." (build_supervised rebuilds it)
    save_checkpoint(run_dir / CHECKPOINT_NAME, {
        "model": {f"encoder.{k}": v for k, v in trained["encoder"].state_dict().items()}, "optimizer": {},
        "step": int(trained["epoch"]), "epoch": int(trained["epoch"]), "config": config_to_dict(cfg),
        "normalization": normalization_state([trained["normalization"]]), "data_kind": "neural", "data": {},
        "rng": {}, "world_size": 1})
    atomic_write_text(run_dir / "eval.json", to_json(results) + "\n")
    return run_dir, results
