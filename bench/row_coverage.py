"""How much of the exact LightGCN propagation a prepared dataset's pruned rows keep.

    python bench/row_coverage.py --data data/gowalla --sample 200

The exact row of node v is P_v = sum_k a_k (A^k)_v over k = 0..L (L the dataset's graph.layers) with equal weights (the mean over
layers); its total weight is (P 1)_v, computed by L sparse products with the normalised train graph
(bench/full_graph_lightgcn.py builds it). Prints the share of each row's exact weight that the
dataset's rows hold, and the number of entries of exact rows for a seeded sample of nodes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from bench.cli import at_least
from bench.full_graph_lightgcn import normalised_graph
from darec_dist.data.dataset import DatasetError, PreparedDataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--sample", type=at_least(1), default=200)
    args = parser.parse_args()
    try:
        dataset = PreparedDataset.open(args.data, verify_checksums=False)
    except DatasetError as err:
        parser.error(str(err))
    # The exact rows to compare with are the dataset's own: another layer count measures other rows.
    graph_cfg = dataset.manifest["config"]["graph"]
    layers = graph_cfg["layers"]
    if graph_cfg.get("layer_weights") is not None:
        raise SystemExit(f"error: {args.data} weights its layers {graph_cfg['layer_weights']}; this script compares with "
                         "the equal-weight mean of layers 0..L")
    graph = normalised_graph(dataset).double()
    n = dataset.num_nodes

    power = torch.ones(n, 1, dtype=torch.float64)
    exact_weight = power.clone()
    for _ in range(layers):
        power = graph @ power
        exact_weight += power
    exact_weight = exact_weight.squeeze(1).numpy() / (layers + 1)
    indptr = np.load(Path(args.data) / "graph" / "indptr.npy")
    weights = np.load(Path(args.data) / "graph" / "weights.npy")
    kept = np.add.reduceat(weights.astype(np.float64), indptr[:-1])
    share = kept / exact_weight
    print(f"rows kept: {len(weights) / n:.1f} entries per row; share of the exact row weight: mean {share.mean():.3f}, "
          f"median {np.median(share):.3f}, 10th percentile {np.percentile(share, 10):.3f}")

    # Exact rows' support for a sample of nodes: indicator rows propagated L times.
    nodes = np.random.default_rng(0).choice(n, min(args.sample, n), replace=False)
    reach = torch.zeros(n, len(nodes), dtype=torch.float64)
    reach[torch.from_numpy(nodes), torch.arange(len(nodes))] = 1.0
    support = reach.clone()
    for _ in range(layers):
        reach = graph @ reach
        support += reach
    entries = (support != 0).sum(0).numpy()
    print(f"exact {layers}-layer rows, {len(nodes)} sampled nodes: mean {entries.mean():.0f}, median {np.median(entries):.0f} entries")


if __name__ == "__main__":
    main()
