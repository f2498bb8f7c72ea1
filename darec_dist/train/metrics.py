"""Full-ranking Recall@K and NDCG@K under RLMRec's protocol, summed over users so ranks can add them up.

Recall@K = hits in the top K / |held-out items| (not capped at K); NDCG@K uses
binary gains and an ideal DCG over min(K, |held-out|) positions. Training items
are masked out; users without held-out items are not counted.
"""

from __future__ import annotations

import numpy as np
import torch

from darec_dist.data.dataset import CSR
from darec_dist.data.sampling import contains, gather_rows


def metric_names(ks: list[int]) -> list[str]:
    return [f"{name}@{k}" for name in ("recall", "ndcg") for k in ks]


def mask_rows(scores: torch.Tensor, users: np.ndarray, exclude: CSR, columns: np.ndarray | None = None) -> None:
    """Set each user's excluded items (its train items) to -inf, in place.

    Column j of `scores` is item `columns[j]` (sorted ids; None: column j is item j).
    """
    lengths, items, _ = gather_rows(exclude, users)
    rows = np.repeat(np.arange(len(users)), lengths)
    if columns is not None:
        at = np.minimum(np.searchsorted(columns, items), len(columns) - 1)
        inside = columns[at] == items
        rows, items = rows[inside], at[inside]
    scores[torch.from_numpy(rows).to(scores.device), torch.from_numpy(items).to(scores.device)] = float("-inf")


def ranking_sums(top: np.ndarray, users: np.ndarray, truth: CSR, ks: list[int]) -> dict[str, float]:
    """Sums of each metric over the users that have held-out items, plus `users` (their count).

    top[u] holds user u's items best first, at least max(ks) of them (-1 for none).
    """
    sizes = np.asarray(truth.indptr[users + 1] - truth.indptr[users])
    keep = sizes > 0
    sums = {name: 0.0 for name in metric_names(ks)}
    sums["users"] = float(keep.sum())
    if not keep.any():
        return sums
    top = top[keep, : max(ks)]
    users, sizes = users[keep], sizes[keep]
    hit = contains(truth, np.repeat(users, top.shape[1]), top.reshape(-1)).reshape(top.shape).astype(np.float64)
    discount = 1.0 / np.log2(np.arange(2, top.shape[1] + 2))
    for k in ks:
        hits_k = hit[:, :k]
        sums[f"recall@{k}"] = float((hits_k.sum(1) / sizes).sum())
        dcg = (hits_k * discount[: hits_k.shape[1]]).sum(1)
        ideal = np.cumsum(discount)[np.minimum(sizes, k) - 1]
        sums[f"ndcg@{k}"] = float((dcg / ideal).sum())
    return sums
