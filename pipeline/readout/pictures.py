"""The evaluation pictures: t-SNE of an embedding, mined-view label agreement over training,
anchor / mined-view grids of images (paper Figure 2) and the mining confusion matrix
(Figure S6).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..cli import read_jsonl
from ..data.image_views import ImageNormalization
from ..data.recording import Recording, hand_speed, split_rows
from .probes import TSNE_MAX_ROWS

TSNE_ITERATIONS = 500

# --------------------------------------------------------------------------- plots


def _records(path: Path) -> list[dict]:
    return [record for _, record in read_jsonl(path)]


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
        # 500 iterations (250 of them early exaggeration) lay out <= 2000 points as well as
        # the default 1000 for a picture, in half of the time (3.3 s of a reach run's 12 s
        # evaluation at 1000)
        xy = TSNE(n_components=2, init="pca", perplexity=min(30.0, (len(rows) - 1) / 3.0),
                  max_iter=TSNE_ITERATIONS, random_state=seed).fit_transform(embedding[rows].astype(np.float64))
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
    rows = [r for r in _records(run_dir / "metrics.jsonl") if r.get("mined_label_agreement_ratio") is not None]
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


# --------------------------------------------------------------------------- pictures


def to_uint8(x: torch.Tensor, normalization: ImageNormalization | None = None) -> torch.Tensor:
    """Normalised float views (n, C, H, W) back to uint8 images (for pictures)."""
    if normalization is not None:
        mean, std = normalization.tensors(x.device)
        x = x * std + mean
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _show(ax, image: torch.Tensor) -> None:
    image = image.detach().cpu()
    if image.dtype != torch.uint8:
        image = to_uint8(image)
    if image.shape[0] == 1:
        ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(image.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def save_mining_grid(path, anchors: torch.Tensor, mined: torch.Tensor, n: int = 8, *,
                     anchor_labels: torch.Tensor | None = None, mined_labels: torch.Tensor | None = None,
                     class_names: Sequence[str] | None = None, title: str | None = None) -> None:
    """A PNG of anchor (top row) / mined view (bottom row) pairs, as the paper's Figure 2.

    anchors, mined: (N, C, H, W) uint8 (see :func:`to_uint8` for normalised views); the
    first ``n`` pairs are drawn; with labels, each image is captioned with its class.
    """
    n = min(n, len(anchors), len(mined))
    if n == 0:
        raise ValueError("save_mining_grid: no pairs to draw")
    fig = _figure(1.3 * n, 3.4)
    axes = fig.subplots(2, n, squeeze=False)
    for i in range(n):
        for row, (images, labels) in enumerate(((anchors, anchor_labels), (mined, mined_labels))):
            ax = axes[row][i]
            _show(ax, images[i])
            if labels is not None:
                c = int(labels[i])
                ax.set_title(class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c),
                             fontsize=8)
        axes[0][i].set_ylabel("anchor" if i == 0 else "", fontsize=8)
        axes[1][i].set_ylabel("mined" if i == 0 else "", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)


def save_confusion(path, anchor_labels: torch.Tensor, mined_labels: torch.Tensor, class_names: Sequence[str], *,
                   title: str = "mining class confusion") -> np.ndarray:
    """A PNG of the mining class-confusion matrix (paper Figure S6): rows the anchor's class,
    columns the mined view's class, each row normalised to sum 1. Pairs with a negative
    label (no mined view) are left out. Returns the (C, C) int64 count matrix."""
    C = len(class_names)
    a = torch.as_tensor(anchor_labels).long().cpu()
    m = torch.as_tensor(mined_labels).long().cpu()
    keep = (a >= 0) & (m >= 0) & (a < C) & (m < C)
    counts = torch.zeros(C * C, dtype=torch.int64).index_add_(0, a[keep] * C + m[keep],
                                                              torch.ones(int(keep.sum()), dtype=torch.int64))
    counts = counts.view(C, C).numpy()
    rates = counts / np.maximum(1, counts.sum(1, keepdims=True))
    side = max(4.0, 0.45 * C + 2)
    fig = _figure(side, side)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(rates, vmin=0, vmax=1, cmap="viridis")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(C), labels=list(class_names), rotation=90, fontsize=7)
    ax.set_yticks(range(C), labels=list(class_names), fontsize=7)
    ax.set_xlabel("mined view class")
    ax.set_ylabel("anchor class")
    agreement = np.trace(counts) / max(1, counts.sum())
    ax.set_title(f"{title} (agreement {agreement:.1%})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return counts


