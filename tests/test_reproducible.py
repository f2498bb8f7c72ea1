"""A rerun with the same inputs and seed gives the same outputs, also on one process with several threads."""

import json
import subprocess
import sys


from tests.conftest import REPO


def _run(dataset, run_dir) -> tuple[list[dict], dict]:
    overrides = [
        f"data.path={dataset}", f"run_dir={run_dir}", "device=cpu", "align.method=darec", "model.backbone=lightgcn",
        # Wide rows and many repeated nodes per batch: the gathers' backward then has enough work for threads.
        "model.dim=512", "loader.batch_size=128", "loader.num_workers=0", "train.epochs=2",
        "train.progress_bar=false", "output.plot=false",
    ]
    # A plain python process (torchrun would pin one thread per process): torch uses every core.
    done = subprocess.run([sys.executable, "launch/train.py", "configs/train/default.yaml", *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: m[k] for k in ("kind", "epoch", "losses", "metrics") if k in m} for m in metrics], json.loads((run_dir / "results.json").read_text())


def test_a_one_process_rerun_with_the_same_seed_gives_the_same_losses_and_metrics(small_dataset, tmp_path):
    root, _ = small_dataset
    first_metrics, first = _run(root, tmp_path / "first")
    second_metrics, second = _run(root, tmp_path / "second")
    assert first_metrics == second_metrics
    assert first["test"] == second["test"] and first["val"] == second["val"]
