"""DeepSpeed's ZeRO stages change where the dense optimizer state lives, not what is trained: DaRec's losses
per epoch and its test metrics are the same at stages 0, 1 and 2 (its centres are set in place by k-means on
the first batch, which stages 1 and 2, stepping a separate fp32 master copy, used to overwrite). Two processes,
so that stages 1 and 2 really partition the optimizer state over ranks (their checkpoints hold one shard per rank)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

SETTINGS = [
    "device=cpu", "model.dim=8", "loader.batch_size=64", "loader.num_workers=0", "train.progress_bar=false", "output.plot=false",
    "train.epochs=2", "train.max_steps_per_epoch=4", "align.method=darec", "align.darec.structure_weight=1.0",
]


def _epoch_losses(dataset, run_dir, stage):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "launch/train.py", "configs/train/default.yaml", f"data.path={dataset}", f"run_dir={run_dir}",
               *SETTINGS, f"dense.deepspeed_config=configs/deepspeed/zero{stage}.json"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["losses"] for r in lines if r["kind"] == "train"], json.loads((run_dir / "results.json").read_text())["test"]


def test_darec_trains_the_same_at_every_zero_stage(small_dataset, tmp_path):
    root, _ = small_dataset
    reference, reference_test = _epoch_losses(root, tmp_path / "zero0", 0)
    assert reference[0]["darec_local"] > 0
    for stage in (1, 2):
        losses, test = _epoch_losses(root, tmp_path / f"zero{stage}", stage)
        for epoch, (got, want) in enumerate(zip(losses, reference, strict=True)):
            for name, value in want.items():
                assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-7), (stage, epoch, name)
        assert test == pytest.approx(reference_test, abs=1e-6), stage
        shards = sorted(f.name for f in (tmp_path / f"zero{stage}" / "checkpoints" / "best" / "dense").rglob("*optim_states.pt"))
        assert len(shards) == 2 and all(name.startswith("zero_pp_rank_") for name in shards), (stage, shards)
