"""GCCF (RLMRec's: [E, A E, ..., A^L E] over the self-loop graph, no layer transforms) from exact per-layer
rows on 2 processes against a plain dense full-graph GCCF; and RLMRec-Gen's masked forward on its blocks."""

import torch

from darec_dist.data.dataset import PreparedDataset
from tests.dense_reference import check_run, normalised_graph, powers, run_trainer
from tests.dist_helpers import run_distributed

LAYERS = 3


def dense_gccf(norm: torch.Tensor, e0: torch.Tensor) -> torch.Tensor:
    return torch.cat(powers(norm, e0, LAYERS), dim=1)


def test_rows_match_dense_full_graph_gccf(exact_gccf_dataset, tmp_path):
    run_distributed(run_trainer, 2, exact_gccf_dataset, tmp_path, "model.backbone=gccf", "sparse.sharding=row_wise")
    dataset = PreparedDataset.open(exact_gccf_dataset)
    norm = normalised_graph(dataset, self_loops=True)
    check_run(tmp_path, dataset, lambda e0: dense_gccf(norm, e0))


def test_rlmrec_gen_trains_on_the_masked_forward_of_every_block(exact_gccf_dataset, tmp_path):
    """RLMRec-Gen on GCCF's concatenated blocks: BPR on GCCF run with the masked nodes' inputs replaced by the mask
    token in every layer's block (2 processes)."""
    run_distributed(run_trainer, 2, exact_gccf_dataset, tmp_path, "model.backbone=gccf", "sparse.sharding=table_wise",
                    "align.method=rlmrec-gen", "align.gen.mask_ratio=0.4", "align.gen.weight=0")
    dataset = PreparedDataset.open(exact_gccf_dataset)
    norm = normalised_graph(dataset, self_loops=True)
    check_run(tmp_path, dataset, lambda e0: dense_gccf(norm, e0), mask_ratio=0.4)
