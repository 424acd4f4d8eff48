"""Pure read-out probes on arrays, the paper's protocols: the reach-direction ridge map
(with its trial-grouped cross-validated form), multinomial logistic regression of labels,
the image linear probe and weighted kNN, and the frozen-encoder pass they read.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as TF

REACH_ALPHAS = 2.0 ** np.arange(-10, 11)  # 21 ridge strengths, 2^-10 .. 2^10
LOGREG_CS = 10.0 ** np.arange(-3, 4)  # inverse L2 strengths of the logistic regression
ACC_WINDOW = np.pi / 8  # +-22.5 deg: the nearest of 8 directions
DELTA_ACC_WINDOW = 3 * np.pi / 16  # +-33.75 deg
MAX_CLASSES = 64  # labels with more classes are not classification tasks (e.g. ids)
TSNE_MAX_ROWS = 2000


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

def _fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, max_iter: int):
    W = torch.zeros(x.shape[1], n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure():
        opt.zero_grad()
        loss = TF.cross_entropy(x @ W + b, y) + l2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def linear_probe_details(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                         test_labels: torch.Tensor, *, l2_grid: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
                         val_fraction: float = 0.2, seed: int = 0, max_iter: int = 300,
                         device: str | torch.device = "cpu") -> dict:
    """Multinomial logistic regression on frozen features, the L2 weight chosen on a
    validation split carved from TRAIN (stratified, ``val_fraction`` of each class; the test
    set is never looked at), then refitted on all of train and scored on test.

    Features are standardised with train statistics; full-batch L-BFGS in float32.
    Returns {"accuracy", "l2", "val_accuracy": {l2: acc}, "n_train", "n_test"}.
    """
    xtr, xte = train_features.float().to(device), test_features.float().to(device)
    ytr, yte = train_labels.long().to(device), test_labels.long().to(device)
    mean = xtr.mean(0)
    std = xtr.std(0).clamp(min=1e-6) if len(xtr) > 1 else torch.ones_like(mean)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    n_classes = int(max(ytr.max().item(), yte.max().item() if len(yte) else 0)) + 1
    rng = np.random.default_rng(seed)
    labels = ytr.cpu().numpy()
    val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = int(round(len(members) * val_fraction))
        if 0 < k < len(members):
            val[rng.choice(members, k, replace=False)] = True
    scores = {}
    if val.any() and len(l2_grid) > 1:
        fit, held = torch.from_numpy(~val).to(device), torch.from_numpy(val).to(device)
        for l2 in l2_grid:
            W, b = _fit_logistic(xtr[fit], ytr[fit], n_classes, float(l2), max_iter)
            scores[float(l2)] = ((xtr[held] @ W + b).argmax(1) == ytr[held]).float().mean().item()
        best = max(scores.values())
        chosen = max(l2 for l2, s in scores.items() if s >= best - 1e-12)  # ties: the stronger penalty
    else:
        chosen = float(l2_grid[len(l2_grid) // 2])
    W, b = _fit_logistic(xtr, ytr, n_classes, chosen, max_iter)
    accuracy = ((xte @ W + b).argmax(1) == yte).float().mean().item() if len(yte) else float("nan")
    return {"accuracy": accuracy, "l2": chosen, "val_accuracy": scores, "n_train": len(ytr), "n_test": len(yte)}


@torch.no_grad()
def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 200, temperature: float = 0.1, chunk_size: int = 1024,
                 num_classes: int | None = None) -> float:
    """Weighted kNN monitor (Wu et al. 2018, as in BYOL-style training logs): cosine
    similarity to every training feature, the k nearest vote for their class with weight
    exp(sim / temperature); accuracy of the top-scoring class."""
    tr = TF.normalize(train_feats.float(), dim=1)
    te = TF.normalize(test_feats.float().to(tr.device), dim=1)
    ytr, yte = train_labels.long().to(tr.device), test_labels.long().to(tr.device)
    C = num_classes or int(max(ytr.max().item(), yte.max().item() if len(yte) else 0)) + 1
    k = min(int(k), len(tr))
    correct = 0
    for start in range(0, len(te), chunk_size):
        sim = te[start:start + chunk_size] @ tr.T
        w, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(w), C, device=tr.device).scatter_add_(1, ytr[idx], (w / temperature).exp())
        correct += (votes.argmax(1) == yte[start:start + chunk_size]).sum().item()
    return correct / max(1, len(te))


@torch.no_grad()
def frozen_features(encoder: torch.nn.Module, batches) -> torch.Tensor | None:
    """The one frozen-encoder pass of the read-outs: ``encoder`` in eval mode (BatchNorm
    running statistics; its previous mode restored afterwards) over ``batches`` (an iterable
    of prepared input tensors, consumed lazily) -> (n, D) float32 on the CPU, in order;
    None when there are no batches."""
    was_training = encoder.training
    encoder.eval()
    try:
        parts = [encoder(x).float().cpu() for x in batches]
    finally:
        encoder.train(was_training)
    return torch.cat(parts) if parts else None
