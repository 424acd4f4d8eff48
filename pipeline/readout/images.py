"""Image read-outs: embeddings, linear probe + kNN, mining pictures, run evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from model import mine_views

from ..data.image_shards import ShardSet
from ..data.image_views import ImageNormalization
from ..data.images import Selection, load_selection, resolve_selections
from ..runtime import set_threads
from .pictures import save_agreement_plot, save_confusion, save_mining_grid
from .probes import frozen_features, knn_accuracy, linear_probe_details
from .runs import export_arrays

# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def embed_images(encoder: torch.nn.Module, images_uint8: torch.Tensor, normalize: ImageNormalization,
                 device: str | torch.device = "cpu", batch_size: int = 512) -> torch.Tensor:
    """Frozen-encoder representations of un-augmented images: (n, C, H, W) uint8 -> (n, D)
    float32 on the CPU (the encoder runs in eval mode; its mode is restored afterwards)."""
    features = frozen_features(encoder, (normalize.normalize_uint8(chunk.to(device, non_blocking=True))
                                         for chunk in images_uint8.split(batch_size)))
    return torch.empty(0) if features is None else features


# --------------------------------------------------------------------------- image evaluation


def _class_names(classes: Sequence[str], *labels: torch.Tensor) -> list[str]:
    n = max([len(classes)] + [int(y.max()) + 1 for y in labels if len(y)])
    return [classes[i] if i < len(classes) else str(i) for i in range(n)]


def evaluate_images(model, cfg, normalization: ImageNormalization, train_images: torch.Tensor,
                    train_labels: torch.Tensor, eval_images: torch.Tensor, eval_labels: torch.Tensor, *,
                    classes: Sequence[str] = (), device="cpu", run_dir=None, plots: bool = False,
                    return_features: bool = False):
    """The image read-outs of a (frozen) MYOW/BYOL model.

    The online encoder embeds the un-augmented training and eval selections (eval mode);
    ``linear_accuracy``: the logistic-regression probe of :func:`linear_probe_details`,
    trained on the training selection (its L2 weight chosen on a split of the TRAINING
    selection: the eval images are only scored), scored on the eval selection;
    ``knn_accuracy``: weighted kNN (``eval.knn_k``, ``eval.knn_temperature``).

    With ``plots`` (and ``run_dir``): ``eval.mining_anchors`` eval images are mined, as in
    training, against a pool of ``method.pool_size`` training images (online y of the
    anchors, target y' of the pool, a random pick among the ``method.k`` nearest;
    :func:`model.miner.mine_views`; the two selections share no image, so nothing is
    excluded): ``mined_views.png`` shows anchor / mined pairs (paper Figure 2),
    ``mining_confusion.png`` the mining class-confusion matrix (Figure S6), and
    ``mining_class_agreement`` their share of same-class pairs. ``mined_label_agreement.png``
    plots the training-time agreement from metrics.jsonl.

    Returns the metrics dict (and the eval features (n, D) with ``return_features``).
    """
    device = torch.device(device)
    train_f = embed_images(model.encoder, train_images, normalization, device)
    eval_f = embed_images(model.encoder, eval_images, normalization, device)
    probe = linear_probe_details(train_f, train_labels, eval_f, eval_labels, seed=cfg.run.seed, device=device)
    results = {
        "linear_accuracy": probe["accuracy"],
        "knn_accuracy": knn_accuracy(train_f, train_labels, eval_f, eval_labels, k=cfg.eval.knn_k,
                                     temperature=cfg.eval.knn_temperature),
        "linear_l2": probe["l2"],
        "linear_val_accuracy": max(probe["val_accuracy"].values()) if probe["val_accuracy"] else None,
        "train_images": len(train_labels), "eval_images": len(eval_labels),
    }
    if plots and run_dir is not None and len(eval_labels) and len(train_labels):
        run_dir = Path(run_dir)
        names = _class_names(classes, train_labels, eval_labels)
        g = torch.Generator().manual_seed(cfg.run.seed)
        anchors = torch.randperm(len(eval_labels), generator=g)[:cfg.eval.mining_anchors]
        pool = torch.randperm(len(train_labels), generator=g)[:cfg.method.pool_size]
        target = getattr(model, "target", None)  # MYOW/BYOL: the target network; SimCLR has none
        pool_encoder = target["encoder"] if target is not None else model.encoder
        pool_y = embed_images(pool_encoder, train_images[pool], normalization, device)
        picked = mine_views(eval_f[anchors], pool_y, cfg.method.k, g)  # (A,) into the pool, never -1 here
        mined = pool[picked]
        a_labels, m_labels = eval_labels[anchors], train_labels[mined]
        save_mining_grid(run_dir / "mined_views.png", eval_images[anchors], train_images[mined], n=10,
                         anchor_labels=a_labels, mined_labels=m_labels, class_names=names,
                         title=f"eval anchors (top) and the views they mine among {len(pool)} training images")
        counts = save_confusion(run_dir / "mining_confusion.png", a_labels, m_labels, names,
                                title=f"mining class confusion, {len(anchors)} eval anchors")
        results["mining_class_agreement"] = float(np.trace(counts) / max(1, counts.sum()))
        p = torch.bincount(train_labels.long(), minlength=len(names)).double() / len(train_labels)
        save_agreement_plot(run_dir, float((p ** 2).sum()), "class")
    return (results, eval_f) if return_features else results


def evaluate_image_data(data, model, cfg, *, device, run_dir=None, plots: bool = False) -> dict:
    """End-of-training read-outs of an :class:`~pipeline.data.images.ImageTrainData`."""
    s = data.sessions[0]
    train_x, train_y = data.images("train")
    eval_x, eval_y = data.images("eval")
    return evaluate_images(model, cfg, s.normalization, train_x, train_y, eval_x, eval_y, classes=s.classes,
                           device=device, run_dir=run_dir, plots=plots)


def evaluate_image_run(run_dir, cfg, ckpt: dict, data: str | None = None, export: str | None = None,
                       plots: bool = True, *, build: Callable) -> dict:
    """``python -m pipeline.evaluate --run RUN_DIR`` (``build``: the method's model builder) for a run on image shards: rebuild the
    model from the checkpoint (the image channels and normalisation constants are stored
    in it), load the run's training and eval selections (``data`` replaces data.path) and
    evaluate with :func:`evaluate_images`. ``export`` writes ``embedding`` (n, D) float32 of
    the eval selection, with ``sample`` and ``label``, atomically."""
    set_threads(cfg.run.threads, images=True)  # as at the end of training (see set_threads)
    state = ckpt["normalization"]
    norm = ImageNormalization.from_state_dict(state)
    if data is not None:
        cfg.data.path = data
    train_sel, eval_sel = resolve_selections(cfg)
    d = cfg.data
    size = int(state.get("image_size") or cfg.images.image_size or _native_size(train_sel, d))
    train_x, train_y, _ = load_selection(train_sel, size, d.storage_options, d.read_threads, d.read_retries)
    eval_x, eval_y, samples = load_selection(eval_sel, size, d.storage_options, d.read_threads, d.read_retries)
    model = build(cfg, norm.channels)
    model.load_state_dict(ckpt["model"])
    use_cuda = cfg.run.device != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    model.to(device)
    classes = ShardSet(train_sel.url, d.storage_options, train_sel.range).classes
    results, eval_f = evaluate_images(model, cfg, norm, train_x, train_y, eval_x, eval_y, classes=classes,
                                      device=device, run_dir=run_dir, plots=plots, return_features=True)
    if export:
        export_arrays(export, embedding=eval_f.numpy().astype(np.float32), sample=samples.numpy(),
                      label=eval_y.numpy())
    results["step"] = int(ckpt["step"])
    return results


def _native_size(selection: Selection, d) -> int:
    first = ShardSet(selection.url, d.storage_options, selection.range).first_image()
    return int(min(first.shape[-2:]))
