"""The experiment runner: variants x seeds under torchrun, a resumable grid, and the summary table."""

import dataclasses
import json

import pytest

from darec_dist.config import ConfigError
from launch.experiment import ExperimentConfig, run_experiment


def test_grid_runs_tabulates_and_skips_finished_runs(small_dataset, tmp_path):
    root, _ = small_dataset
    cfg = ExperimentConfig(
        name="tiny",
        train_config="configs/train/default.yaml",
        overrides=[f"data.path={root}", "device=cpu", "model.dim=8", "loader.batch_size=64", "train.epochs=2", "output.plot=false", "model.backbone=mf"],
        variants={"base": ["align.method=none"], "rlmrec-con": ["align.method=rlmrec-con"]},
        seeds=[1, 2],
        nproc=1,
        out_dir=str(tmp_path / "exp"),
    )
    summary = run_experiment(cfg)
    assert set(summary) == {"base", "rlmrec-con"} and summary["base"]["seeds"] == 2
    table = (tmp_path / "exp" / "table.md").read_text()
    assert "| base |" in table and "Relative gain over base" in table
    assert "id-hash" in table  # the embedding model is named next to the numbers
    first = json.loads((tmp_path / "exp" / "base" / "seed-1" / "results.json").read_text())
    assert first["align"] == "none" and first["test"]["recall@20"] >= 0
    stamp = (tmp_path / "exp" / "base" / "seed-1" / "results.json").stat().st_mtime
    run_experiment(cfg)  # everything is done: nothing is trained again
    assert (tmp_path / "exp" / "base" / "seed-1" / "results.json").stat().st_mtime == stamp
    # An edited experiment does not pass off the old runs as its own.
    edited = dataclasses.replace(cfg, overrides=[*cfg.overrides, "train.epochs=3"])
    with pytest.raises(ConfigError, match=r"base/seed-1: finished with other settings \(ran -> asked now\): train.epochs: 2 -> 3"):
        run_experiment(edited)
