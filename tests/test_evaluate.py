"""Streamed evaluation (item blocks, running top-K, users split over 2 ranks) equals a plain dense ranking.

The reference scores every user against every item at once, masks train items and ranks with a
stable argsort (tests/test_metrics.py); the streamed path sees the items in blocks smaller than the
catalogue and uneven across ranks, and scores users in small chunks. The export, also streamed,
must hold every row.
"""


import numpy as np
import pytest

from darec_dist.config import ConfigError
from darec_dist.data.dataset import PreparedDataset
from darec_dist.train import evaluate as evaluate_module
from darec_dist.train import report
from darec_dist.train.evaluate import evaluate, evaluated_users, gathered_blocks, scoring_vectors
from darec_dist.train.trainer import Trainer
from tests.dist_helpers import cpu_env, results_per_world_size
from tests.test_metrics import reference
from tests.train_helpers import train_config

CASES = {
    "lightgcn-all-users": ["model.backbone=lightgcn"],
    "darec-concat-sampled-users": ["align.method=darec", "align.darec.scoring=concat", "eval.max_users=25"],
}
STREAMED = ["eval.item_block=7", "eval.user_chunk=5", "eval.node_chunk=3"]


def run(rank, world_size, root, out_dir):
    dataset = PreparedDataset.open(root)
    env = cpu_env(rank, world_size)
    results = {}
    for name, overrides in CASES.items():
        trainer = Trainer(train_config(root, out_dir / name, *overrides, *STREAMED), env, dataset)
        trainer.set_train(False)
        results[name] = {"test": evaluate(trainer, "test", world_size, rank)}
        counts = {"user": dataset.num_users, "item": dataset.num_items}
        blocks = {kind: (rows, gathered_blocks(trainer, kind, world_size, rank, 7)) for kind, rows in counts.items()}
        report.export_vectors(out_dir / name / f"world{world_size}", dataset, blocks, write=rank == 0)
        if world_size == 1:
            results[name]["vectors"] = {kind: scoring_vectors(trainer, kind, np.arange(n), calls=n).numpy() for kind, n in counts.items()}
    # A sample of users none of whom has held-out interactions (here: none at all) is refused on every rank alike.
    evaluate_module.evaluated_users, kept = (lambda num_users, max_users: np.zeros(0, dtype=np.int64)), evaluated_users
    try:
        evaluate(trainer, "test", world_size, rank)
    except ConfigError as err:
        results["empty sample"] = str(err)
    finally:
        evaluate_module.evaluated_users = kept
    return results


@pytest.fixture(scope="module")
def evaluations(small_dataset, tmp_path_factory):
    root, _ = small_dataset
    out = tmp_path_factory.mktemp("evaluate")
    return out, results_per_world_size(run, out, root, out)


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_evaluation_equals_dense_ranking(evaluations, case, small_dataset):
    out, (one, two) = evaluations
    dataset = PreparedDataset.open(small_dataset[0])
    vectors = one[case]["vectors"]
    max_users = 25 if "sampled" in case else None
    users = evaluated_users(dataset.num_users, max_users)
    assert len(users) == (25 if max_users else dataset.num_users)
    train, test = dataset.interactions("train"), dataset.interactions("test")
    scores = vectors["user"][users] @ vectors["item"].T
    for k in (5, 10, 20):
        recall, ndcg, count = reference(scores, [train.row(u) for u in users], [test.row(u) for u in users], k)
        for result in (one[case]["test"], two[case]["test"]):
            assert result["users"] == count > 0
            assert result[f"recall@{k}"] == pytest.approx(recall / count, abs=1e-9)
            assert result[f"ndcg@{k}"] == pytest.approx(ndcg / count, abs=1e-9)
    for result in (one, two):
        assert "the sample of users holds none with test interactions" in result["empty sample"]
    for world_size in (1, 2):
        export = out / case / f"world{world_size}" / "export"
        for kind in ("user", "item"):
            np.testing.assert_allclose(np.load(export / f"{kind}_vectors.npy"), vectors[kind], rtol=1e-5, atol=1e-6)
            assert (export / f"{kind}_ids.parquet").exists()
