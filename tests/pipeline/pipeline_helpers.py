"""Helpers for the pipeline tests: tiny synthetic reach stores and tiny configs.

(Not a conftest.py: tests/conftest.py is imported as the module ``conftest`` by other tests.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from preprocess import bin_spikes

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(__file__).parents[2] / ".." / "shared" / "data"
CHEWIE_NPZ = SHARED_DATA / "reach-chewie-2013-10-03" / "chewie-2013-10-03-binned-100ms.npz"


def reach_arrays(n_trials: int = 40, bins_per_trial: int = 12, n_units: int = 16, seed: int = 0,
                 trials: bool = True) -> dict[str, np.ndarray]:
    """A center-out-like session: each trial reaches to target k (k * 45 deg) with a bell-shaped
    speed profile; units are cosine-tuned to the direction, scaled by speed (Poisson counts)."""
    rng = np.random.default_rng(seed)
    target = np.repeat(rng.integers(0, 8, n_trials), bins_per_trial)
    phase = np.tile(np.arange(bins_per_trial), n_trials)
    speed = 25.0 * np.sin(np.pi * phase / (bins_per_trial - 1))  # 0 at the ends, > 5 cm/s in between
    angle = target * np.pi / 4
    velocity = np.stack([np.cos(angle), np.sin(angle)], 1) * speed[:, None]
    preferred = rng.uniform(0, 2 * np.pi, n_units)
    rate = 5.0 + 30.0 * (speed / 25.0)[:, None] * (1 + np.cos(angle[:, None] - preferred[None, :]))
    arrays = {"counts": rng.poisson(rate * 0.1).astype(np.uint16), "bin_size": np.array(0.1),
              "target": target.astype(np.int64), "velocity": velocity.astype(np.float32)}
    if trials:
        arrays["trial"] = np.repeat(np.arange(n_trials), bins_per_trial).astype(np.int32)
    return arrays


def make_store(folder: Path, name: str = "s", **kwargs) -> str:
    """Write ``reach_arrays(**kwargs)`` as an npz and bin it into ``folder/name.zarr``."""
    folder.mkdir(parents=True, exist_ok=True)
    npz = folder / f"{name}.npz"
    np.savez(npz, **reach_arrays(**kwargs))
    out = folder / f"{name}.zarr"
    assert bin_spikes.main([str(npz), "--out", str(out), "--no-progress"]) == 0
    return str(out)


def tiny_overrides(store: str, run_dir: Path, steps: int = 30, **extra) -> list[str]:
    """--set overrides for a fast CPU run on a tiny store."""
    values = {
        "data.path": store, "run.dir": str(run_dir), "run.threads": 1, "run.progress": False,
        "run.device": "cpu", "train.max_steps": steps, "train.log_every": 1, "train.checkpoint_every": 1000,
        "optim.batch_size": 32, "optim.warmup_epochs": 1, "method.pool_size": 64, "method.mining_ramp_epochs": 1,
        "model.hidden_dim": 16, "model.num_blocks": 2, "model.out_dim": 8, "model.predictor_hidden": 16,
        "data.min_speed": 5.0, "eval.tsne": False,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def write_store(url: str, arrays: dict[str, np.ndarray], chunk_rows: int, storage_options: dict | None = None,
                chunks_per_shard: int = 4) -> str:
    """Write ``reach_arrays``-like arrays as a store with small chunks (many blocks to stream)."""
    from fractions import Fraction

    from preprocess import sources
    from preprocess.store import StoreLayout

    counts = arrays["counts"]
    n_rows, n_units = counts.shape
    rec = sources.Recording(
        format="npz", path="<test>", bin_size=Fraction(str(float(arrays["bin_size"]))), n_rows=n_rows,
        unit_ids=np.arange(n_units), unit_quality=np.array(["good"] * n_units), files=[], counts=counts,
        trial=arrays.get("trial"), labels={"target": arrays["target"]} if "target" in arrays else {},
        behavior={"velocity": arrays["velocity"]} if "velocity" in arrays else {},
        bin_start_s=arrays.get("bin_start_s"))
    layout = StoreLayout(n_rows, n_units, chunk_rows, chunk_rows * chunks_per_shard)
    bin_spikes.write_recording(rec, url, storage_options or {}, overwrite=False, scheduler="synchronous",
                               progress=False, layout=layout)
    return url


class Interrupted(Exception):
    """What :func:`train_killed_at_fetch` raises in place of a batch."""


def train_killed_at_fetch(cfg, fetch: int) -> None:
    """Run ``pipeline.loop.train(cfg)`` and kill it while its anchor stream fetches its
    ``fetch``-th batch (the stream runs in the prefetch thread, reads ahead, and its error
    reaches the trainer in order), as a crash between checkpoints would."""
    import pytest

    from pipeline.kinds import build_train_data
    from pipeline.loop import train

    data = build_train_data(cfg)
    sampler = type(data.sessions[0].anchors.source)
    real_next, calls = sampler.__next__, {"n": 0}

    def flaky_next(self):
        calls["n"] += 1
        if calls["n"] == fetch:
            raise Interrupted
        return real_next(self)

    sampler.__next__ = flaky_next
    try:
        with pytest.raises(Interrupted):
            train(cfg, data=data)
    finally:
        sampler.__next__ = real_next
