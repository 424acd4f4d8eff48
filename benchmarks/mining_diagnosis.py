"""What the miner pairs, over training: a diagnosis on a reach recording; prints one JSON line.

Trains like the trainer (the same streams and ``pipeline.step.train_step``; non-test
trials only, as ``benchmarks/selection.py``) and, at the steps given by ``--at``, mines a
fresh diagnostic batch with the current networks exactly as the step does (online y of
the anchors' view 1 against target y' of an independent pool, same-trial candidates
excluded; the diagnostic streams have their own seed, so training is not disturbed).
Labels are only read here. For every anchor, over its allowed candidates ranked by cosine:

- ``agree@k``: share of the k nearest with the anchor's reach target (what a uniform pick
  among the top-k gets on average), for several k; ``chance``: a random allowed candidate;
- ``angle@k``: mean angular distance (degrees) between the anchor's and the top-k's targets;
- ``first_same_rank``: median rank (1 = nearest) of the first candidate with the same target;
- ``same_trial_raw@k``: share of the k nearest that are in the anchor's own trial when
  nothing is excluded (how much the exclusion removes);
- ``cos@k`` vs ``cos_random``: similarity of the mined pairs against random allowed pairs;
- ``agree@5_topQpct_conf``: agree@5 among the Q% of anchors whose nearest allowed
  candidate is most similar (is the search more precise where it is confident?);
- ``trial_agree@k`` (with mining by context): share of the k other trials whose mean banked
  representation is nearest the anchor's trial's mean that have the anchor's target (does
  matching whole trials pair better than matching bins?);
- ``loss_mined``: the training step's mined loss (negative cosine) at that step.

At the last step the same is measured for pools of several sizes L (``agree5_by_pool``).

Usage: python benchmarks/mining_diagnosis.py [--seed 0] [--at 1 50 100 200 500 1000] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import prepare_store  # noqa: E402
from model import exclusion_mask  # noqa: E402
from pipeline.build import build_model, build_optimizer  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.kinds import build_train_data  # noqa: E402
from pipeline.runtime import seed_everything, set_threads  # noqa: E402
from pipeline.step import Plan, schedules, train_step  # noqa: E402

CHEWIE = ROOT.parent / "shared" / "data" / "reach-chewie-2013-10-03" / "chewie-2013-10-03-binned-100ms.npz"
KS = (1, 5, 20, 100)


@torch.no_grad()
def diagnose(model, anchors, pool, ks=KS, context=None, aligned=False) -> dict:
    """Mining statistics of one anchor batch against one pool (see the module docstring);
    with a MiningContext the search uses its context averages, as the step does (or,
    ``aligned``, its time-aligned trajectories)."""
    x1, _, _, meta = anchors
    x_pool, pmeta = pool
    y, yp = model.encoder(x1), model.target_representation(x_pool)
    if context is not None:
        f = context.aligned if aligned else context.smooth
        y, yp = f(meta["row"], y), f(pmeta["row"], yp)
    y, yp = F.normalize(y, dim=1), F.normalize(yp, dim=1)
    sim = y @ yp.T  # (B, L)
    excluded = exclusion_mask(meta["trial"], pmeta["trial"])
    la, lp = meta["label"], pmeta["label"]
    same_label = la[:, None] == lp[None, :]  # (B, L)
    diff = (la[:, None] - lp[None, :]).abs() % 8
    angle = torch.minimum(diff, 8 - diff).double() * 45.0
    out: dict = {}
    allowed_sim = sim.masked_fill(excluded, float("-inf"))
    order = allowed_sim.argsort(dim=1, descending=True)
    n_allowed = (~excluded).sum(1)
    for k in ks:
        top = order[:, :k]
        out[f"agree@{k}"] = float(same_label.gather(1, top).double().mean())
        out[f"angle@{k}"] = float(angle.gather(1, top).mean())
        out[f"cos@{k}"] = float(sim.gather(1, top).mean())
        raw_top = sim.argsort(dim=1, descending=True)[:, :k]
        out[f"same_trial_raw@{k}"] = float(excluded.gather(1, raw_top).double().mean())
    allowed = (~excluded).double()
    out["chance"] = float(((same_label.double() * allowed).sum(1) / allowed.sum(1).clamp(min=1)).mean())
    out["cos_random"] = float(((sim * allowed).sum(1) / allowed.sum(1).clamp(min=1)).mean())
    same_sorted = same_label.gather(1, order) & (torch.arange(order.shape[1])[None, :] < n_allowed[:, None])
    has = same_sorted.any(1)
    first = same_sorted.double().argmax(1) + 1
    out["first_same_rank"] = float(first[has].median()) if has.any() else None
    # Is precision higher where the search is confident? Anchors ranked by the cosine of
    # their nearest allowed candidate; agree@5 among the most confident share q of them.
    conf = allowed_sim.gather(1, order[:, :1]).squeeze(1)
    top5_same = same_label.gather(1, order[:, :5]).double().mean(1)
    ranked = conf.argsort(descending=True)
    for q in (0.25, 0.5, 0.75):
        n = max(1, int(round(q * len(ranked))))
        out[f"agree@5_top{int(q * 100)}pct_conf"] = float(top5_same[ranked[:n]].mean())
    out["pool_unique_share"] = float(len(torch.unique(pmeta["row"])) / len(pmeta["row"]))
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


@torch.no_grad()
def trial_agreement(anchors, pool, context, ks=(1, 5)) -> dict:
    """``trial_agree@k``: label agreement of the anchor's trial with the k trials whose mean
    banked target representation is most similar (other trials only)."""
    meta, pmeta = anchors[3], pool[1]
    bank, filled, trial = context.bank, context.filled, context.trial
    n_trials = int(trial.max()) + 1
    if n_trials <= 1 or int(meta["trial"].min()) < 0:
        return {}
    sums = torch.zeros(n_trials, bank.shape[1]).index_add_(0, trial[filled], bank[filled])
    count = torch.zeros(n_trials).index_add_(0, trial[filled], torch.ones(int(filled.sum())))
    means = F.normalize(sums / count.clamp(min=1)[:, None], dim=1)
    at = meta["trial"]
    sim = means[at] @ means.T  # (B, trials)
    sim[torch.arange(len(at)), at] = float("-inf")
    sim[:, count == 0] = float("-inf")
    label_of_trial = torch.full((n_trials,), -1, dtype=torch.long)
    label_of_trial[pmeta["trial"]] = pmeta["label"]
    label_of_trial[at] = meta["label"]
    out = {}
    for k in ks:
        lab = label_of_trial[sim.topk(k, dim=1).indices]  # (B, k)
        known = lab >= 0
        out[f"trial_agree@{k}"] = round(float(((lab == meta["label"][:, None]) & known).sum() / known.sum()), 4)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(CHEWIE), help="reach recording (.npz or store)")
    p.add_argument("--config", default=str(ROOT / "configs" / "reach_myow.yaml"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--at", type=int, nargs="+", default=[1, 50, 100, 200, 500, 1000])
    p.add_argument("--pools", type=int, nargs="+", default=[256, 1024, 4096], help="pool sizes at the last step")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    set_threads(0)
    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory() as tmp:
        store = prepare_store(args.data, tmp)
        base = load_config(args.config, [f"data.path={store}"])
        tr, va, te = base.data.split
        common = [f"data.path={store}", f"data.split=[{tr + va},0.0,{te}]", "run.progress=false"]
        cfg = load_config(args.config, [*common, f"run.seed={args.seed}", *args.overrides])
        data = build_train_data(cfg)
        norm = data.sessions[0].normalization
        diag_cfg = load_config(args.config, [*common, f"run.seed={args.seed + 7919}", "method.name=myow",
                                             *args.overrides])
        diag = build_train_data(diag_cfg, normalization=norm)
        plan = Plan.build(cfg, data.steps_per_epoch, data.sessions[0].min_time_gap_s)
        seed_everything(cfg.run.seed)
        model = build_model(cfg, data.model_input()).train()
        opt = build_optimizer(cfg, model.online_parameters())
        gen = torch.Generator().manual_seed(cfg.run.seed)
        at = sorted({s for s in args.at if 1 <= s <= plan.total_steps} | {plan.total_steps})
        rows = []
        s0 = data.sessions[0]
        for step in range(plan.total_steps):
            anchors = next(s0.anchors)
            pool = next(s0.pool) if schedules(step, cfg, plan)[2] > 0 else None
            out = train_step(model, opt, anchors, pool, step, cfg, gen, plan=plan, context=s0.mining_context)
            if step + 1 in at:
                d = diagnose(model, next(diag.sessions[0].anchors), next(diag.sessions[0].pool),
                             context=s0.mining_context)
                if s0.mining_context is not None:
                    d.update(trial_agreement(next(diag.sessions[0].anchors), next(diag.sessions[0].pool),
                                             s0.mining_context))
                    d_al = diagnose(model, next(diag.sessions[0].anchors), next(diag.sessions[0].pool),
                                    context=s0.mining_context, aligned=True)
                    d.update({f"aligned_{k}": d_al[k] for k in ("agree@1", "agree@5", "agree@20", "angle@5",
                                                                 "agree@5_top50pct_conf")})
                d.update(step=step + 1, loss_mined=out["loss_mined"], loss_augmented=out["loss_augmented"],
                         mined_label_agreement_ratio=out["mined_label_agreement_ratio"])
                rows.append(d)
                print(json.dumps(d), file=sys.stderr, flush=True)
        # pool size at the end: concatenate independent pools
        by_pool = {}
        dpool = diag.sessions[0].pool
        anchors = next(diag.sessions[0].anchors)
        for size in args.pools:
            parts, metas = [], []
            while sum(len(x) for x in parts) < size:
                x, m = next(dpool)
                parts.append(x)
                metas.append(m)
            x = torch.cat(parts)[:size]
            m = {k: torch.cat([mm[k] for mm in metas])[:size] for k in metas[0]}
            d = diagnose(model, anchors, (x, m), ks=(5,), context=s0.mining_context)
            by_pool[size] = {"agree@5": d["agree@5"], "angle@5": d["angle@5"], "cos@5": d["cos@5"]}
        data.close()
        diag.close()
    print(json.dumps({"benchmark": "mining_diagnosis", "config": args.config, "overrides": args.overrides,
                      "seed": args.seed, "steps": rows, "agree5_by_pool": by_pool}))


if __name__ == "__main__":
    main()
