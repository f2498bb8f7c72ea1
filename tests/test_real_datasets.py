"""Prepare on the real datasets: MovieLens-100K (from the recbole wheel) and RLMRec's Amazon-book.

The encoder here is the id-hash stand-in and the graph is one hop so that the test
checks reading, counting and splitting quickly; the full runs (MiniLM, 3 layers) are
the benchmark's job (bench/prepare_bench.py, figures in docs/prepare.md).
"""

import json

import pytest

from darec_dist.config import load_config
from spark_jobs.config import PrepareConfig
from spark_jobs.prepare import prepare
from tests.conftest import REPO, SHARED_DATA

FAST = ["embedding.encoder=id-hash", "embedding.dim=8", "graph.layers=1", "graph.top_k=8", "spark.shuffle_partitions=4"]


def test_movielens_100k_counts(spark, tmp_path):
    cfg = load_config(PrepareConfig, REPO / "configs/data/ml-100k.yaml", FAST + [f"output={tmp_path / 'ml'}"])
    manifest = json.loads((prepare(cfg, spark=spark) / "manifest.json").read_text())
    assert (manifest["num_users"], manifest["num_items"]) == (943, 1682)
    assert sum(manifest["splits"].values()) == 100_000
    assert manifest["splits"]["train"] > 3 * manifest["splits"]["test"] - 943


@pytest.mark.skipif(not (SHARED_DATA / "amazon-book-rlmrec").is_dir(), reason="shared Amazon-book data not present on this machine")
def test_amazon_book_counts(spark, tmp_path):
    cfg = load_config(
        PrepareConfig,
        REPO / "configs/data/amazon-book.yaml",
        FAST + [f"output={tmp_path / 'ab'}", f"source.path={SHARED_DATA / 'amazon-book-rlmrec'}"],
    )
    manifest = json.loads((prepare(cfg, spark=spark) / "manifest.json").read_text())
    assert (manifest["num_users"], manifest["num_items"]) == (11_000, 9_332)
    assert manifest["splits"] == {"train": 120_464, "val": 40_290, "test": 40_106}
    assert manifest["users_with_interactions"]["test"] == 9_860
