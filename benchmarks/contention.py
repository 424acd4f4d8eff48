"""The trainer's step on a busy machine: reach MYOW steps/s with 1 and 2 torch threads, on
its own and with busy processes beside it, in interleaved rounds; prints one JSON line.

The busy neighbour is ``--busy`` Python processes spinning on a core each (what another
user's job does to a shared machine). Every (threads, load) cell runs ``--block`` steps per
round, cells alternate within a round, and the figure per cell is the median step time over
all rounds, so slow phases of the machine hit every cell alike. ``kept`` = busy / quiet
steps/s: the issue's goal is >= 0.5 with one busy core beside the run.

Usage: python benchmarks/contention.py [--rounds 6] [--block 20] [--busy 1] [--data chewie.npz]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.step import CHEWIE, neural_stepper  # noqa: E402
from pipeline.runtime import set_threads  # noqa: E402

SPIN = "while True:\n    pass\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--block", type=int, default=20)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--busy", type=int, default=1, help="busy processes beside the run in the 'busy' cells")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--data", default=str(CHEWIE))
    args = p.parse_args()
    from preprocess import bin_spikes

    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "chewie.zarr")
        if bin_spikes.main([args.data, "--out", store, "--no-progress"]) != 0:
            sys.exit("benchmarks/contention.py: could not bin --data")
        step = neural_stepper(store, "myow", "separate")
        for _ in range(args.warmup):
            step()
        times: dict[tuple[int, str], list[float]] = {(t, load): [] for t in args.threads for load in ("quiet", "busy")}
        for _ in range(args.rounds):
            for load in ("quiet", "busy"):
                spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(args.busy if load == "busy"
                                                                                         else 0)]
                try:
                    time.sleep(0.2 if spinners else 0)
                    for t in args.threads:
                        set_threads(t)
                        for _ in range(args.block):
                            t0 = time.perf_counter()
                            step()
                            times[(t, load)].append(time.perf_counter() - t0)
                finally:
                    for s in spinners:
                        s.kill()
                        s.wait()
    rate = {f"threads{t}_{load}_steps_per_s": 1.0 / statistics.median(v) for (t, load), v in times.items()}
    kept = {f"threads{t}_kept": rate[f"threads{t}_busy_steps_per_s"] / rate[f"threads{t}_quiet_steps_per_s"]
            for t in args.threads}
    print(json.dumps({"benchmark": "contention", "rounds": args.rounds, "block": args.block, "busy": args.busy,
                      **{k: round(v, 2) for k, v in rate.items()}, **{k: round(v, 3) for k, v in kept.items()}}))


if __name__ == "__main__":
    main()
