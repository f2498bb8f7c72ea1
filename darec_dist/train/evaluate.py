"""Full-ranking evaluation with users split over ranks and sums combined exactly by all-reduce."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from darec_dist.distributed.collectives import all_reduce_sum
from darec_dist.train.metrics import mask_rows, metric_names, ranking_sums


def rank_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    return total * rank // world_size, total * (rank + 1) // world_size


def gather_rows_to_all(local: torch.Tensor, total: int, world_size: int) -> torch.Tensor:
    """Concatenate every rank's contiguous block (sizes from rank_range) into the full matrix on every rank."""
    if world_size == 1:
        return local
    largest = max(rank_range(total, r, world_size)[1] - rank_range(total, r, world_size)[0] for r in range(world_size))
    padded = torch.zeros(largest, local.shape[1], dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    blocks = [p[: rank_range(total, r, world_size)[1] - rank_range(total, r, world_size)[0]] for r, p in enumerate(parts)]
    return torch.cat(blocks)


def final_embeddings(trainer, world_size: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(this rank's users' scoring vectors, all items' scoring vectors, first user id of this rank)."""
    ds = trainer.dataset
    chunk = trainer.cfg.eval.node_chunk
    u0, u1 = rank_range(ds.num_users, rank, world_size)
    i0, i1 = rank_range(ds.num_items, rank, world_size)
    largest = max(
        max(rank_range(ds.num_users, r, world_size)[1] - rank_range(ds.num_users, r, world_size)[0],
            rank_range(ds.num_items, r, world_size)[1] - rank_range(ds.num_items, r, world_size)[0])
        for r in range(world_size)
    )
    calls = math.ceil(largest / chunk)
    users = trainer.node_embeddings(np.arange(u0, u1, dtype=np.int64), calls)
    items = trainer.node_embeddings(np.arange(ds.num_users + i0, ds.num_users + i1, dtype=np.int64), calls)
    with torch.no_grad():
        users = trainer.aligner.scoring_vectors(users, "user")
        items = trainer.aligner.scoring_vectors(items, "item")
    return users, gather_rows_to_all(items, ds.num_items, world_size), u0


# Scores held at once while ranking: user chunk x items <= this many floats (64 MiB, whatever the
# catalogue's size).
MAX_SCORES = 1 << 24


def evaluated_users(num_users: int, max_users: int | None) -> np.ndarray:
    """All users, or a fixed sample of them (sorted; the same for every run, so runs stay comparable)."""
    if max_users is None or max_users >= num_users:
        return np.arange(num_users, dtype=np.int64)
    return np.sort(np.random.default_rng(0).choice(num_users, size=max_users, replace=False)).astype(np.int64)


@torch.no_grad()
def evaluate(trainer, split: str, world_size: int, rank: int) -> dict[str, float]:
    """Mean Recall@K / NDCG@K over users with held-out items in `split`; train items masked."""
    cfg = trainer.cfg.eval
    users, items, first_user = final_embeddings(trainer, world_size, rank)
    train, truth = trainer.dataset.interactions("train"), trainer.dataset.interactions(split)
    names = metric_names(cfg.ks)
    totals = torch.zeros(len(names) + 1, dtype=torch.float64)
    chosen = evaluated_users(trainer.dataset.num_users, cfg.max_users)
    mine = chosen[(chosen >= first_user) & (chosen < first_user + len(users))]
    chunk = max(1, min(cfg.user_chunk, MAX_SCORES // max(1, items.shape[0])))
    for start in range(0, len(mine), chunk):
        ids = mine[start : start + chunk]
        scores = users[torch.from_numpy(ids - first_user)] @ items.T
        mask_rows(scores, ids, train)
        sums = ranking_sums(scores.cpu(), ids, truth, cfg.ks)
        totals += torch.tensor([sums[n] for n in names] + [sums["users"]], dtype=torch.float64)
    totals = all_reduce_sum(totals.to(trainer.env.device)).cpu()
    count = totals[-1].item()
    return {name: (totals[i].item() / count if count else 0.0) for i, name in enumerate(names)} | {"users": int(count)}
