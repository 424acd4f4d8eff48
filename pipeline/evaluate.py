"""``python -m pipeline.evaluate --run RUN_DIR [--data URL] [--export-embeddings OUT.npz]``

Frozen online encoder -> representation of every store row (un-augmented, normalised
input, eval mode) -> linear read-outs for every task the data has -> one JSON object on
stdout. Also writes two PNGs into the run directory: a t-SNE of the embedding coloured by
the main label, and the mined-view label agreement over training steps.

Tasks (splits by trial order / time blocks as in training, DESIGN section 8):

- reach (``labels/target`` and ``behavior/velocity``): bins with hand speed > 5 cm/s; a
  ridge map from the representation to (cos, sin) of the target angle (target * 45 deg),
  fit on train, L2 strength chosen by validation accuracy, test metrics at that strength:
  ``reach_acc`` (circular error < pi/8), ``reach_delta_acc`` (< 3 pi/16), plus
  ``reach_val_acc``, ``reach_alpha``, ``reach_test_bins``. :func:`reach_readout` is pure,
  so benchmarks apply the same protocol to raw counts.
- every label with at least 2 classes (``target`` on moving bins for reach data):
  multinomial logistic regression, C chosen on validation -> ``<name>_accuracy``,
  ``<name>_macro_f1``; the bare ``accuracy`` / ``macro_f1`` are those of the main label.

Runs on image shards (checkpoint ``data_kind: images``) are evaluated by
:func:`pipeline.images.evaluate_image_run`: ``linear_accuracy`` (logistic-regression probe,
training selection -> eval selection, L2 chosen on a split of the training selection),
``knn_accuracy`` (weighted kNN), and the PNGs ``mined_views.png`` (paper Figure 2) and
``mining_confusion.png`` (Figure S6).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from model import set_session
from preprocess.errors import UsageError, UserError, run_cli, setup_logging

from .build import build_model
from .checkpoint import (CHECKPOINT_NAME, EVALUATE_FIX, checkpoint_error, dir_write_error, load_checkpoint,
                         state_dict_problem)
from .cli import OneLineParser, to_json
from .config import Config, ConfigError, build_config
from .data import Normalization, normalizations_from, session_urls
from .recording import Recording, hand_speed, open_store, split_rows
from .startup import check_normalization

log = logging.getLogger("pipeline.evaluate")
PROG = "python -m pipeline.evaluate"

REACH_ALPHAS = 2.0 ** np.arange(-10, 11)  # 21 ridge strengths, 2^-10 .. 2^10
LOGREG_CS = 10.0 ** np.arange(-3, 4)  # inverse L2 strengths of the logistic regression
ACC_WINDOW = np.pi / 8  # +-22.5 deg: the nearest of 8 directions
DELTA_ACC_WINDOW = 3 * np.pi / 16  # +-33.75 deg
MAX_CLASSES = 64  # labels with more classes are not classification tasks (e.g. ids)
TSNE_MAX_ROWS = 2000

__all__ = ["circular_error", "angle_accuracy", "reach_readout", "reach_cv_readout", "trial_folds", "classification_readout", "embed",
           "evaluate_embedding", "save_plots", "save_agreement_plot", "evaluate_session", "evaluate_sessions", "evaluate_run", "main"]


# --------------------------------------------------------------------------- metrics


def circular_error(pred_angle: np.ndarray, true_angle: np.ndarray) -> np.ndarray:
    """|pred - true| on the circle, in [0, pi] (so 2*pi - 0.1 vs 0 is 0.1)."""
    d = np.mod(np.asarray(pred_angle, dtype=np.float64) - np.asarray(true_angle, dtype=np.float64), 2 * np.pi)
    return np.minimum(d, 2 * np.pi - d)


def angle_accuracy(pred_xy: np.ndarray, true_angle: np.ndarray) -> tuple[float, float]:
    """(acc, delta_acc) of predicted (cos, sin) vectors (n, 2) against true angles (n,):
    the shares with circular error < pi/8 and < 3*pi/16. NaN for n == 0."""
    pred_xy = np.asarray(pred_xy, dtype=np.float64)
    if pred_xy.shape[0] == 0:
        return float("nan"), float("nan")
    err = circular_error(np.arctan2(pred_xy[:, 1], pred_xy[:, 0]), true_angle)
    return float(np.mean(err < ACC_WINDOW)), float(np.mean(err < DELTA_ACC_WINDOW))


def _standardizer(train: np.ndarray):
    mean = train.mean(0)
    std = train.std(0)
    std = np.where(std > 1e-12, std, 1.0)
    return lambda x: (np.asarray(x, dtype=np.float64) - mean) / std


def _ridge_path(x: np.ndarray, angle: np.ndarray, alphas: np.ndarray):
    """Closed-form ridge maps x (n, D) -> (cos, sin) of ``angle`` (n,) for every alpha.

    Minimises ``mean_i ||W^T x_i + b - [cos a_i, sin a_i]||^2 + alpha ||W||^2`` (b
    unpenalised). One eigendecomposition of the Gram matrix serves every alpha:
    W(alpha) = V diag(1 / (e + alpha)) V^T X^T (Y - mean) / n. Yields (alpha, predict),
    predict: (m, D) -> (m, 2).
    """
    y = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    y_mean = y.mean(0)
    n = len(angle)
    evals, evecs = np.linalg.eigh(x.T @ x / n)
    proj = evecs.T @ (x.T @ (y - y_mean) / n)  # (D, 2)
    for alpha in alphas:
        w = evecs @ (proj / (np.maximum(evals, 0.0) + alpha)[:, None])
        yield float(alpha), (lambda f, w=w: f @ w + y_mean)


def trial_folds(groups: np.ndarray, n_folds: int) -> np.ndarray:
    """(n,) fold id per row: the distinct ``groups`` (trial ids) in order of first
    appearance, cut into ``n_folds`` contiguous blocks of (nearly) equal numbers of
    trials, so a fold is a stretch of consecutive trials (never a trial split in two)."""
    groups = np.asarray(groups)
    ids, first = np.unique(groups, return_index=True)
    order = ids[np.argsort(first, kind="stable")]
    n_folds = max(1, min(n_folds, len(order)))
    fold_of_id = dict(zip(order.tolist(), (np.arange(len(order)) * n_folds // len(order)).tolist()))
    return np.array([fold_of_id[g] for g in groups.tolist()], dtype=np.int64)


def reach_cv_readout(features: np.ndarray, y: np.ndarray, groups: np.ndarray, n_folds: int = 5,
                     alphas: np.ndarray = REACH_ALPHAS, n_directions: int = 8) -> dict:
    """Trial-grouped, nested cross-validated reach read-out (the selection protocol).

    The rows are cut into ``n_folds`` folds of consecutive trials (:func:`trial_folds`).
    Each fold is predicted by a ridge map fit on the other folds, with its strength chosen
    by an inner cross-validation over those other folds only (the held-out fold never
    chooses anything); features are standardised with the fitting rows' statistics.

    Args:
        features: (n, D); y: (n,) direction labels 0..n_directions-1; groups: (n,) trial ids.

    Returns:
        {reach_cv_acc, reach_cv_delta_acc} over all n rows (each predicted once),
        reach_cv_fold_acc (per fold), reach_cv_bins, reach_cv_folds.
    """
    x = np.asarray(features, dtype=np.float64)
    angle = np.asarray(y, dtype=np.float64) * (2 * np.pi / n_directions)
    fold = trial_folds(groups, n_folds)
    k = int(fold.max()) + 1 if len(fold) else 0
    pred = np.zeros((len(angle), 2))

    def fit_predict(fit: np.ndarray, apply: list[np.ndarray]) -> dict[float, list[np.ndarray]]:
        z = _standardizer(x[fit])
        return {alpha: [predict(z(x[a])) for a in apply] for alpha, predict in _ridge_path(z(x[fit]), angle[fit], alphas)}

    for f in range(k):
        outer_fit = fold != f
        inner = [g for g in range(k) if g != f]
        if len(inner) >= 2:  # choose alpha by inner CV over the fitting folds
            correct = np.zeros(len(alphas))
            for g in inner:
                fit, held = outer_fit & (fold != g), fold == g
                for i, (alpha, (p,)) in enumerate(fit_predict(fit, [held]).items()):
                    correct[i] += angle_accuracy(p, angle[held])[0] * held.sum()
            alpha = float(alphas[int(np.argmax(correct))])  # ties: the smaller alpha
        else:
            alpha = float(np.median(alphas))
        z = _standardizer(x[outer_fit])
        predict = dict(_ridge_path(z(x[outer_fit]), angle[outer_fit], np.array([alpha])))[alpha]
        pred[fold == f] = predict(z(x[fold == f]))
    acc, delta = angle_accuracy(pred, angle)
    fold_acc = [angle_accuracy(pred[fold == f], angle[fold == f])[0] for f in range(k)]
    return {"reach_cv_acc": acc, "reach_cv_delta_acc": delta, "reach_cv_fold_acc": fold_acc,
            "reach_cv_bins": int(len(angle)), "reach_cv_folds": k}


def reach_readout(features_train: np.ndarray, y_train: np.ndarray, features_val: np.ndarray, y_val: np.ndarray,
                  features_test: np.ndarray, y_test: np.ndarray, alphas: np.ndarray = REACH_ALPHAS,
                  n_directions: int = 8) -> dict:
    """Reach-direction read-out (paper App. D protocol, closed-form ridge).

    Features are standardised with train statistics; for each alpha the map minimises
    ``mean_i ||W^T x_i + b - [cos a_i, sin a_i]||^2 + alpha ||W||^2`` (b unpenalised) on
    train; the alpha with the best validation accuracy (ties: better validation
    delta-accuracy, then the smaller alpha) gives the reported test metrics.

    Args:
        features_*: (n_split, D) features (representations, or raw rates for baselines).
        y_*: (n_split,) direction labels 0..n_directions-1; angle = y * 2 pi / n_directions.
        alphas: ridge strengths to try.

    Returns:
        {reach_acc, reach_delta_acc, reach_val_acc, reach_val_delta_acc, reach_train_acc,
         reach_alpha, reach_train_bins, reach_val_bins, reach_test_bins}; accuracies are NaN
        for an empty split (an empty train split gives only the bin counts).
    """
    step = 2 * np.pi / n_directions
    xtr, xva, xte = (np.asarray(f, dtype=np.float64) for f in (features_train, features_val, features_test))
    atr, ava, ate = (np.asarray(y, dtype=np.float64) * step for y in (y_train, y_val, y_test))
    out = {"reach_train_bins": len(atr), "reach_val_bins": len(ava), "reach_test_bins": len(ate)}
    if len(atr) == 0:
        return out
    z = _standardizer(xtr)
    xtr, xva, xte = z(xtr), z(xva), z(xte)
    best = None
    for alpha, predict in _ridge_path(xtr, atr, alphas):
        val = angle_accuracy(predict(xva), ava) if len(ava) else angle_accuracy(predict(xtr), atr)
        key = tuple(-1.0 if np.isnan(v) else v for v in val)
        if best is None or key > best[0]:
            best = (key, float(alpha), predict)
    _, alpha, predict = best
    acc, delta = angle_accuracy(predict(xte), ate)
    val_acc, val_delta = angle_accuracy(predict(xva), ava)
    train_acc, _ = angle_accuracy(predict(xtr), atr)
    out.update(reach_acc=acc, reach_delta_acc=delta, reach_val_acc=val_acc, reach_val_delta_acc=val_delta,
               reach_train_acc=train_acc, reach_alpha=alpha)
    return out


def classification_readout(features_train: np.ndarray, y_train: np.ndarray, features_val: np.ndarray,
                           y_val: np.ndarray, features_test: np.ndarray, y_test: np.ndarray,
                           cs: np.ndarray = LOGREG_CS, class_weights="auto") -> dict:
    """Multinomial logistic regression on standardised features; C and the class weighting
    (none, or balanced as in myow-neuro's sleep classifier) chosen by validation macro-F1
    (ties: accuracy, then the earlier candidate: unweighted, smaller C); test metrics there.
    ``class_weights`` "auto": balanced is tried only when the training classes are
    imbalanced (largest / smallest count > 2), where weighting can matter.

    Returns {accuracy, macro_f1, weighted_f1, val_accuracy, val_macro_f1, val_weighted_f1,
    C, balanced}, or {} when train has < 2 classes.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    _, counts = np.unique(y_train, return_counts=True)
    if len(counts) < 2:
        return {}
    if class_weights == "auto":
        class_weights = (None, "balanced") if counts.max() > 2 * counts.min() else (None,)
    z = _standardizer(features_train)
    xtr, xva, xte = z(features_train), z(features_val), z(features_test)

    def scores(clf, x, y):
        if len(y) == 0:
            return float("nan"), float("nan"), float("nan")
        pred = clf.predict(x)
        return (float(np.mean(pred == y)), float(f1_score(y, pred, average="macro", zero_division=0)),
                float(f1_score(y, pred, average="weighted", zero_division=0)))

    best = None
    for weight in class_weights:
        # Ascending C with warm starts: each fit starts from the previous (more regularised)
        # solution, ~2x faster than cold starts; the chosen model's test metrics are kept.
        clf = LogisticRegression(max_iter=500, warm_start=True, class_weight=weight)
        for c in sorted(cs):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.set_params(C=float(c)).fit(xtr, y_train)
            val = scores(clf, xva, y_val) if len(y_val) else scores(clf, xtr, y_train)
            key = tuple(-1.0 if np.isnan(v) else v for v in (val[1], val[0]))
            if best is None or key > best[0]:
                best = (key, float(c), weight, scores(clf, xte, y_test), scores(clf, xva, y_val))
    _, c, weight, (acc, f1, wf1), (val_acc, val_f1, val_wf1) = best
    return {"accuracy": acc, "macro_f1": f1, "weighted_f1": wf1, "val_accuracy": val_acc, "val_macro_f1": val_f1,
            "val_weighted_f1": val_wf1, "C": c, "balanced": weight == "balanced"}


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
    was_training = encoder.training
    encoder.eval()
    try:
        parts = [encoder(normalization(x[i:i + batch_size]).to(device)).float().cpu()
                 for x in blocks for i in range(0, x.shape[0], batch_size)]
    finally:
        encoder.train(was_training)
    if not parts:
        return np.zeros((0, getattr(encoder, "out_dim", 0)), dtype=np.float32)
    return torch.cat(parts).numpy().astype(np.float32, copy=False)


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


# --------------------------------------------------------------------------- plots


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def save_plots(run_dir: str | os.PathLike, embedding: np.ndarray, rec: Recording, split=(0.7, 0.1, 0.2),
               reach_min_speed: float = 5.0, tsne: bool = True, seed: int = 0, suffix: str = "") -> list[Path]:
    """``tsne{suffix}.png`` (t-SNE of <= 2000 rows, moving bins for reach data, coloured by
    the main label) and ``mined_label_agreement{suffix}.png`` (from metrics.jsonl; suffix
    e.g. "-session1" in multi-session runs). Returns the written paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    written = []
    main = rec.main_label
    speed = hand_speed(rec)
    if tsne and len(embedding) >= 5:
        from sklearn.manifold import TSNE

        rows = np.arange(len(embedding))
        if main == "target" and speed is not None and (speed > reach_min_speed).sum() >= 5:
            rows = rows[speed > reach_min_speed]
        if len(rows) > TSNE_MAX_ROWS:  # evenly spaced in time: deterministic, covers the session
            rows = rows[np.linspace(0, len(rows) - 1, TSNE_MAX_ROWS).round().astype(int)]
        xy = TSNE(n_components=2, init="pca", perplexity=min(30.0, (len(rows) - 1) / 3.0),
                  random_state=seed).fit_transform(embedding[rows].astype(np.float64))
        fig, ax = plt.subplots(figsize=(6, 5.5))
        if main is not None:
            lab = rec.labels[main][rows]
            known = lab >= 0
            ax.scatter(xy[~known, 0], xy[~known, 1], s=4, c="lightgrey")
            sc = ax.scatter(xy[known, 0], xy[known, 1], s=5, c=lab[known],
                            cmap="hsv" if main == "target" else "tab10")
            fig.colorbar(sc, ax=ax, label=main)
        else:
            ax.scatter(xy[:, 0], xy[:, 1], s=4, c=np.arange(len(rows)), cmap="viridis")
        ax.set_title(f"t-SNE of the representation ({len(rows)} bins)")
        ax.set_xticks([]), ax.set_yticks([])
        fig.tight_layout()
        path = run_dir / f"tsne{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    chance = None
    if main is not None:  # agreement of a random pick: sum_c p_c^2 over the train split
        lab = rec.labels[main][split_rows(rec.trial, split)["train"]]
        lab = lab[lab >= 0]
        if len(lab):
            p = np.bincount(lab) / len(lab)
            chance = float((p ** 2).sum())
    written.append(save_agreement_plot(run_dir, chance, main, suffix))
    return written


def save_agreement_plot(run_dir: str | os.PathLike, chance: float | None = None, label: str | None = None,
                        suffix: str = "") -> Path:
    """``mined_label_agreement{suffix}.png``: the share of mined views with their anchor's
    label over training steps (from metrics.jsonl), and the share a random pick would get
    (``chance``, e.g. sum_c p_c^2 of the training labels). Returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = [r for r in _read_metrics(run_dir / "metrics.jsonl") if r.get("mined_label_agreement_ratio") is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if rows:
        ax.plot([r["step"] for r in rows], [r["mined_label_agreement_ratio"] for r in rows], lw=1)
        if chance is not None:
            ax.axhline(chance, color="grey", ls="--", lw=1, label="random pick")
            ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "no mined views logged (BYOL, or no labels)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel(f"mined label agreement{f' ({label})' if label else ''}")
    ax.set_ylim(0, 1)
    fig.tight_layout()
    path = run_dir / f"mined_label_agreement{suffix}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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


# --------------------------------------------------------------------------- run-level


def load_run(run_dir: str | os.PathLike) -> tuple[Config, dict]:
    """(config, checkpoint) of a run directory; UserError naming what is missing or unusable."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        if run_dir.exists():
            raise UserError(f"--run {run_dir}: is a file, not a run directory; pass the directory that holds "
                            "checkpoint.pt")
        raise UserError(f"--run {run_dir}: no such run directory")
    path = run_dir / CHECKPOINT_NAME
    ckpt = load_checkpoint(path, fix=EVALUATE_FIX)
    try:
        cfg = build_config(ckpt["config"])
    except ConfigError as err:
        raise checkpoint_error(path, f"its stored config is not valid ({err})", EVALUATE_FIX) from None
    return cfg, ckpt


def export_target(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """The ``--export-embeddings`` path, checked before any work: UserError when it is a
    directory, an existing file (unless ``overwrite``), or its directory is missing or not
    writable."""
    path = Path(path)
    flag = f"--export-embeddings {path}"
    if path.is_dir():
        raise UserError(f"{flag}: is a directory; give a file name (e.g. {path / 'embeddings.npz'})")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise UserError(f"{flag}: exists and is not a regular file; choose another file")
        if not overwrite:
            raise UserError(f"{flag}: the file already exists; pass --overwrite to replace it or choose another file")
    parent = path.parent
    if not parent.is_dir():
        raise UserError(f"{flag}: directory {parent} does not exist; create it or choose another location")
    if dir_write_error(parent) is not None:
        raise UserError(f"{flag}: directory {parent} is not writable; choose another location")
    return path


def export_arrays(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """``--export-embeddings``: ``arrays`` in one .npz, written atomically (a temporary
    sibling, then os.replace), so a failed export leaves nothing behind. The target was
    checked (and an existing file allowed or refused) by :func:`export_target` beforehand."""
    path = export_target(path, overwrite=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(f"--export-embeddings {path}: cannot write it ({err.strerror or err}); "
                        "choose another location") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def evaluate_run(run_dir: str | os.PathLike, data: str | None = None, export: str | None = None,
                 plots: bool = True, overwrite: bool = False) -> dict:
    """Evaluate a run's final checkpoint on its store (or ``data``); returns the metrics dict.
    ``export``: the embeddings' .npz (an existing file only with ``overwrite``).

    Runs on image shards are evaluated by :func:`pipeline.images.evaluate_image_run`."""
    cfg, ckpt = load_run(run_dir)
    if export:
        export_target(export, overwrite)  # before minutes of evaluation, not after
    if plots and dir_write_error(run_dir) is not None:
        raise UserError(f"--run {run_dir}: the run directory is not writable, so the plots cannot be saved; "
                        "pass --no-plots")
    if ckpt.get("data_kind") == "images":
        from .images import evaluate_image_run

        return evaluate_image_run(run_dir, cfg, ckpt, data=data, export=export, plots=plots)
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
    model = build_model(cfg, n_units if len(norms) > 1 else n_units[0])
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


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Evaluate a trained run: frozen encoder -> linear read-outs "
                      "(reach direction, labels; images: linear probe and weighted kNN accuracy) -> one JSON "
                      "object on stdout; plots in the run dir (t-SNE and mining agreement; images: mined views "
                      "and the mining class confusion).")
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory (holds checkpoint.pt)")
    p.add_argument("--data", metavar="URL", help="recording store (or image shard set) to evaluate on "
                                                 "(default: the run's data.path)")
    p.add_argument("--export-embeddings", metavar="OUT.npz",
                   help="write embedding (T, D) float32, one row per store row, + bin_start_s, trial "
                        "(images: one row per image of the eval selection, + sample, label)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --export-embeddings file")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.export_embeddings == "":
        raise UsageError("--export-embeddings: empty file name; give e.g. --export-embeddings OUT.npz")
    if args.overwrite and not args.export_embeddings:
        raise UsageError("--overwrite only applies to --export-embeddings OUT.npz; pass that too or drop it")
    results = evaluate_run(args.run, args.data, args.export_embeddings, plots=not args.no_plots,
                           overwrite=args.overwrite)
    print(to_json(results))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, None, PROG))
