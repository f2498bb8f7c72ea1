"""launch/evaluate.py: a checkpoint trained by 2 processes, evaluated by 1 and by 2, gives the run's own test metrics;
launch/recommend.py: the exported vectors' top-K lists give them too.

DaRec ranks by [c_sp, c_sh] here, so the metrics depend on the dense projections (DeepSpeed, ZeRO
stage 1, whose optimizer state is partitioned by world size) as well as on the resharded tables.
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from darec_dist.config import ConfigError
from darec_dist.data.dataset import DatasetError, PreparedDataset
from darec_dist.train import checkpoint
from darec_dist.train.metrics import ranking_sums
from launch.evaluate import still_in_place
from launch.recommend import recommend
from tests.conftest import REPO
from tests.train_helpers import finish

TRAIN = [
    "device=cpu", "model.dim=8", "loader.batch_size=64", "loader.num_workers=1", "train.epochs=3", "train.progress_bar=false",
    "output.plot=false", "align.method=darec", "align.darec.scoring=concat", "dense.deepspeed_config=configs/deepspeed/zero1.json",
]


def launch(nproc: int, *args: str) -> subprocess.Popen:
    runner = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.Popen([*runner, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_checkpoint_and_export_reproduce_the_runs_metrics(small_dataset, exact_dataset, tmp_path):
    root, _ = small_dataset
    run_dir = tmp_path / "run"
    finish(launch(2, "launch/train.py", "configs/train/default.yaml", f"data.path={root}", f"run_dir={run_dir}", *TRAIN))
    trained = json.loads((run_dir / "results.json").read_text())
    assert {"user_id", "item_id", "user_llm", "item_llm"} <= set(trained["sharding_plan"])  # the LLM tables' plan too

    # 3: a world size that the training batch (64) does not suit. Row- and column-wise: plans that training under
    # CPU Adam refuses (its optimizer state cannot be checkpointed per shard), which ranking needs none of.
    for nproc, sharding in ((1, "auto"), (2, "auto"), (3, "auto"), (2, "row_wise"), (2, "column_wise")):
        out = finish(launch(nproc, "launch/evaluate.py", str(run_dir), "--split", "val,test", f"sparse.sharding={sharding}"))
        assert "| test |" in out, out[-2000:]
        evaluated = json.loads((run_dir / "eval-best.json").read_text())
        assert evaluated["world_size"] == nproc and evaluated["epochs_trained"] == trained["best_epoch"] + 1
        for split in ("val", "test"):
            for metric, value in trained[split].items():
                assert evaluated[split][metric] == pytest.approx(value, abs=1e-6), (nproc, sharding, split, metric)

    # Evaluating a running run's best model: no eval-best.json when the run replaced that model meanwhile.
    best = run_dir / "checkpoints" / "best"
    loaded = checkpoint.loop_state(best)
    assert still_in_place(best, loaded)
    assert not still_in_place(best, {**loaded, "global_step": loaded["global_step"] - 1})
    assert not still_in_place(tmp_path / "between-the-renames", loaded)

    # The lists a user would serve from the export: every user's top 20, original ids.
    table = recommend(run_dir, None, k=20)
    ids = {kind: pd.read_parquet(run_dir / "export" / f"{kind}_ids.parquet").set_index("raw")["id"] for kind in ("user", "item")}
    dataset = PreparedDataset.open(root)
    assert table["user"].nunique() == dataset.num_users and (table.groupby("user")["rank"].max() == 20).all()
    top = np.full((dataset.num_users, 20), -1, dtype=np.int64)
    top[ids["user"][table["user"]].to_numpy(), table["rank"].to_numpy() - 1] = ids["item"][table["item"]].to_numpy()
    train = dataset.interactions("train")
    assert not any(np.isin(top[u], train.row(u)).any() for u in range(dataset.num_users))  # seen items left out
    sums = ranking_sums(top, np.arange(dataset.num_users), dataset.interactions("test"), [20])
    for metric in ("recall@20", "ndcg@20"):
        assert sums[metric] / sums["users"] == pytest.approx(trained["test"][metric], abs=1e-6), metric

    # Recommendations filtered by another dataset's train items are refused, naming the mismatch.
    with pytest.raises(DatasetError, match="user ids are not those of"):
        recommend(run_dir, None, k=5, data=str(exact_dataset))
    # A moved copy serves; one re-prepared with another split (the same ids) would leave other items out.
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    assert recommend(run_dir, None, k=5, data=str(moved)).equals(recommend(run_dir, None, k=5))
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = "0" * 64  # as if re-prepared: the checksums differ
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="the same ids, but not the dataset the run trained on"):
        recommend(run_dir, None, k=5, data=str(moved))
    record = run_dir / "export" / "dataset.json"
    record.write_text("{")
    with pytest.raises(ConfigError, match="dataset.json: expected JSON with the dataset's fingerprint"):
        recommend(run_dir, None, k=5)
    record.unlink()
    with pytest.raises(ConfigError, match="dataset.json: missing, so the dataset whose train items to leave out is unknown"):
        recommend(run_dir, None, k=5)
    assert len(recommend(run_dir, None, k=5, keep_seen=True)) == dataset.num_users * 5
    refused = subprocess.run([sys.executable, "launch/recommend.py", str(run_dir), "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "is a directory" in refused.stderr and "Traceback" not in refused.stderr

    # The t-SNE picture reads the best weights of this 2-process ZeRO-1 run from one process.
    picture = tmp_path / "tsne.png"
    out = finish(launch(1, "launch/tsne.py", str(run_dir), "--nodes", "40", "--out", str(picture)))
    assert picture.stat().st_size > 0 and "c_sh: mean pairwise cosine" in out, out[-2000:]


def test_evaluate_refuses_a_directory_that_is_not_a_run(tmp_path):
    process = launch(1, "launch/evaluate.py", str(tmp_path))
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 2 and "no config.yaml" in out and str(tmp_path) in out, out[-2000:]
    (tmp_path / "config.yaml").write_text("seed: 1\n")
    process = launch(1, "launch/evaluate.py", str(tmp_path), "model.dim=16")
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 2 and "['model.dim=16']: these keys shape the model" in out, out[-2000:]
    process = launch(1, "launch/evaluate.py", str(tmp_path), "--checkpoint", "latest")
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 2 and "no complete step checkpoint" in out, out[-2000:]


def test_a_checkpoint_is_evaluated_with_its_own_run(tmp_path):
    """Its scores are written into the run (eval-<name>.json) as that run's."""
    from darec_dist.train import checkpoint
    from launch.evaluate import checkpoint_path

    for run in ("a", "b"):
        for name in (checkpoint.BEST, checkpoint.step_name(3)):
            path = tmp_path / run / checkpoint.CHECKPOINTS / name
            path.mkdir(parents=True)
            (path / checkpoint.STATE).write_text("{}")
            (path / checkpoint.FILES).write_text("{}")
            (path / checkpoint.COMPLETE).write_text("")
    own = tmp_path / "a" / checkpoint.CHECKPOINTS
    assert checkpoint_path(tmp_path / "a", "best") == own / checkpoint.BEST
    assert checkpoint_path(tmp_path / "a", checkpoint.step_name(3)) == own / checkpoint.step_name(3)  # by name
    assert checkpoint_path(tmp_path / "a", str(own / checkpoint.step_name(3))) == own / checkpoint.step_name(3)
    other = tmp_path / "b" / checkpoint.CHECKPOINTS / checkpoint.BEST
    with pytest.raises(ConfigError, match=f"{other}: not a checkpoint of {tmp_path / 'a'}; evaluate it with the run it belongs to"):
        checkpoint_path(tmp_path / "a", str(other))


def test_a_new_best_model_drops_the_evaluation_of_the_one_it_replaces(tmp_path, monkeypatch):
    """launch/evaluate.py's eval-best.json of a running run described a best model the run had since replaced."""
    import torch

    import launch.train
    from darec_dist.distributed.env import DistEnv

    saved = []
    monkeypatch.setattr(launch.train.checkpoint, "save", lambda trainer, run_dir, name, state: saved.append(name))
    (tmp_path / "eval-best.json").write_text("{}")
    launch.train.save_best(None, tmp_path, {}, DistEnv(rank=1, world_size=2, device=torch.device("cpu")))
    assert saved == ["best"] and (tmp_path / "eval-best.json").exists()  # rank 0's to remove
    launch.train.save_best(None, tmp_path, {}, DistEnv(rank=0, world_size=2, device=torch.device("cpu")))
    assert not (tmp_path / "eval-best.json").exists()
