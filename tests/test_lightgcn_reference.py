"""LightGCN from exact propagation rows (weighted, sharded lookups) against a plain dense full-graph LightGCN."""

import torch

from darec_dist.data.dataset import PreparedDataset
from tests.dense_reference import check_run, normalised_graph, powers, run_trainer
from tests.dist_helpers import run_distributed

LAYERS = 3


def test_rows_match_dense_full_graph_outputs_and_gradients(exact_dataset, tmp_path):
    run_distributed(run_trainer, 1, exact_dataset, tmp_path, "model.backbone=lightgcn")
    dataset = PreparedDataset.open(exact_dataset)
    norm = normalised_graph(dataset)
    # LightGCN as its paper and RecBole run it: E^{k+1} = A E^k, mean over layers 0..L (RLMRec sums them: graph.layer_weights).
    check_run(tmp_path, dataset, lambda e0: torch.stack(powers(norm, e0, LAYERS)).mean(0))


def test_rlmrec_gen_trains_on_the_masked_forward(exact_dataset, tmp_path):
    """RLMRec-Gen's BPR on 2 processes: LightGCN run with the step's masked nodes' inputs replaced by the mask
    token, as RLMRec runs it, whichever rows hold the masked nodes (the reconstruction's weight is 0 here)."""
    run_distributed(run_trainer, 2, exact_dataset, tmp_path, "model.backbone=lightgcn", "sparse.sharding=row_wise",
                    "align.method=rlmrec-gen", "align.gen.mask_ratio=0.4", "align.gen.weight=0")
    dataset = PreparedDataset.open(exact_dataset)
    norm = normalised_graph(dataset)
    check_run(tmp_path, dataset, lambda e0: torch.stack(powers(norm, e0, LAYERS)).mean(0), mask_ratio=0.4)
