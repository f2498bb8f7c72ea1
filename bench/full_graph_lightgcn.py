"""Contrast: a plain full-graph LightGCN step (RLMRec's way) on a prepared dataset, one process.

    python bench/full_graph_lightgcn.py --data data/synthetic-1m --steps 5

Every step propagates all node embeddings through the normalised train graph L times
(torch.sparse), then takes a BPR step on one batch: a step costs L x nnz(graph), an epoch
(train / batch steps) grows with the square of the data. Prints ms per step and the
implied seconds per epoch and peak memory of this process.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np
import torch
import torch.nn.functional as F

from bench.cli import at_least
from darec_dist.data.dataset import DatasetError, PreparedDataset


def normalised_graph(dataset: PreparedDataset) -> torch.Tensor:
    train = dataset.interactions("train")
    indptr = np.asarray(train.indptr)
    users = np.repeat(np.arange(dataset.num_users), np.diff(indptr))
    items = np.asarray(train.indices) + dataset.num_users
    rows = np.concatenate([users, items])
    cols = np.concatenate([items, users])
    degree = np.bincount(rows, minlength=dataset.num_nodes).astype(np.float32)
    inv = 1.0 / np.sqrt(np.maximum(degree, 1.0))
    values = inv[rows] * inv[cols]
    index = torch.from_numpy(np.stack([rows, cols]))
    return torch.sparse_coo_tensor(index, torch.from_numpy(values), (dataset.num_nodes, dataset.num_nodes)).coalesce().to_sparse_csr()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--layers", type=at_least(1), default=3)
    parser.add_argument("--dim", type=at_least(1), default=32)
    parser.add_argument("--batch-size", type=at_least(1), default=4096)
    parser.add_argument("--steps", type=at_least(1), default=5)
    parser.add_argument("--threads", type=at_least(1), default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        dataset = PreparedDataset.open(args.data, verify_checksums=False)
    except DatasetError as err:
        raise SystemExit(f"error: {err}") from None
    train = dataset.interactions("train")
    n_train = int(train.indptr[-1])
    if n_train < args.batch_size:  # an epoch of 0 steps would print 0 s per epoch
        raise SystemExit(f"error: --batch-size {args.batch_size} exceeds the {n_train} train interactions of {args.data}")
    graph = normalised_graph(dataset)
    table = torch.nn.Parameter(torch.randn(dataset.num_nodes, args.dim) * 0.1)
    optimizer = torch.optim.Adam([table], lr=1e-3)
    rng = np.random.default_rng(0)
    times = []
    for step in range(args.steps + 1):
        pick = rng.integers(0, n_train, args.batch_size)
        users = torch.from_numpy(np.searchsorted(np.asarray(train.indptr), pick, side="right") - 1)
        pos = torch.from_numpy(np.asarray(train.indices[pick]) + dataset.num_users)
        neg = torch.from_numpy(rng.integers(0, dataset.num_items, args.batch_size) + dataset.num_users)
        started = time.perf_counter()
        layers, current = [table], table
        for _ in range(args.layers):
            current = graph @ current
            layers.append(current)
        final = torch.stack(layers).mean(0)
        u, p, n = final[users], final[pos], final[neg]
        loss = -F.logsigmoid((u * p).sum(-1) - (u * n).sum(-1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step > 0:  # the first step pays one-off allocations
            times.append(time.perf_counter() - started)
    step_s = float(np.mean(times))
    steps_per_epoch = n_train // args.batch_size
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"full-graph LightGCN: {dataset.num_nodes} nodes, {graph.values().numel()} graph entries, {n_train} train interactions")
    print(f"  {1000 * step_s:.1f} ms/step x {steps_per_epoch} steps = {step_s * steps_per_epoch:.1f} s/epoch; peak RSS {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
