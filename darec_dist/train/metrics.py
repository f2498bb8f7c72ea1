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


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k best (values, column positions), best first, equal scores in column order.

    With columns in ascending item order a tie goes to the lower item id, as a stable sort would have it:
    torch.topk alone picks among tied items arbitrarily, which made the top K (and the metrics) depend on
    how the catalogue was cut into blocks and ranks. One more column of torch.topk shows which rows have a
    tie across the K-th place; only those (rare with float scores) take the exact, slower selection."""
    k = min(k, scores.shape[1])
    values, columns = torch.topk(scores, min(k + 1, scores.shape[1]), dim=1)
    if values.shape[1] > k:
        split = (values[:, k] == values[:, k - 1]).nonzero()[:, 0]
        values, columns = values[:, :k], columns[:, :k]
        if len(split):
            values[split], columns[split] = _top_k_exact(scores[split], k)
    by_column = torch.sort(columns, dim=1).indices
    values, columns = values.gather(1, by_column), columns.gather(1, by_column)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    return values.gather(1, order), columns.gather(1, order)


def _top_k_exact(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k best with the ties across the K-th place resolved to the lowest columns (any order)."""
    kth = torch.topk(scores, k, dim=1).values[:, -1:]
    above, tied = scores > kth, scores == kth
    chosen = above | (tied & (torch.cumsum(tied, dim=1) <= k - above.sum(1, keepdim=True)))
    columns = chosen.nonzero()[:, 1].view(scores.shape[0], k)
    return scores.gather(1, columns), columns


def merge_top_k(values: torch.Tensor, items: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each row's candidate (values, item ids), best first, ties to the lower id."""
    by_id = torch.sort(items, dim=1, stable=True).indices
    values, items = values.gather(1, by_id), items.gather(1, by_id)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
    return values.gather(1, order), items.gather(1, order)


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
