"""Recall/NDCG sums against a plain per-user implementation of RLMRec's protocol."""

import math

import numpy as np
import torch

from darec_dist.data.dataset import CSR
from darec_dist.train.metrics import mask_rows, ranking_sums


def csr(rows):
    indptr = np.cumsum([0] + [len(r) for r in rows])
    return CSR(indptr, np.concatenate([np.sort(r) for r in rows]).astype(np.int64))


def reference(scores, train_rows, test_rows, k):
    recall = ndcg = users = 0.0
    for u, (trained, held) in enumerate(zip(train_rows, test_rows)):
        if len(held) == 0:
            continue
        users += 1
        ranked = [i for i in np.argsort(-scores[u], kind="stable") if i not in set(trained)][:k]
        hits = [1.0 if i in set(held) else 0.0 for i in ranked]
        recall += sum(hits) / len(held)
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
        ndcg += dcg / sum(1 / math.log2(r + 2) for r in range(min(k, len(held))))
    return recall, ndcg, users


def test_sums_match_reference():
    rng = np.random.default_rng(4)
    num_users, num_items = 12, 40
    train_rows, test_rows = [], []
    for u in range(num_users):
        items = rng.permutation(num_items)
        train_rows.append(items[: rng.integers(0, 8)])
        test_rows.append(items[20 : 20 + (0 if u == 3 else rng.integers(1, 12))])
    scores = rng.standard_normal((num_users, num_items)).astype(np.float32)
    masked = torch.from_numpy(scores.copy())
    users = np.arange(num_users, dtype=np.int64)
    mask_rows(masked, users, csr(train_rows))
    top = torch.topk(masked, k=20, dim=1).indices.numpy()
    sums = ranking_sums(top, users, csr(test_rows), [5, 10, 20])
    for k in (5, 10, 20):
        recall, ndcg, count = reference(scores, train_rows, test_rows, k)
        assert sums["users"] == count == num_users - 1
        assert abs(sums[f"recall@{k}"] - recall) < 1e-9
        assert abs(sums[f"ndcg@{k}"] - ndcg) < 1e-9
