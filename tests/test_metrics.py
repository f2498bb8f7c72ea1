"""Recall/NDCG sums against a plain per-user implementation of RLMRec's protocol."""

import math

import numpy as np
import torch

from darec_dist.data.dataset import CSR
from darec_dist.train.metrics import mask_rows, merge_top_k, ranking_sums, top_k


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


def test_top_k_breaks_ties_by_item_id_however_the_catalogue_is_cut():
    rng = np.random.default_rng(3)
    scores = torch.from_numpy(rng.integers(0, 4, size=(30, 57)).astype(np.float32))  # many exact ties
    scores[:, 5] = float("-inf")  # a masked item
    k = 10
    expected = np.argsort(-scores.numpy(), axis=1, kind="stable")[:, :k]  # ties to the lower id
    values, columns = top_k(scores, k)
    np.testing.assert_array_equal(columns.numpy(), expected)
    np.testing.assert_array_equal(values.numpy(), np.take_along_axis(scores.numpy(), expected, 1))
    for block in (1, 7, 20):  # blocks merged into a running top K, in any order of blocks
        starts = list(range(0, scores.shape[1], block))[::-1]
        best = (torch.full((30, k), float("-inf")), torch.full((30, k), -1, dtype=torch.int64))
        for start in starts:
            part_values, part_columns = top_k(scores[:, start : start + block], k)
            best = merge_top_k(torch.cat([best[0], part_values], 1), torch.cat([best[1], part_columns + start], 1), k)
        np.testing.assert_array_equal(best[1].numpy(), expected, err_msg=f"block {block}")
