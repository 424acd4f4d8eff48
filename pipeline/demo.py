"""The embedded demo: ``python -m pipeline.train`` with no arguments.

1. simulate a center-out reach session (``preprocess.simulate``: cosine-tuned Poisson
   units, 8 targets, hand kinematics) and write it as NWB into a fresh run directory;
2. bin it into a recording store there (``preprocess.bin_spikes``, 100 ms bins);
3. train MYOW with ``configs/demo.yaml`` (about a minute on a 2-core CPU);
4. evaluate and print the reach accuracy and where the run directory is.

``python -m pipeline.train --demo --set train.max_steps=50`` runs a shortened demo
(tests); ``--config`` replaces ``configs/demo.yaml``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from preprocess.errors import UserError

from .cli import to_json
from .config import load_config

log = logging.getLogger("pipeline.demo")

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
DEMO_UNITS = 60
DEMO_TRIALS = 200  # ~8 minutes of recording, ~4700 bins of 100 ms


def run_demo(overrides: list[str] | tuple[str, ...] = (), config: str | None = None) -> int:
    """Simulate, bin, train and evaluate; prints a summary. Returns the exit code (0)."""
    from preprocess import bin_spikes
    from preprocess.simulate import simulate_reach_session, write_nwb

    from .train import train

    config = config or DEMO_CONFIG
    if not Path(config).is_file():
        raise UserError(f"{config}: demo config not found; run from a source checkout or pass --config")
    cfg = load_config(config, overrides)  # validate before spending time on the simulation
    run_dir = Path(cfg.run.dir) if cfg.run.dir else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    if (run_dir / "checkpoint.pt").exists():
        raise UserError(f"{run_dir}: already holds a run; choose another run.dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    log.info("simulating a reach session (%d units, %d trials, seed %d)", DEMO_UNITS, DEMO_TRIALS, cfg.run.seed)
    session = simulate_reach_session(n_units=DEMO_UNITS, n_trials=DEMO_TRIALS, seed=cfg.run.seed)
    nwb = write_nwb(session, run_dir / "session.nwb")
    store = run_dir / "session.zarr"
    code = bin_spikes.main([str(nwb), "--out", str(store), "--bin-size", "0.1", "--units", "all", "--no-progress"])
    if code:
        raise UserError(f"{store}: binning the simulated session failed")

    cfg.data.path, cfg.run.dir = str(store.resolve()), str(run_dir)  # absolute: evaluate from anywhere
    run_dir, results = train(cfg)
    seconds = time.perf_counter() - started
    print(to_json({**results, "run_dir": str(run_dir), "seconds": round(seconds, 1)}))
    acc, delta = results.get("reach_acc"), results.get("reach_delta_acc")
    if acc is not None:
        print(f"reach direction from the learned representation (linear read-out, test trials): "
              f"accuracy {acc:.1%} (chance 12.5%), delta-accuracy {delta:.1%}")
    print(f"run directory: {run_dir} (config.yaml, metrics.jsonl, checkpoint.pt, tsne.png, "
          f"mined_label_agreement.png); {seconds:.0f} s in all")
    print(f"evaluate again with: python -m pipeline.evaluate --run {run_dir}")
    return 0
