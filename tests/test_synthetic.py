"""The synthetic source: power-law degrees, community structure in interactions and in the LLM-side vectors."""

import json

import numpy as np
import pandas as pd

from spark_jobs.prepare import prepare
from tests.prepare_helpers import small_config

COMMUNITIES = 4


def test_synthetic_dataset_has_industrial_shape(spark, tmp_path, capsys):
    source = {
        "source.format": "synthetic",
        "source.synthetic.users": 400,
        "source.synthetic.items": 300,
        "source.synthetic.interactions": 6000,
        "source.synthetic.communities": COMMUNITIES,
        "source.synthetic.embedding_dim": 16,
        "source.synthetic.partitions": 4,
        "source.synthetic.community_affinity": 0.8,
        "embedding.encoder": "source",
    }
    root = prepare(small_config(tmp_path / "syn", source), spark=spark)
    manifest = json.loads((root / "manifest.json").read_text())
    # A rerun draws the same data (the generator shuffles, so this is not automatic).
    again = json.loads((prepare(small_config(tmp_path / "again", source), spark=spark) / "manifest.json").read_text())
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]
    total = sum(manifest["splits"].values())
    # What was asked for is what the dataset holds: every user and item active; pairs are lost only where a
    # catalogue-wide draw repeats an item of the user's own community (a quarter of the catalogue here).
    assert 0.95 * 6000 <= total <= 6000 and manifest["embedding"]["dim"] == 16
    # small_config's embedding.dim=8 is the id-hash encoder's: the source's own 16 wins, and the log says so.
    assert "warning: embedding.dim=8 applies to the id-hash encoder only; embedding.encoder=source" in capsys.readouterr().out
    users = pd.read_parquet(root / "ids/user.parquet").sort_values("id")["raw"].astype(int).to_numpy()
    items = pd.read_parquet(root / "ids/item.parquet").sort_values("id")["raw"].astype(int).to_numpy()
    assert len(users) == 400 and len(items) == 300
    indptr, cols = np.load(root / "interactions/train_indptr.npy"), np.load(root / "interactions/train_items.npy")
    degrees = np.diff(indptr)
    assert degrees.max() > 5 * np.median(degrees)  # power-law activity: a head of heavy users
    popularity = np.bincount(cols, minlength=len(items))
    assert popularity.max() > 5 * max(1, np.median(popularity))
    # Most interactions stay inside the user's community (raw id modulo the community count).
    same = (users[np.repeat(np.arange(len(degrees)), degrees)] % COMMUNITIES) == (items[cols] % COMMUNITIES)
    assert same.mean() > 0.7
    # LLM-side vectors: closer within a community than across.
    vectors = np.load(root / "embeddings/user.npy")
    groups = users % COMMUNITIES
    cos = vectors @ vectors.T
    within = cos[groups[:, None] == groups[None, :]].mean()
    across = cos[groups[:, None] != groups[None, :]].mean()
    assert within > across + 0.2
