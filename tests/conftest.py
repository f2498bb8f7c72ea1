"""Shared fixtures: one real local Spark session for all Spark tests (start-up costs ~8 s)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")


@pytest.fixture(scope="session")
def spark():
    from spark_jobs.config import SparkConfig
    from spark_jobs.session import start_session

    session = start_session(SparkConfig(master="local[2]", driver_memory="2g", shuffle_partitions=4, app_name="darec-tests"))
    yield session
    session.stop()


SMALL_DATASET_SETTINGS = {"shards.factor": 4, "shards.interactions_per_shard": 50}


@pytest.fixture(scope="session")
def small_dataset(spark, tmp_path_factory):
    """A prepared csv dataset (60 users, id-hash embeddings, 8+ shards) shared by tests that only read it."""
    from spark_jobs.prepare import prepare
    from tests.prepare_helpers import small_config
    from tests.synthetic import interaction_rows, write_csv_source

    base = tmp_path_factory.mktemp("small")
    source = write_csv_source(base / "raw", interaction_rows(num_users=60), item_text=False)
    return prepare(small_config(base / "ds", source, **SMALL_DATASET_SETTINGS), spark=spark), source


@pytest.fixture
def dataset_copy(small_dataset, tmp_path):
    """A copy of the small dataset that a test may damage."""
    root, _ = small_dataset
    copy = tmp_path / "ds"
    shutil.copytree(root, copy)
    return copy


@pytest.fixture(scope="session")
def exact_dataset(spark, tmp_path_factory):
    """A prepared csv dataset with exact 3-layer propagation rows (no top-K)."""
    from spark_jobs.prepare import prepare
    from tests.prepare_helpers import small_config
    from tests.synthetic import interaction_rows, write_csv_source

    base = tmp_path_factory.mktemp("exact")
    source = write_csv_source(base / "raw", interaction_rows(num_users=30, num_items=25, per_user=6, seed=3), item_text=False)
    settings = {"graph.layers": 3, "graph.top_k": "null", "shards.factor": 2, "embedding.dim": 16}
    return prepare(small_config(base / "ds", source, **settings), spark=spark)


@pytest.fixture(scope="session")
def exact_gccf_dataset(spark, tmp_path_factory):
    """The exact_dataset's interactions with GCCF's rows: exact per-layer powers of the self-loop graph."""
    from spark_jobs.prepare import prepare
    from tests.prepare_helpers import small_config
    from tests.synthetic import interaction_rows, write_csv_source

    base = tmp_path_factory.mktemp("exact-gccf")
    source = write_csv_source(base / "raw", interaction_rows(num_users=30, num_items=25, per_user=6, seed=3), item_text=False)
    settings = {"graph.layers": 3, "graph.top_k": "null", "graph.self_loops": "true", "graph.per_layer": "true",
                "shards.factor": 2, "embedding.dim": 16}
    return prepare(small_config(base / "ds", source, **settings), spark=spark)
