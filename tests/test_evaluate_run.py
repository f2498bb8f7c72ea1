"""launch/evaluate.py: a checkpoint trained by 2 processes, evaluated by 1 and by 2, gives the run's own test metrics.

DaRec ranks by [c_sp, c_sh] here, so the metrics depend on the dense projections (DeepSpeed, ZeRO
stage 1, whose optimizer state is partitioned by world size) as well as on the resharded tables.
"""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.train_helpers import finish

TRAIN = [
    "device=cpu", "model.dim=8", "loader.batch_size=64", "loader.num_workers=1", "train.epochs=3", "train.progress_bar=false",
    "output.plot=false", "align.method=darec", "align.darec.scoring=concat", "dense.deepspeed_config=configs/deepspeed/zero1.json",
]


def launch(nproc: int, *args: str) -> subprocess.Popen:
    runner = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    return subprocess.Popen([*runner, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_checkpoint_evaluates_to_the_runs_metrics_at_any_world_size(small_dataset, tmp_path):
    root, _ = small_dataset
    run_dir = tmp_path / "run"
    finish(launch(2, "launch/train.py", "configs/train/default.yaml", f"data.path={root}", f"run_dir={run_dir}", *TRAIN))
    trained = json.loads((run_dir / "results.json").read_text())

    for nproc in (1, 2):
        out = finish(launch(nproc, "launch/evaluate.py", str(run_dir), "--split", "val,test"))
        assert "| test |" in out, out[-2000:]
        evaluated = json.loads((run_dir / "eval-best.json").read_text())
        assert evaluated["world_size"] == nproc and evaluated["epochs_trained"] == trained["best_epoch"] + 1
        for split in ("val", "test"):
            for metric, value in trained[split].items():
                assert evaluated[split][metric] == pytest.approx(value, abs=1e-6), (nproc, split, metric)


def test_evaluate_refuses_a_directory_that_is_not_a_run(tmp_path):
    process = launch(1, "launch/evaluate.py", str(tmp_path))
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 2 and "no config.yaml" in out and str(tmp_path) in out, out[-2000:]
    (tmp_path / "config.yaml").write_text("seed: 1\n")
    process = launch(1, "launch/evaluate.py", str(tmp_path), "--checkpoint", "latest")
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 2 and "no complete step checkpoint" in out, out[-2000:]
