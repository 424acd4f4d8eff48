"""The embedded demo: ``python -m pipeline.train`` with no arguments.

1. simulate a center-out reach session (``preprocess.simulate``: cosine-tuned Poisson
   units, 8 targets, hand kinematics) and write it as NWB into a fresh run directory;
2. bin it into a recording store there (``preprocess.bin_spikes``, 100 ms bins);
3. train MYOW with ``configs/demo.yaml`` (about a minute on a 2-core CPU);
4. evaluate and print the reach accuracy and where the run directory is.

``python -m pipeline.train --demo --set train.max_steps=50`` runs a shortened demo
(tests); ``--config`` replaces ``configs/demo.yaml``. Rerunning the demo with the same
``run.dir`` resumes it: the simulated session is reused and training continues from the
last checkpoint (a finished demo is evaluated again). Without ``run.dir`` every call
makes a new ``runs/demo-<time>``, so the stop message names the directory to pass.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from preprocess.errors import UserError

from .checkpoint import CHECKPOINT_NAME
from .cli import to_json
from .config import load_config
from .loop import train
from .runtime import default_run_dir
from .startup import check_run_dir

log = logging.getLogger("pipeline.demo")

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
DEMO_UNITS = 60
DEMO_TRIALS = 200  # ~8 minutes of recording, ~4700 bins of 100 ms


def run_demo(overrides: list[str] | tuple[str, ...] = (), config: str | None = None) -> int:
    """Simulate, bin, train and evaluate; prints a summary. Returns the exit code (0)."""
    from preprocess import bin_spikes
    from preprocess.simulate import simulate_reach_session, write_nwb

    config = config or DEMO_CONFIG
    if not Path(config).is_file():
        raise UserError(f"{config}: demo config not found; run from a source checkout or pass --config")
    cfg = load_config(config, overrides)  # validate before spending time on the simulation
    given = bool(cfg.run.dir)
    run_dir = Path(cfg.run.dir) if given else default_run_dir("demo")
    # the default directory is new on every call: resuming needs it named
    resume_hint = ("rerun the same command to resume" if given else
                   f"rerun with --set run.dir={run_dir} (and the same other options) to resume")
    check_run_dir(run_dir)
    store = run_dir / "session.zarr"
    has_store = (store / "zarr.json").is_file()  # stores are published whole (renamed when complete)
    ckpt = run_dir / CHECKPOINT_NAME
    if (ckpt.exists() or ckpt.is_symlink()) and not has_store:
        raise UserError(f"run.dir {run_dir}: holds a run that is not a demo run (no session.zarr); "
                        "choose another run.dir")
    if (store.exists() or store.is_symlink()) and not has_store:
        raise UserError(f"{store}: exists and is not a recording store; delete it or choose another run.dir")
    started = time.perf_counter()
    try:
        if has_store:  # a rerun: the same simulated session, training resumes from checkpoint.pt
            log.info("reusing the simulated session %s (a rerun resumes the demo)", store)
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            log.info("simulating a reach session (%d units, %d trials, seed %d)", DEMO_UNITS, DEMO_TRIALS,
                     cfg.run.seed)
            session = simulate_reach_session(n_units=DEMO_UNITS, n_trials=DEMO_TRIALS, seed=cfg.run.seed)
            nwb = write_nwb(session, run_dir / "session.nwb")
            code = bin_spikes.main([str(nwb), "--out", str(store), "--bin-size", "0.1", "--units", "all",
                                    "--no-progress"])
            if code:
                raise UserError(f"{store}: binning the simulated session failed")

        cfg.data.path, cfg.run.dir = str(store.resolve()), str(run_dir)  # absolute: evaluate from anywhere
        run_dir, results = train(cfg, resume_hint=resume_hint)
    except KeyboardInterrupt:
        raise UserError(f"interrupted; {run_dir} keeps what was done: {resume_hint}", exit_code=130) from None
    seconds = time.perf_counter() - started
    print(to_json({**results, "run_dir": str(run_dir), "seconds": round(seconds, 1)}))
    if "stopped_at_step" in results:
        print(f"stopped at step {results['stopped_at_step']}, checkpoint saved in {run_dir}: {resume_hint}")
        return 0
    acc, delta = results.get("reach_acc"), results.get("reach_delta_acc")
    if acc is not None:
        print(f"reach direction from the learned representation (linear read-out, test trials): "
              f"accuracy {acc:.1%} (chance 12.5%), delta-accuracy {delta:.1%}")
    print(f"run directory: {run_dir} (config.yaml, metrics.jsonl, checkpoint.pt, tsne.png, "
          f"mined_label_agreement.png); {seconds:.0f} s in all")
    print(f"evaluate again with: python -m pipeline.evaluate --run {run_dir}")
    return 0
