"""A refit without validation (eval.validate=false): a dataset prepared without a validation split
trains exactly train.epochs epochs and tests the final model; with validation on, it is refused."""

import json
import subprocess
import sys

from spark_jobs.prepare import prepare
from tests.conftest import REPO
from tests.prepare_helpers import small_config
from tests.synthetic import interaction_rows, write_csv_source

SETTINGS = ["device=cpu", "model.dim=8", "loader.batch_size=64", "loader.num_workers=0", "train.progress_bar=false", "output.plot=false"]


def _train(dataset, run_dir, *overrides):
    command = [sys.executable, "launch/train.py", "configs/train/default.yaml", f"data.path={dataset}", f"run_dir={run_dir}", *SETTINGS, *overrides]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)


def test_refit_on_all_of_train_tests_the_final_model(spark, tmp_path):
    source = write_csv_source(tmp_path / "raw", interaction_rows(num_users=40), item_text=False)
    root = prepare(small_config(tmp_path / "ds", source, **{"split.ratios": "[4,0,1]"}), spark=spark)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["splits"]["val"] == 0 and manifest["splits"]["test"] > 0

    refused = _train(root, tmp_path / "refused")
    assert refused.returncode == 2 and "eval.validate=false" in refused.stderr, refused.stderr[-2000:]

    # (on a sample of the users: results.md printed its figures as if they covered every user)
    done = _train(root, tmp_path / "refit", "eval.validate=false", "train.epochs=3", "eval.max_users=30")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "refit" / "results.json").read_text())
    assert results["best_epoch"] == 2 and results["epochs_run"] == 3 and results["val"] == {}
    assert set(results["test"]) >= {f"{m}@{k}" for m in ("recall", "ndcg") for k in (5, 10, 20)}
    assert 0.0 < results["test"]["recall@20"] <= 1.0
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "refit" / "metrics.jsonl").read_text().splitlines()]
    assert kinds == ["train"] * 3
    assert results["sampled_users"] == 30 and results["test"]["users"] <= 30
    table = (tmp_path / "refit" / "results.md").read_text()
    assert "final epoch (no validation) 2" in table and "test over a seeded sample of 30 users (eval.max_users)" in table
