"""k-NN view miner (paper section 2.2, App. B): pure functions of tensors.

For each anchor (online representation y_m of a mining view), the k nearest candidates
by cosine similarity among the *target* representations of an independent pool are
found, excluded candidates (same trial, too close in time) masked out, and one of the
remaining top-k is drawn uniformly at random.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["exclusion_mask", "mine_views"]


def _check_pair(name: str, a, p):
    if (a is None) != (p is None):
        raise ValueError(f"exclusion_mask: give both anchor_{name} and pool_{name}, or neither")
    if a is not None and (a.dim() != 1 or p.dim() != 1):
        raise ValueError(f"exclusion_mask: anchor_{name} and pool_{name} must be 1-D, "
                         f"got {tuple(a.shape)} and {tuple(p.shape)}")


def exclusion_mask(anchor_trial: torch.Tensor | None = None,
                   pool_trial: torch.Tensor | None = None,
                   anchor_time: torch.Tensor | None = None,
                   pool_time: torch.Tensor | None = None,
                   min_time_gap: float = 0.0,
                   anchor_store: torch.Tensor | None = None,
                   pool_store: torch.Tensor | None = None,
                   min_trial_gap: int = 1) -> torch.Tensor:
    """Which pool candidates each anchor may NOT be paired with.

    Args:
        anchor_trial, pool_trial: (B,), (L,) int trial ids, or None (no trial rule).
            A negative id (-1) means "not in a trial" and never matches anything.
        anchor_time, pool_time: (B,), (L,) times (any unit, same as ``min_time_gap``),
            or None (no time rule).
        min_time_gap: candidates with |t_anchor - t_pool| < min_time_gap are excluded;
            0 disables the rule.
        anchor_store, pool_store: (B,), (L,) int ids of the recording each sample comes
            from, or None (everything from one recording). Trial ids and times are only
            comparable within a recording, so both rules apply only where the stores match;
            candidates from another recording are never excluded.
        min_trial_gap: candidates fewer than this many trials from the anchor's are
            excluded (|trial_anchor - trial_pool| < min_trial_gap); the trial ids must then
            be ranks in recording order. 1 (default) = the same trial only, for any ids.

    Returns:
        (B, L) bool, True = excluded. All False when no rule applies.

    Raises:
        ValueError: only one of a pair given, or no pair at all (B, L unknown).
    """
    _check_pair("trial", anchor_trial, pool_trial)
    _check_pair("time", anchor_time, pool_time)
    _check_pair("store", anchor_store, pool_store)
    anchors = next((a for a in (anchor_trial, anchor_time, anchor_store) if a is not None), None)
    pools = next((p for p in (pool_trial, pool_time, pool_store) if p is not None), None)
    if anchors is None:
        raise ValueError("exclusion_mask: need at least one of trial, time or store ids to know (B, L)")
    B, L = anchors.shape[0], pools.shape[0]
    for a, p in ((anchor_trial, pool_trial), (anchor_time, pool_time), (anchor_store, pool_store)):
        if a is not None and (a.shape[0] != B or p.shape[0] != L):
            raise ValueError(f"exclusion_mask: inconsistent lengths, expected B={B}, L={L}")

    # Each rule is one or two (B, L) passes, written in place: this runs every step.
    device = anchors.device
    excluded = None
    if anchor_trial is not None:
        # an anchor outside any trial (-1) becomes -2, which no pool id (>= -1) equals: one
        # (B, L) pass instead of a compare and an AND (broadcast ops are ~1 ns per element
        # on a CPU, a millisecond a step at B x L = 512 x 1024); int32 compares faster
        at = anchor_trial.to(device)
        at = torch.where(at >= 0, at, torch.full_like(at, -2)).to(torch.int32)
        pt = pool_trial.to(device=device, dtype=torch.int32)
        if min_trial_gap <= 1:
            excluded = at[:, None] == pt[None, :]
        else:  # a pool row outside trials (-1) moved far away: never within the gap
            pt = torch.where(pt >= 0, pt, torch.full_like(pt, -(2 ** 29)))
            at = torch.where(at >= 0, at, torch.full_like(at, 2 ** 29))
            excluded = (at[:, None] - pt[None, :]).abs_() < min_trial_gap
    if anchor_time is not None and min_time_gap > 0:
        near = (anchor_time.to(device)[:, None] - pool_time.to(device)[None, :]).abs_() < min_time_gap
        excluded = near if excluded is None else excluded.logical_or_(near)
    if excluded is None:
        return torch.zeros(B, L, dtype=torch.bool, device=device)
    if anchor_store is not None:
        excluded &= anchor_store.to(device)[:, None] == pool_store.to(device)[None, :]
    return excluded


@torch.no_grad()
def mine_views(anchors: torch.Tensor, pool: torch.Tensor, k: int, generator: torch.Generator,
               exclude: torch.Tensor | None = None, chunk_size: int = 1024, mutual_k: int = 0,
               keep_fraction: float = 1.0, all_k: bool = False) -> torch.Tensor:
    """Randomised k-NN mining.

    Args:
        anchors: (B, D) online representations of the anchors' mining views.
        pool: (L, D) target representations of the candidate pool.
        k: number of nearest neighbours to draw from (>= 1).
        generator: torch.Generator for the random pick; on the CPU or on the anchors'
            device. Exactly B uniforms are drawn per call, whatever ``chunk_size``.
        exclude: (B, L) bool, True = candidate not allowed for that anchor, or None.
        chunk_size: anchors processed per similarity block; memory is
            O(chunk_size x L), never B x L x D (B x L with ``mutual_k``).
        mutual_k: > 0 keeps a candidate for an anchor only if the anchor is also among
            the candidate's ``mutual_k`` most similar (allowed) anchors of this call:
            mutual nearest neighbours, a precision filter. 0 = off.
        keep_fraction: in (0, 1]; only the ceil(keep_fraction x B') anchors (B' = those
            with an allowed candidate) whose nearest allowed candidate is most similar keep
            their pick, the others get -1: a confidence filter (late in training the most
            confident anchors' picks are the most precise). 1 = off.
        all_k: return every anchor's top-k allowed candidates, (B, k) sorted by
            similarity with -1 where fewer than k are allowed, instead of one random pick
            (the same B uniforms are still drawn, so the random stream does not change).

    Returns:
        (B,) int64 indices into ``pool``. Each is drawn uniformly among the anchor's top-k
        (by cosine similarity) non-excluded candidates, or among all of its non-excluded
        candidates when fewer than k exist. An anchor with no allowed candidate gets
        -1: the caller must drop it (``MYOW.mined_loss`` does). An excluded index is
        never returned. With ``all_k``: (B, min(k, L)) int64, see above.
    """
    if k < 1:
        raise ValueError(f"mine_views: k must be >= 1, got {k}")
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"mine_views: keep_fraction must be in (0, 1], got {keep_fraction}")
    if chunk_size < 1:
        raise ValueError(f"mine_views: chunk_size must be >= 1, got {chunk_size}")
    if anchors.dim() != 2 or pool.dim() != 2 or anchors.shape[1] != pool.shape[1]:
        raise ValueError(f"mine_views: expected (B, D) anchors and (L, D) pool, "
                         f"got {tuple(anchors.shape)} and {tuple(pool.shape)}")
    B, L = anchors.shape[0], pool.shape[0]
    device = anchors.device
    if exclude is not None:
        if exclude.shape != (B, L):
            raise ValueError(f"mine_views: exclude must be (B, L) = ({B}, {L}), got {tuple(exclude.shape)}")
        exclude = exclude.to(device=device, dtype=torch.bool)

    # All B uniforms drawn at once, before chunking, so the random stream (and hence the
    # picks) does not depend on chunk_size.
    u = torch.rand(B, generator=generator, device=generator.device).to(device)
    out = torch.full((B,), -1, dtype=torch.long, device=device)
    top = torch.full((B, min(k, L)), -1, dtype=torch.long, device=device) if all_k else None
    nearest = torch.full((B,), float("-inf"), device=device)  # cosine of each anchor's nearest allowed candidate
    if B == 0 or L == 0:
        return out if top is None else top

    kk = min(k, L)
    if mutual_k > 0:  # the column-wise ranking needs every anchor's similarity at once
        chunk_size = B
    # float32 and no autocast: half-precision cosines tie often, which would bias top-k.
    with torch.autocast(device_type=device.type, enabled=False):
        a = F.normalize(anchors.float(), dim=1)
        p = F.normalize(pool.float(), dim=1)
        for start in range(0, B, chunk_size):
            stop = min(start + chunk_size, B)
            sim = a[start:stop] @ p.T                          # (c, L)
            # A non-finite representation gives NaN similarities; treat them as excluded
            # (topk would rank NaN first and break the "allowed = prefix" invariant below).
            sim.nan_to_num_(nan=float("-inf"))  # cosines are finite otherwise: one pass
            if exclude is not None:
                sim.masked_fill_(exclude[start:stop], float("-inf"))
            vals, idx = sim.topk(kk, dim=1)                    # (c, kk), sorted descending
            allowed = vals > float("-inf")                     # excluded candidates score -inf
            if mutual_k > 0:  # keep the top-k pairs where the anchor ranks in the candidate's top mutual_k
                ranked = sim.topk(min(mutual_k, B), dim=0).indices  # (m, L) anchors per candidate
                mutual = torch.zeros_like(sim, dtype=torch.bool).scatter_(0, ranked, True)
                allowed &= mutual.gather(1, idx)
            n_valid = allowed.sum(dim=1)                       # (c,)
            # floor(u * n) is uniform on {0..n-1}; the clamp guards float rounding of u * n up to n.
            pick = torch.minimum((u[start:stop] * n_valid).long(), (n_valid - 1).clamp(min=0))
            # the pick-th allowed entry: without the mutual filter the allowed ones are a prefix
            slot = pick if mutual_k <= 0 else ((allowed.cumsum(dim=1) - 1 == pick[:, None]) & allowed).long().argmax(1)
            chosen = idx.gather(1, slot[:, None]).squeeze(1)
            out[start:stop] = torch.where(n_valid > 0, chosen, torch.full_like(chosen, -1))
            nearest[start:stop] = vals[:, 0]
            if top is not None:
                top[start:stop] = torch.where(allowed, idx, torch.full_like(idx, -1))
    if keep_fraction < 1.0:
        has = out >= 0
        n_keep = math.ceil(keep_fraction * int(has.sum()))
        # rank anchors by confidence; ties and anchors without a pick (-inf) go last
        order = torch.where(has, nearest, torch.full_like(nearest, float("-inf"))).argsort(descending=True, stable=True)
        drop = order[n_keep:]
        out[drop] = -1
        if top is not None:
            top[drop] = -1
    return out if top is None else top
