"""Shared by the backbone reference tests: one SGD step of the real trainer (any world size) on exact rows,
and the plain dense full-graph computation it is checked against."""

from __future__ import annotations

import pickle

import numpy as np
import torch
import torch.nn.functional as F

from darec_dist.data.dataset import PreparedDataset
from darec_dist.models.masking import masked_nodes, step_salt
from darec_dist.train.trainer import Trainer
from tests.dist_helpers import cpu_env, full_table
from tests.train_helpers import global_batch, local_part, train_config

LR, REG, BATCH = 1.0, 0.01, 12


def run_trainer(rank, world_size, root, out_dir, *overrides):
    """All node outputs, then one step on a fixed global batch (rank r takes its slice); rank 0 writes run.pkl."""
    dataset = PreparedDataset.open(root)
    env = cpu_env(rank, world_size)
    cfg = train_config(root, out_dir, "sparse.optimizer=sgd", f"sparse.lr={LR}", f"model.reg={REG}",
                       f"loader.batch_size={BATCH}", "loader.num_negatives=1", *overrides)
    trainer = Trainer(cfg, env, dataset)
    dim = cfg.model.dim
    before = {t: full_table(trainer.tables, t, n, dim) for t, n in (("user_id", dataset.num_users), ("item_id", dataset.num_items))}
    outputs = trainer.node_embeddings(np.arange(dataset.num_nodes, dtype=np.int64), calls=1)
    masking = {}
    if trainer.aligner.input_mask_ratio:  # RLMRec-Gen: a mask token that is not zero, and the salt the step draws
        with torch.no_grad():
            trainer.aligner.mask_token.copy_(torch.randn(trainer.aligner.mask_token.shape, generator=torch.Generator().manual_seed(1)))
        state = torch.get_rng_state()
        masking = {"salt": step_salt(), "mask_token": trainer.aligner.mask_token.detach().clone()}
        torch.set_rng_state(state)
    users, pos, neg = global_batch(dataset.num_users, dataset.num_items, BATCH, seed=9)
    loss = trainer.train_step(trainer.features.build(*local_part(users, pos, neg, rank, world_size)))["total"].clone()
    torch.distributed.all_reduce(loss)  # each rank's loss is its slice's mean: the global batch's is their mean
    after = {t: full_table(trainer.tables, t, v.shape[0], dim) for t, v in before.items()}
    if rank == 0:
        run = {"before": before, "after": after, "outputs": outputs, "loss": loss.item() / world_size, "batch": (users, pos, neg),
               **masking}
        (out_dir / "run.pkl").write_bytes(pickle.dumps(run))


def dense_adjacency(num_users: int, num_items: int, edges, self_loops: bool = False) -> np.ndarray:
    """The dense symmetric-normalised graph of (user, item) edges over users then items (float64), the plain
    reference the sparse paths are checked against: A + I normalised by degree + 1 with self loops, isolated
    nodes left at zero without."""
    n = num_users + num_items
    adj = np.eye(n) if self_loops else np.zeros((n, n))
    for u, i in edges:
        adj[u, num_users + i] = adj[num_users + i, u] = 1.0
    deg = adj.sum(1)
    inv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1)), 0.0)
    return inv[:, None] * adj * inv[None, :]


def normalised_graph(dataset: PreparedDataset, self_loops: bool = False) -> torch.Tensor:
    """dense_adjacency of the dataset's train interactions, as a float64 tensor."""
    train = dataset.interactions("train")
    edges = ((u, i) for u in range(dataset.num_users) for i in train.indices[train.indptr[u] : train.indptr[u + 1]])
    return torch.from_numpy(dense_adjacency(dataset.num_users, dataset.num_items, edges, self_loops))


def powers(norm: torch.Tensor, e0: torch.Tensor, layers: int) -> list[torch.Tensor]:
    """[E, A E, ..., A^L E]."""
    out = [e0]
    for _ in range(layers):
        out.append(norm @ out[-1])
    return out


def check_run(tmp_path, dataset: PreparedDataset, backbone, mask_ratio: float = 0.0) -> None:
    """The run's outputs, loss and SGD-updated tables equal the dense `backbone(e0)`'s on the same batch. With
    mask_ratio (RLMRec-Gen's masked forward), BPR is checked on the backbone run with the step's masked nodes'
    inputs replaced by the mask token; the L2 penalty stays on the nodes' own rows."""
    got = pickle.loads((tmp_path / "run.pkl").read_bytes())
    u_count = dataset.num_users
    e0 = torch.cat([got["before"]["user_id"], got["before"]["item_id"]]).double().requires_grad_(True)
    final = backbone(e0)
    assert got["outputs"].shape == final.shape
    np.testing.assert_allclose(got["outputs"].numpy(), final.detach().numpy(), rtol=1e-5, atol=1e-6)
    if mask_ratio:
        masked = masked_nodes(torch.arange(dataset.num_nodes), got["salt"], mask_ratio)
        assert 0 < masked.sum() < dataset.num_nodes
        final = backbone(torch.where(masked[:, None], got["mask_token"].double(), e0))

    users, pos, neg = (torch.from_numpy(a) for a in got["batch"])
    # BPR and LightGCN's L2 written out pair by pair (not the trainer's losses.py): each user's negatives follow it.
    per_user = len(neg) // len(users)
    pairs = [(u, u_count + p, u_count + neg[b * per_user + k]) for b, (u, p) in enumerate(zip(users, pos)) for k in range(per_user)]
    loss = -torch.stack([F.logsigmoid(final[u] @ final[i] - final[u] @ final[j]) for u, i, j in pairs]).mean()
    inputs = [*users, *(u_count + pos), *(u_count + neg)]
    loss = loss + REG * sum(e0[v] @ e0[v] for v in inputs) / (2 * len(users))
    loss.backward()
    assert abs(got["loss"] - loss.item()) < 1e-6
    expected = (e0 - LR * e0.grad).detach().numpy()
    updated = torch.cat([got["after"]["user_id"], got["after"]["item_id"]]).numpy()
    np.testing.assert_allclose(updated, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(updated - e0.detach().numpy()).max() > 1e-4  # the step really moved the tables
