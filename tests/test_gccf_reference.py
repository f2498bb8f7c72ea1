"""GCCF (RLMRec's: [E, A E, ..., A^L E] over the self-loop graph, no layer transforms) from exact per-layer
rows on 2 processes against a plain dense full-graph GCCF; and RLMRec-Gen's masked embedding on its blocks."""

import numpy as np
import torch

from darec_dist.data.dataset import PreparedDataset
from darec_dist.models.aligners import AlignConfig, AlignInputs, build_aligner
from darec_dist.models.backbones import output_dim
from darec_dist.train.trainer import feature_builder
from tests.dense_reference import check_run, normalised_graph, powers, run_trainer
from tests.dist_helpers import run_distributed
from tests.train_helpers import train_config

LAYERS, DIM = 3, 8


def dense_gccf(norm: torch.Tensor, e0: torch.Tensor) -> torch.Tensor:
    return torch.cat(powers(norm, e0, LAYERS), dim=1)


def test_rows_match_dense_full_graph_gccf(exact_gccf_dataset, tmp_path):
    run_distributed(run_trainer, 2, exact_gccf_dataset, tmp_path, "model.backbone=gccf", "sparse.sharding=row_wise")
    dataset = PreparedDataset.open(exact_gccf_dataset)
    norm = normalised_graph(dataset, self_loops=True)
    check_run(tmp_path, dataset, lambda e0: dense_gccf(norm, e0))


def test_masked_gccf_embedding_equals_gccf_with_the_mask_as_input(exact_gccf_dataset, tmp_path):
    """RLMRec-Gen's c - P_vv (E_v - m), per row block, is GCCF run with node v's input replaced by m."""
    dataset = PreparedDataset.open(exact_gccf_dataset)
    cfg = train_config(exact_gccf_dataset, tmp_path, "model.backbone=gccf", "align.method=rlmrec-gen")
    gen = build_aligner(AlignConfig(method="rlmrec-gen"), output_dim(cfg.model, dataset), dataset.embedding_dim, input_dim=DIM).double()
    features = feature_builder(cfg, dataset, gen, world_size=1)
    torch.manual_seed(0)
    e0 = torch.randn(dataset.num_nodes, DIM, dtype=torch.float64)
    with torch.no_grad():
        gen.mask_token.normal_()
    norm = normalised_graph(dataset, self_loops=True)
    nodes = np.array([0, 7, dataset.num_users + 3])
    _, self_weight = features.rows.split_by_table(nodes)
    c = dense_gccf(norm, e0)[nodes]
    masked = AlignInputs({"all": c}, None, {"all": e0[nodes]}, {"all": torch.from_numpy(self_weight).double()})
    got = gen.masked_embeddings(masked)
    for row, v in enumerate(nodes):
        replaced = e0.clone()
        replaced[v] = gen.mask_token.detach()
        np.testing.assert_allclose(got[row].detach().numpy(), dense_gccf(norm, replaced)[v].numpy(), rtol=1e-6, atol=1e-7)  # rows are float32
