"""Supervised MLP baseline for the reach task (paper Table 3, "Supervised").

An MLP encoder (same architecture as MYOW's, with dropout after every block) and a linear
head predict (cos, sin) of the reach angle with an MSE loss and AdamW weight decay, on the
moving (speed > ``eval.reach_min_speed``), labelled bins of the TRAIN split. Validation
accuracy is measured every epoch and the weights of the best validation epoch give the
test metrics (same keys and metric code as :func:`pipeline.evaluate.reach_readout`).

    python -m pipeline.train --config configs/reach_supervised.yaml --set data.path=STORE

Config keys used: data.split, eval.reach_min_speed, model.* (incl. model.dropout),
optim.lr / weight_decay / batch_size, train.epochs, train.log_every (in epochs here),
run.seed / dir / threads. The run directory gets config.yaml, metrics.jsonl (one line per
logged epoch) and eval.json; no MYOW checkpoint is written (pipeline.evaluate does not apply).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model import build_encoder

from .checkpoint import atomic_write_text
from .cli import to_json
from .config import Config, dump_config
from .data import Normalization
from .recording import Recording, load_recording
from .evaluate import angle_accuracy, reach_task_rows

log = logging.getLogger("pipeline.supervised")

__all__ = ["reach_task_rows", "fit_supervised", "train_supervised"]


def fit_supervised(cfg: Config, rec: Recording, rows: dict[str, np.ndarray],
                   on_epoch=None) -> dict:
    """Train the supervised MLP on ``rows["train"]``; returns reach metrics of the best-val epoch.

    Returns {reach_acc, reach_delta_acc, reach_val_acc, reach_val_delta_acc, reach_train_acc,
    reach_best_epoch, reach_train_bins, reach_val_bins, reach_test_bins}.
    """
    torch.manual_seed(cfg.run.seed)
    norm = Normalization.fit(rec.rates[torch.from_numpy(rows["train"])])
    step = 2 * np.pi / 8

    def xy(split):
        r = torch.from_numpy(rows[split])
        angle = torch.from_numpy(rec.labels["target"][rows[split]]).double() * step
        return norm(rec.rates[r]), torch.stack([angle.cos(), angle.sin()], 1).float(), angle.numpy()

    (xtr, ytr, atr), (xva, _, ava), (xte, _, ate) = xy("train"), xy("val"), xy("test")
    m = cfg.model
    net = nn.Sequential(build_encoder(m.encoder, in_dim=rec.n_units, hidden_dim=m.hidden_dim,
                                      num_blocks=m.num_blocks, out_dim=m.out_dim, dropout=m.dropout),
                        nn.Linear(m.out_dim, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    n, B = len(xtr), min(cfg.optim.batch_size, len(xtr))

    @torch.no_grad()
    def predict(x):
        net.eval()
        out = net(x).double().numpy()
        net.train()
        return out

    best = None
    for epoch in range(1, cfg.train.epochs + 1):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - B + 1, B):  # drop the last partial batch (BatchNorm needs > 1 row)
            idx = perm[i:i + B]
            loss = nn.functional.mse_loss(net(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        val = angle_accuracy(predict(xva), ava) if len(ava) else angle_accuracy(predict(xtr), atr)
        if best is None or val > best[0]:
            best = (val, epoch, copy.deepcopy(net.state_dict()))
        if on_epoch is not None:
            on_epoch(epoch, loss.item(), val)
    val, epoch, state = best
    net.load_state_dict(state)
    acc, delta = angle_accuracy(predict(xte), ate)
    return {"reach_train_bins": len(atr), "reach_val_bins": len(ava), "reach_test_bins": len(ate),
            "reach_acc": acc, "reach_delta_acc": delta, "reach_val_acc": val[0], "reach_val_delta_acc": val[1],
            "reach_train_acc": angle_accuracy(predict(xtr), atr)[0], "reach_best_epoch": epoch}


def train_supervised(cfg: Config) -> tuple[Path, dict]:
    """Run the supervised baseline as a run (config.yaml, metrics.jsonl, eval.json)."""
    from preprocess.errors import UserError

    from .train import set_threads

    set_threads(cfg.run.threads)
    if not cfg.data.path:
        raise UserError("data.path is not set: pass --set data.path=STORE_URL")
    run_dir = Path(cfg.run.dir) if cfg.run.dir else Path("runs") / f"supervised-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    rec = load_recording(cfg.data.path, cfg.data.storage_options)
    rows = reach_task_rows(rec, cfg.data.split, cfg.eval.reach_min_speed)
    with open(run_dir / "metrics.jsonl", "w") as f:
        def on_epoch(epoch, loss, val):
            if epoch % cfg.train.log_every == 0 or epoch == cfg.train.epochs:
                f.write(to_json({"epoch": epoch, "loss": loss, "val_acc": val[0], "val_delta_acc": val[1]}) + "\n")
        results = fit_supervised(cfg, rec, rows, on_epoch)
    atomic_write_text(run_dir / "eval.json", to_json(results) + "\n")
    return run_dir, results
