"""``python -m pipeline.evaluate --run RUN_DIR [--data URL] [--export-embeddings OUT.npz]``

Frozen online encoder -> representation of every store row (un-augmented, normalised
input, eval mode) -> linear read-outs for every task the data has -> one JSON object on
stdout. Also writes two PNGs into the run directory: a t-SNE of the embedding coloured by
the main label, and the mined-view label agreement over training steps.

Tasks (splits by trial order / time blocks as in training, docs/contracts.md section 8):

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
:func:`pipeline.readout.images.evaluate_image_run`: ``linear_accuracy`` (logistic-regression probe,
training selection -> eval selection, L2 chosen on a split of the training selection),
``knn_accuracy`` (weighted kNN), and the PNGs ``mined_views.png`` (paper Figure 2) and
``mining_confusion.png`` (Figure S6).
"""

from __future__ import annotations

import argparse
import sys

from preprocess.errors import UsageError, run_cli, setup_logging

from .cli import OneLineParser, to_json
from .kinds import evaluate_run

PROG = "python -m pipeline.evaluate"


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
