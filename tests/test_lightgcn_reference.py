"""LightGCN from exact propagation rows (weighted, sharded lookups) against a plain dense full-graph LightGCN."""

import pickle

import numpy as np
import torch

from darec_dist.data.dataset import PreparedDataset
from darec_dist.distributed.env import DistEnv
from darec_dist.models.losses import bpr_loss, l2_penalty
from darec_dist.train.trainer import Trainer
from tests.dist_helpers import run_distributed
from tests.train_helpers import global_batch, train_config

LR, REG, LAYERS = 1.0, 0.01, 3


def run_trainer(rank, world_size, root, out_dir):
    dataset = PreparedDataset.open(root)
    env = DistEnv(rank, rank, world_size, torch.device("cpu"), "gloo")
    cfg = train_config(root, out_dir, "model.backbone=lightgcn", "sparse.optimizer=sgd", f"sparse.lr={LR}", f"model.reg={REG}", "loader.batch_size=12", "loader.num_negatives=1")
    trainer = Trainer(cfg, env, dataset)
    dim = cfg.model.dim
    before = {t: trainer.tables.full_table(t, n, dim) for t, n in (("user_id", dataset.num_users), ("item_id", dataset.num_items))}
    nodes = np.arange(dataset.num_nodes, dtype=np.int64)
    outputs = trainer.node_embeddings(nodes, calls=1)
    users, pos, neg = global_batch(dataset.num_users, dataset.num_items, 12, seed=9)
    loss = trainer.train_step(trainer.features.build(users, pos, neg))["total"].item()
    after = {t: trainer.tables.full_table(t, v.shape[0], dim) for t, v in before.items()}
    (out_dir / "run.pkl").write_bytes(pickle.dumps({"before": before, "after": after, "outputs": outputs, "loss": loss, "batch": (users, pos, neg)}))


def dense_lightgcn(train_indptr, train_items, num_users, num_items, e0):
    """LightGCN as RLMRec runs it: symmetric-normalised full graph, E^{k+1} = A E^k, mean over layers 0..L."""
    n = num_users + num_items
    adj = torch.zeros(n, n, dtype=torch.float64)
    for u in range(num_users):
        for i in train_items[train_indptr[u] : train_indptr[u + 1]]:
            adj[u, num_users + i] = adj[num_users + i, u] = 1.0
    deg = adj.sum(1)
    inv = torch.where(deg > 0, deg.clamp(min=1).rsqrt(), torch.zeros_like(deg))
    norm = inv[:, None] * adj * inv[None, :]
    layers, current = [e0], e0
    for _ in range(LAYERS):
        current = norm @ current
        layers.append(current)
    return torch.stack(layers).mean(0)


def test_rows_match_dense_full_graph_outputs_and_gradients(exact_dataset, tmp_path):
    run_distributed(run_trainer, 1, exact_dataset, tmp_path)
    got = pickle.loads((tmp_path / "run.pkl").read_bytes())
    dataset = PreparedDataset.open(exact_dataset)
    train = dataset.interactions("train")
    u_count, i_count = dataset.num_users, dataset.num_items
    e0 = torch.cat([got["before"]["user_id"], got["before"]["item_id"]]).double().requires_grad_(True)
    final = dense_lightgcn(np.asarray(train.indptr), np.asarray(train.indices), u_count, i_count, e0)
    np.testing.assert_allclose(got["outputs"].numpy(), final.detach().numpy(), rtol=1e-5, atol=1e-6)

    users, pos, neg = (torch.from_numpy(a) for a in got["batch"])
    loss = bpr_loss(final[users], final[u_count + pos], final[u_count + neg])
    loss = loss + REG * l2_penalty(len(users), e0[users], e0[u_count + pos], e0[u_count + neg])
    loss.backward()
    assert abs(got["loss"] - loss.item()) < 1e-6
    expected = (e0 - LR * e0.grad).detach().numpy()
    updated = torch.cat([got["after"]["user_id"], got["after"]["item_id"]]).numpy()
    np.testing.assert_allclose(updated, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(updated - e0.detach().numpy()).max() > 1e-4  # the step really moved the tables
