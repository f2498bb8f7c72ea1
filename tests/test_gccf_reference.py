"""GCCF (RLMRec's: [E, A E, ..., A^L E] over the self-loop graph, no layer transforms) from exact per-layer
rows on 2 processes against a plain dense full-graph GCCF; and RLMRec-Gen's masked embedding on its blocks."""

import pickle

import numpy as np
import torch

from darec_dist.data.dataset import PreparedDataset
from darec_dist.distributed.env import DistEnv
from darec_dist.models.aligners import AlignConfig, AlignInputs, build_aligner
from darec_dist.models.losses import bpr_loss, l2_penalty
from darec_dist.models.backbones import output_dim
from darec_dist.train.trainer import Trainer, feature_builder
from tests.dist_helpers import run_distributed
from tests.train_helpers import global_batch, train_config

LR, REG, LAYERS, DIM = 1.0, 0.01, 3, 8


def run_trainer(rank, world_size, root, out_dir):
    dataset = PreparedDataset.open(root)
    env = DistEnv(rank, rank, world_size, torch.device("cpu"), "gloo")
    cfg = train_config(root, out_dir, "model.backbone=gccf", "sparse.optimizer=sgd", f"sparse.lr={LR}", f"model.reg={REG}",
                       "sparse.sharding=row_wise", "loader.batch_size=12", "loader.num_negatives=1")
    trainer = Trainer(cfg, env, dataset)
    before = {t: trainer.tables.full_table(t, n, DIM) for t, n in (("user_id", dataset.num_users), ("item_id", dataset.num_items))}
    outputs = trainer.node_embeddings(np.arange(dataset.num_nodes, dtype=np.int64), calls=1)
    users, pos, neg = global_batch(dataset.num_users, dataset.num_items, 12, seed=9)
    half = slice(rank * 6, (rank + 1) * 6)
    loss = trainer.train_step(trainer.features.build(users[half], pos[half], neg[half]))["total"].clone()
    torch.distributed.all_reduce(loss)  # each rank's loss is its half's mean: the global batch's is their mean
    loss = loss.item() / world_size
    after = {t: trainer.tables.full_table(t, v.shape[0], DIM) for t, v in before.items()}
    if rank == 0:
        (out_dir / "run.pkl").write_bytes(pickle.dumps({"before": before, "after": after, "outputs": outputs, "loss": loss, "batch": (users, pos, neg)}))


def self_loop_graph(dataset: PreparedDataset) -> torch.Tensor:
    train = dataset.interactions("train")
    u_count, n = dataset.num_users, dataset.num_nodes
    adj = torch.eye(n, dtype=torch.float64)
    for u in range(u_count):
        for i in train.indices[train.indptr[u] : train.indptr[u + 1]]:
            adj[u, u_count + i] = adj[u_count + i, u] = 1.0
    inv = adj.sum(1).rsqrt()
    return inv[:, None] * adj * inv[None, :]


def dense_gccf(norm: torch.Tensor, e0: torch.Tensor) -> torch.Tensor:
    layers = [e0]
    for _ in range(LAYERS):
        layers.append(norm @ layers[-1])
    return torch.cat(layers, dim=1)


def test_rows_match_dense_full_graph_gccf(exact_gccf_dataset, tmp_path):
    run_distributed(run_trainer, 2, exact_gccf_dataset, tmp_path)
    got = pickle.loads((tmp_path / "run.pkl").read_bytes())
    dataset = PreparedDataset.open(exact_gccf_dataset)
    u_count = dataset.num_users
    e0 = torch.cat([got["before"]["user_id"], got["before"]["item_id"]]).double().requires_grad_(True)
    final = dense_gccf(self_loop_graph(dataset), e0)
    assert got["outputs"].shape == (dataset.num_nodes, DIM * (LAYERS + 1))
    np.testing.assert_allclose(got["outputs"].numpy(), final.detach().numpy(), rtol=1e-5, atol=1e-6)

    users, pos, neg = (torch.from_numpy(a) for a in got["batch"])
    loss = bpr_loss(final[users], final[u_count + pos], final[u_count + neg])
    loss = loss + REG * l2_penalty(len(users), e0[users], e0[u_count + pos], e0[u_count + neg])
    loss.backward()
    assert abs(got["loss"] - loss.item()) < 1e-6
    expected = (e0 - LR * e0.grad).detach().numpy()
    updated = torch.cat([got["after"]["user_id"], got["after"]["item_id"]]).numpy()
    np.testing.assert_allclose(updated, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(updated - e0.detach().numpy()).max() > 1e-4


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
    norm = self_loop_graph(dataset)
    nodes = np.array([0, 7, dataset.num_users + 3])
    _, self_weight = features.rows.split_by_table(nodes)
    c = dense_gccf(norm, e0)[nodes]
    masked = AlignInputs({"all": c}, None, {"all": e0[nodes]}, {"all": torch.from_numpy(self_weight).double()})
    got = gen.masked_embeddings(masked)
    for row, v in enumerate(nodes):
        replaced = e0.clone()
        replaced[v] = gen.mask_token.detach()
        np.testing.assert_allclose(got[row].detach().numpy(), dense_gccf(norm, replaced)[v].numpy(), rtol=1e-6, atol=1e-7)  # rows are float32
