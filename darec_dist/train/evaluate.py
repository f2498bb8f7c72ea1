"""Full-ranking evaluation, streamed over item blocks so that no rank holds every item's vector.

Each round, every rank computes the scoring vectors of its next slice of items and the ranks gather
the slices into one block (about `eval.item_block` items, whatever the world size); each rank scores
its own users against the block, masks their train items and keeps a running top-K. The per-user metric
sums are then added up by all-reduce (float64: another split of the users over ranks adds in another order, which
can move the last of 16 digits). A rank holds its evaluated users' vectors and top-K, one
item block and one score chunk: nothing that grows with the catalogue.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist

from darec_dist.config import ConfigError
from darec_dist.distributed.collectives import all_reduce_sum
from darec_dist.train.metrics import mask_rows, merge_top_k, metric_names, ranking_sums, top_k

# Scores held at once: user chunk x block <= this many floats (64 MiB).
MAX_SCORES = 1 << 24


def rank_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    return total * rank // world_size, total * (rank + 1) // world_size


@torch.no_grad()
def scoring_vectors(trainer, kind: str, ids: np.ndarray, calls: int) -> torch.Tensor:
    """Scoring vectors of contiguous `kind` ids, in `calls` lookups (equal on every rank: they are collective)."""
    offset = 0 if kind == "user" else trainer.dataset.num_users
    return trainer.aligner.scoring_vectors(trainer.node_embeddings(ids + offset, calls), kind)


@torch.no_grad()
def gathered_blocks(trainer, kind: str, world_size: int, rank: int, block: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Every `kind` node's scoring vector, as (sorted ids, vectors) blocks of about `block` rows, on every rank."""
    total = trainer.dataset.num_users if kind == "user" else trainer.dataset.num_items
    ranges = [rank_range(total, r, world_size) for r in range(world_size)]
    per_rank = max(1, math.ceil(block / world_size))
    rounds = math.ceil(max(hi - lo for lo, hi in ranges) / per_rank)
    calls = math.ceil(per_rank / trainer.cfg.eval.node_chunk)
    for j in range(rounds):
        # Round j covers ids [lo + j * per_rank, ...) of every rank's range; a short range sends nothing.
        starts = [lo + j * per_rank for lo, _ in ranges]
        counts = [max(0, min(hi, s + per_rank) - s) for s, (_, hi) in zip(starts, ranges)]
        ids = np.arange(starts[rank], starts[rank] + counts[rank], dtype=np.int64)
        vectors = scoring_vectors(trainer, kind, ids, calls)
        if world_size > 1:
            padded = vectors.new_zeros(per_rank, vectors.shape[1])
            padded[: len(vectors)] = vectors
            parts = [torch.empty_like(padded) for _ in range(world_size)]
            dist.all_gather(parts, padded)
            vectors = torch.cat([p[:n] for p, n in zip(parts, counts)])
            ids = np.concatenate([np.arange(s, s + n, dtype=np.int64) for s, n in zip(starts, counts)])
        if len(ids):
            yield ids, vectors


def evaluated_users(num_users: int, max_users: int | None) -> np.ndarray:
    """All users, or a fixed sample of them (sorted; the same for every run, so runs stay comparable)."""
    if max_users is None or max_users >= num_users:
        return np.arange(num_users, dtype=np.int64)
    return np.sort(np.random.default_rng(0).choice(num_users, size=max_users, replace=False)).astype(np.int64)


@torch.no_grad()
def evaluate(trainer, split: str, world_size: int, rank: int) -> dict[str, float]:
    """Mean Recall@K / NDCG@K over users with held-out items in `split`; train items masked."""
    cfg, ds, device = trainer.cfg.eval, trainer.dataset, trainer.env.device
    chosen = evaluated_users(ds.num_users, cfg.max_users)
    per_rank = [chosen[(chosen >= lo) & (chosen < hi)] for lo, hi in (rank_range(ds.num_users, r, world_size) for r in range(world_size))]
    mine = per_rank[rank]
    users = scoring_vectors(trainer, "user", mine, math.ceil(max(1, max(map(len, per_rank))) / cfg.node_chunk))
    k = max(cfg.ks)
    top_scores = torch.full((len(mine), k), float("-inf"), device=device)
    top_items = torch.full((len(mine), k), -1, dtype=torch.int64, device=device)
    train = ds.interactions("train")
    for items, block in gathered_blocks(trainer, "item", world_size, rank, cfg.item_block):
        columns = torch.from_numpy(items).to(device)
        chunk = max(1, min(cfg.user_chunk, MAX_SCORES // len(items)))
        for start in range(0, len(mine), chunk):
            rows = slice(start, start + chunk)
            scores = users[rows] @ block.T
            mask_rows(scores, mine[rows], train, items)
            # The block's own top-K first: merging with the running top-K then touches 2K columns, not the block.
            block_scores, block_columns = top_k(scores, k)
            top_scores[rows], top_items[rows] = merge_top_k(
                torch.cat([top_scores[rows], block_scores], dim=1), torch.cat([top_items[rows], columns[block_columns]], dim=1), k
            )
    names = metric_names(cfg.ks)
    sums = ranking_sums(top_items.cpu().numpy(), mine, ds.interactions(split), cfg.ks)
    totals = torch.tensor([sums[n] for n in names] + [sums["users"]], dtype=torch.float64)
    totals = all_reduce_sum(totals.to(device)).cpu()
    count = totals[-1].item()
    if count == 0:  # the same on every rank (all-reduced): raised alike, no rank left in a collective
        # Only a sample can miss (open_dataset refuses an empty split); scored 0.0, every epoch would tie the first.
        raise ConfigError(f"eval.max_users={cfg.max_users}: the sample of users holds none with {split} interactions; "
                         "raise eval.max_users, or set it to null to evaluate every user")
    return {name: totals[i].item() / count for i, name in enumerate(names)} | {"users": int(count)}
