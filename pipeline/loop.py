"""The training loop: one screen of comment-headed paragraphs (nanoGPT's shape).

    start   (pipeline.startup.start_run): run dir checked, checkpoint loaded, data built,
            model and optimizer made, states restored; nothing written until then
    loop    per step: the session, a batch of anchors [+ a pool], train_step (pipeline.step)
            -> metrics (metrics.jsonl, tqdm, Prometheus: RunLog), stop on a signal,
            checkpoint and evaluate when their cadence says so (Checkpointer, Evaluator)
    end     final checkpoint, evaluation, eval.json

The loop knows nothing of the data kind or the method: the data is a
:class:`~pipeline.data.interface.TrainData`, its read-outs come from
:func:`pipeline.kinds.evaluate_data`, and the method (what it draws, its step) is :func:`pipeline.methods.build_method`'s.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from model import set_session
from preprocess.errors import UserError

from .checkpoint import atomic_write_text, rng_state, save_checkpoint
from .cli import to_json
from .config import Config, config_to_dict
from .data.interface import TrainData
from .distributed import DistEnv, all_gather_pool, all_gather_with_grad, all_reduce_mean, barrier, gather_object
from .kinds import evaluate_data
from .runtime import move_to_device
from .startup import Run, start_run
from .step import schedules

log = logging.getLogger("pipeline.train")

__all__ = ["train", "Checkpointer", "Evaluator", "RunLog", "StopRequest"]


class Checkpointer:
    """Owns checkpoint.pt and its cadence (``train.checkpoint_every``, the stop, the end).
    Every rank calls :meth:`save`: the data and RNG states are gathered to rank 0."""

    def __init__(self, run: Run, cfg: Config) -> None:
        self.run, self.cfg, self.every = run, cfg, cfg.train.checkpoint_every

    def due(self, done: int) -> bool:
        return done % self.every == 0 and done < self.run.plan.total_steps

    def save(self, step: int) -> None:
        r, t0 = self.run, time.perf_counter()
        data_states, rng_states = gather_object(r.data.state_dict(), r.env), gather_object(rng_state(r.mining_gen),
                                                                                           r.env)
        if r.env.is_main:
            save_checkpoint(r.ckpt_path, {
                "model": r.model.state_dict(), "optimizer": r.optimizer.state_dict(), "step": step,
                "epoch": step // r.plan.steps_per_epoch, "config": config_to_dict(self.cfg),
                "normalization": r.data.normalization_state(), "data_kind": r.data.kind,
                "data": data_states, "rng": rng_states, "world_size": r.env.world_size})
        barrier(r.env)
        r.metrics.observe_checkpoint(time.perf_counter() - t0)


class Evaluator:
    """Owns the read-outs and their cadence (``train.eval_every``, and the end of training):
    each result is appended to evaluations.jsonl; the final one is also eval.json."""

    def __init__(self, run: Run, cfg: Config) -> None:
        self.run, self.cfg, self.every = run, cfg, cfg.train.eval_every

    def due(self, done: int) -> bool:
        return bool(self.every) and done % self.every == 0 and done < self.run.plan.total_steps

    def evaluate(self, step: int, plots: bool = False) -> dict:
        r = self.run
        results = evaluate_data(r.data, r.model, self.cfg, device=r.device, run_dir=r.run_dir, plots=plots)
        results["step"] = step
        with open(r.run_dir / "evaluations.jsonl", "a") as f:
            f.write(to_json(results) + "\n")
        return results

    def final(self, step: int) -> dict:
        results = self.evaluate(step, plots=True)
        atomic_write_text(self.run.run_dir / "eval.json", to_json(results) + "\n")
        return results


class RunLog:
    """Owns what a step reports: Prometheus every step, metrics.jsonl every
    ``train.log_every`` steps (and the first and last), the tqdm bar."""

    def __init__(self, run: Run, cfg: Config) -> None:
        self.run, self.every = run, cfg.train.log_every
        self.bar = tqdm(total=run.plan.total_steps, initial=run.start, desc=cfg.method.name, unit="step",
                        dynamic_ncols=True, disable=not (cfg.run.progress and run.env.is_main), file=sys.stderr)
        self.file = open(run.metrics_path, "a") if run.env.is_main else None

    def step(self, done: int, out: dict, samples: int, step_seconds: float, wait_seconds: float) -> None:
        r = self.run
        self.bar.update(1)
        r.metrics.update(out, samples, step_seconds, wait_seconds)
        if self.file is not None and (done % self.every == 0 or done == r.plan.total_steps or done == r.start + 1):
            record = {"step": done, "epoch": done // r.plan.steps_per_epoch, **out, "samples": samples,
                      "world_size": r.env.world_size, "step_seconds": step_seconds, "data_wait_seconds": wait_seconds}
            self.file.write(to_json(record) + "\n")
            self.file.flush()
            self.bar.set_postfix(aug=f"{out['loss_augmented']:.3f}",
                                 mined="-" if out["loss_mined"] is None else f"{out['loss_mined']:.3f}",
                                 lam=f"{out['mining_weight']:.2f}", refresh=False)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.run.metrics.close()
        self.bar.close()


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checkpoints and stops at the next step boundary
    (the same step on every rank: the flag is all-reduced). A second signal is not caught."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        for sig, handler in self._previous.items():  # a second signal acts as usual
            signal.signal(sig, handler)

    def requested(self, env: DistEnv) -> bool:
        flag = float(self.signal is not None)
        if env.distributed:
            flag = all_reduce_mean({"stop": flag}, env)["stop"]
        return flag > 0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg: Config, data: TrainData | None = None, env: DistEnv | None = None, *,
          resume_hint: str | None = None) -> tuple[Path, dict]:
    """Train (or resume) a run and evaluate it; one process or one rank of torchrun.

    Returns (run directory, evaluation metrics); ranks other than 0 return an empty dict,
    and a run stopped by SIGTERM/SIGINT returns {"stopped_at_step": n} after checkpointing
    (``resume_hint``: what the stop message tells the user to do to resume). Nothing is
    written to the run directory until the run has started (:func:`pipeline.startup.start_run`).
    """
    run = start_run(cfg, data, env, resume_hint)
    env, plan, device = run.env, run.plan, run.device
    checkpointer, evaluator, stop = Checkpointer(run, cfg), Evaluator(run, cfg), StopRequest()
    gather = functools.partial(all_gather_pool, env=env)  # the global pool (MYOW)
    gather_rows = functools.partial(all_gather_with_grad, env=env) if env.distributed else None  # SimCLR's negatives
    samples = run.start * cfg.optim.batch_size * env.world_size  # global anchors consumed (equal B per rank)
    run.model.train()
    try:
        with contextlib.closing(RunLog(run, cfg)) as runlog, contextlib.closing(run.data):
            for step in range(run.start, plan.total_steps):
                # --- data: this step's session (the same on every rank), anchors and pool
                t0 = time.perf_counter()
                session_index = run.data.session_at(step)
                session = run.data.sessions[session_index]
                anchors = next(session.anchors)
                schedule = schedules(step, cfg, plan)  # (lr, tau, lambda): no pool while lambda == 0
                pool = next(session.pool) if run.method.needs.candidate_pool and schedule[2] > 0 else None
                anchors = move_to_device(anchors, device, run.channels_last)
                pool = move_to_device(pool, device, run.channels_last)
                t1 = time.perf_counter()

                # --- myow-neuro's frozen BatchNorm, an ablation off by default: from the given
                # step on the online encoder stays in eval mode (also after a resume)
                if plan.encoder_bn_frozen_step is not None and step >= plan.encoder_bn_frozen_step:
                    run.model.encoder.eval()

                # --- one optimizer step (paper Algorithm 1)
                set_session(run.model, session_index)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.run.amp):
                    out = run.method.step(run.net, run.optimizer, anchors, pool, step, cfg, run.mining_gen,
                                          plan=run.plans[session_index], gather=gather,
                                          context=session.mining_context, schedule=schedule,
                                          gather_rows=gather_rows)
                t2 = time.perf_counter()
                done = step + 1
                samples += anchors[0].shape[0] * env.world_size
                if not math.isfinite(out["loss_total"]):
                    raise UserError(f"training diverged at step {done} (loss {out['loss_total']}); "
                                    "lower optim.lr or check the data")

                # --- report, then stop / checkpoint / evaluate when due
                runlog.step(done, out, samples, t2 - t1, t1 - t0)
                if stop.requested(env):
                    checkpointer.save(done)
                    log.warning("stopped by signal at step %d; checkpoint saved in %s: %s", done, run.run_dir,
                                run.resume_hint)
                    return run.run_dir, {"stopped_at_step": done}
                if checkpointer.due(done):
                    checkpointer.save(done)
                if evaluator.due(done):
                    if env.is_main:
                        log.info("step %d: %s", done, to_json(evaluator.evaluate(done)))
                    barrier(env)

            # --- end: the final checkpoint, then the final evaluation (rank 0)
            final = max(run.start, plan.total_steps)
            checkpointer.save(final)
    finally:
        stop.restore()
    results = evaluator.final(final) if env.is_main else {}
    barrier(env)
    return run.run_dir, results
