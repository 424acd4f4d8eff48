"""``python -m pipeline.train [--config FILE.yaml] [--set key=value ...]``

Self-supervised training of MYOW (or BYOL: ``--set method.name=byol``, the same code
with the mining weight at 0) on a recording store or on image shards (``data.kind``,
detected from ``data.path``), then evaluation. With no arguments it runs the embedded
demo (see :mod:`pipeline.demo`).

This module only parses and dispatches: the loop is :func:`pipeline.loop.train`, the
start-up :func:`pipeline.startup.start_run`, the step :func:`pipeline.step.train_step`, the
data kind and the read-outs are chosen by :mod:`pipeline.kinds`, the method by
:mod:`pipeline.methods`.

One optimizer step (:func:`train_step`, paper Algorithm 1)::

    x1, x2, x_m, meta  <- anchor sampler (B)          x_pool, meta_pool <- pool sampler (L)
    loss_aug   = d(q(z1), z2') + d(q(z2), z1')        symmetric BYOL term
    y_m        = f(x_m)                               online, with grad
    y_pool'    = f'(x_pool)                           target, no grad; all-gathered (seam)
    idx        = random pick among k-NN of y_m in y_pool', same trial / too close in time masked
    loss       = loss_aug + lambda * d(r(v_m), v'_idx)
    backward; optimizer step; target EMA

The loop (:func:`pipeline.loop.train`) only decides when to log (``metrics.jsonl`` + tqdm), save
(``checkpoint.pt``, atomic) and evaluate. The run directory holds ``config.yaml`` (the
resolved config), ``metrics.jsonl``, ``checkpoint.pt``, ``eval.json``/``evaluations.jsonl``
and the evaluation plots. A run directory with a checkpoint is resumed exactly.
"""


from __future__ import annotations

import argparse
import sys
from pathlib import Path

from preprocess.errors import run_cli, setup_logging

from .cli import OneLineParser, to_json
from .config import load_config
from .distributed import configure_rank_logging, init_distributed, shutdown
from .kinds import check_kind, data_kind
from .loop import train
from .startup import check_run_dir

PROG = "python -m pipeline.train"

# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Train MYOW (or BYOL) on a recording store or on image shards (written by "
                    "python -m preprocess.shard_images; data.kind auto-detects which), then evaluate it. "
                    "With no arguments: the embedded demo (simulated reach session, ~1 minute on a CPU).",
        epilog="Examples:\n"
               "  python -m pipeline.train --config configs/reach_myow.yaml --set data.path=chewie.zarr\n"
               "  python -m pipeline.train --config configs/reach_myow.yaml --set method.name=byol --set run.seed=1\n"
               "  python -m pipeline.train --demo --set train.max_steps=100\n"
               "Images (configs/mnist_myow.yaml, mnist_byol.yaml: small convnet, minutes on a CPU; "
               "configs/cifar10_myow.yaml, cifar10_byol.yaml: the paper's ResNet-18 setting, for a GPU):\n"
               "  python -m preprocess.shard_images ../shared/data/mnist-t10k --out mnist-shards\n"
               "  python -m pipeline.train --config configs/mnist_myow.yaml --set data.path=mnist-shards\n"
               "  python -m pipeline.train --config configs/cifar10_myow.yaml --set data.path=cifar10-shards\n"
               "Keys: data.*, augment.*, model.*, method.*, optim.*, train.*, run.*, metrics.*, eval.*, images.* "
               "(see configs/*.yaml and pipeline/config.py).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config (sections data, model, method, optim, ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=0.002 (repeatable; value parsed as YAML)")
    p.add_argument("--demo", action="store_true",
                   help="run the demo (what no arguments do); --config/--set then adjust the demo config")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.demo or not argv:
        from .demo import run_demo

        return run_demo(args.set, args.config)
    cfg = load_config(args.config, args.set)
    if cfg.method.name == "supervised":
        check_kind(cfg, data_kind(cfg))
        from .supervised import train_supervised

        if cfg.run.dir:
            check_run_dir(Path(cfg.run.dir))
        run_dir, results = train_supervised(cfg)
        print(to_json({**results, "run_dir": str(run_dir)}))
        return 0
    env = init_distributed(cfg.run.device, cfg.run.dist_timeout_s)  # torchrun's ranks, or a world of one
    configure_rank_logging(env)
    try:
        run_dir, results = train(cfg, env=env)
    finally:
        shutdown(env)
    if env.is_main:
        print(to_json({**results, "run_dir": str(run_dir)}))
        print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, None, PROG))
