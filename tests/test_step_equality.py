"""One training step with 2 processes (gloo) equals the 1-process step on the same global batch.

SGD is the strict case: Adam-like optimizers hide a gradient that is off by a
constant factor, SGD does not. So the dense part steps with SGD too (DeepSpeed's
engine takes torch.optim.SGD by name), which catches DeepSpeed summing instead of
averaging the ranks' gradients. Each case compares the averaged loss, the full
tables after the step and every dense parameter.
"""

import json

import numpy as np
import pytest
import torch

from darec_dist.data.dataset import PreparedDataset
from darec_dist.train.trainer import Trainer
from tests.dist_helpers import cpu_env, full_table, results_per_world_size
from tests.train_helpers import global_batch, local_part, train_config

CASES = {
    "lightgcn-sgd-row_wise": ["model.backbone=lightgcn", "sparse.optimizer=sgd", "sparse.lr=5.0", "sparse.sharding=row_wise"],
    "mf-sgd-table_wise": ["model.backbone=mf", "sparse.optimizer=sgd", "sparse.lr=5.0", "sparse.sharding=table_wise"],
    "mf-rowwise_adagrad-row_wise": ["model.backbone=mf", "sparse.optimizer=rowwise_adagrad", "sparse.lr=0.5", "sparse.sharding=row_wise"],
    # Adagrad's first step is lr * g / (|g| + eps) too: an eps far above float noise in g (each rank sums
    # a repeated node's gradients over its own half of the batch) keeps this case to the strict bound.
    "lightgcn-adagrad-column_wise": ["model.backbone=lightgcn", "sparse.optimizer=adagrad", "sparse.lr=0.5", "sparse.eps=1.0e-4", "sparse.sharding=column_wise"],
    # Dense parameters owned by DeepSpeed; samples cover the whole batch so no draw depends on the world size.
    "lightgcn-sgd-row_wise-darec": ["model.backbone=lightgcn", "sparse.optimizer=sgd", "sparse.lr=5.0", "sparse.sharding=row_wise", "align.method=darec", "align.darec.sample_size=64", "align.darec.structure_weight=1.0", "align.darec.regulariser_weight=1.0"],
    # LLM tables stored in fp16 (rows come back as float32).
    "lightgcn-sgd-row_wise-darec-llm_fp16": ["model.backbone=lightgcn", "sparse.optimizer=sgd", "sparse.lr=5.0", "sparse.sharding=row_wise", "sparse.llm_dtype=fp16", "align.method=darec", "align.darec.sample_size=64", "align.darec.structure_weight=1.0", "align.darec.regulariser_weight=1.0"],
    "mf-sgd-row_wise-rlmrec_con": ["model.backbone=mf", "sparse.optimizer=sgd", "sparse.lr=5.0", "sparse.sharding=row_wise", "align.method=rlmrec-con", "align.con.weight=1.0"],
    "lightgcn-sgd-table_wise-rlmrec_gen": ["model.backbone=lightgcn", "sparse.optimizer=sgd", "sparse.lr=5.0", "sparse.sharding=table_wise", "align.method=rlmrec-gen", "align.gen.mask_ratio=0.5", "align.gen.weight=1.0"],
    "lightgcn-adam-planner": ["model.backbone=lightgcn", "sparse.optimizer=adam", "sparse.lr=0.05", "sparse.sharding=auto"],
}
GLOBAL_BATCH = 16
DENSE_SGD = {"zero_optimization": {"stage": 0}, "optimizer": {"type": "SGD", "params": {"lr": 1.0}}}


def one_step(rank, world_size, root, out_dir, cases):
    dataset = PreparedDataset.open(root)
    env = cpu_env(rank, world_size)
    dense_sgd = out_dir / "dense-sgd.json"
    if rank == 0:
        dense_sgd.write_text(json.dumps(DENSE_SGD))
    torch.distributed.barrier()
    results = {}
    for name, overrides in cases.items():
        # Whatever each rank drew before (launch/train.py seeds a stream per rank), the model must start the same.
        torch.manual_seed(100 * world_size + rank)
        cfg = train_config(root, out_dir / name, f"loader.batch_size={GLOBAL_BATCH}", "loader.num_negatives=2", "model.reg=0.01",
                           f"dense.deepspeed_config={dense_sgd}", *overrides)
        trainer = Trainer(cfg, env, dataset)
        dim = cfg.model.dim
        tables = lambda: {kind: full_table(trainer.tables, kind, n, dim) for kind, n in (("user_id", dataset.num_users), ("item_id", dataset.num_items))}
        dense = lambda: {k: v.detach().clone() for k, v in trainer.dense.named_parameters()}
        initial_tables, initial_dense = tables(), dense()
        users, pos, neg = local_part(*global_batch(dataset.num_users, dataset.num_items, GLOBAL_BATCH, 2, seed=5), rank, world_size)
        losses = trainer.train_step(trainer.features.build(users, pos, neg))
        loss = losses["total"].clone()
        torch.distributed.all_reduce(loss)
        results[name] = {
            "loss": loss.item() / world_size,
            **tables(),
            "dense": dense(),
            "initial": {**initial_tables, "dense": initial_dense},
            "plan": trainer.tables.plan,
        }
        if trainer.llm is not None:
            results[name]["user_llm"] = full_table(trainer.llm, "user_llm", dataset.num_users, dataset.embedding_dim)
            results[name]["llm_dtypes"] = {str(t.dtype) for _, _, t in trainer.llm.local_shards("user_llm")}
    return results


@pytest.fixture(scope="module")
def step_results(small_dataset, tmp_path_factory):
    root, _ = small_dataset
    out = tmp_path_factory.mktemp("steps")
    return results_per_world_size(one_step, out, root, out, CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_equal_one(step_results, case, small_dataset):
    one, two = step_results[0][case], step_results[1][case]
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-6, abs=1e-7)
    # Adam's first step is lr * g / (|g| + eps): where |g| is near eps, float-order noise in g moves the
    # update by up to ~1e-5; the SGD cases hold the strict bound.
    atol = 2e-5 if "adam" in case else 1e-6
    for table in ("user_id", "item_id"):
        np.testing.assert_allclose(two[table].numpy(), one[table].numpy(), rtol=1e-5, atol=atol)
    assert one["dense"].keys() == two["dense"].keys()
    assert ("rlmrec" in case or "darec" in case) == bool(one["dense"]), "aligners, and only they, have dense parameters"
    for name in one["dense"]:
        np.testing.assert_allclose(two["dense"][name].numpy(), one["dense"][name].numpy(), rtol=1e-5, atol=1e-6)
    expected_type = {"row_wise": "row_wise", "table_wise": "table_wise", "column_wise": "column_wise"}
    for key, sharding in expected_type.items():
        if key in case:
            assert all(p[0] == sharding for p in two["plan"].values()), two["plan"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_step_changed_the_tables_and_dense_parameters(step_results, case):
    """Guards the comparison above: every case's step moved the tables and each dense parameter that its losses reach."""
    result = step_results[0][case]
    for table in ("user_id", "item_id"):
        assert np.abs(result[table].numpy() - result["initial"][table].numpy()).max() > 1e-4, table
    for name, value in result["dense"].items():
        if name.endswith("centres_ready") or name.endswith(".centres"):
            continue  # DaRec's centres are set by k-means in the step (not a gradient), checked by its own tests
        assert (value - result["initial"]["dense"][name]).abs().max() > 1e-6, name


@pytest.mark.parametrize("case, dtype", [("lightgcn-sgd-row_wise-darec", np.float32), ("lightgcn-sgd-row_wise-darec-llm_fp16", np.float16)])
def test_llm_tables_hold_the_datasets_rows_at_the_configured_precision(step_results, small_dataset, case, dtype):
    root, _ = small_dataset
    stored = np.asarray(PreparedDataset.open(root).embeddings("user"), dtype=np.float32)
    expected = stored.astype(dtype).astype(np.float32)
    assert dtype == np.float32 or not np.array_equal(expected, stored), "fp16 rounding must be visible in this data"
    for world in (0, 1):
        result = step_results[world][case]
        assert result["llm_dtypes"] == {str(torch.from_numpy(np.zeros(1, dtype)).dtype)}
        np.testing.assert_array_equal(result["user_llm"].numpy(), expected)
