"""Multi-node: two torchrun launchers meeting through c10d rendezvous (--nnodes=2, one process each)
train exactly as one launcher with two processes, so data, tables and collectives are split by
global rank, not by node-local rank."""

import json
import subprocess
import sys

import pytest

from darec_dist.distributed.env import free_port
from tests.conftest import REPO
from tests.train_helpers import finish

SETTINGS = [
    "device=cpu", "model.dim=8", "loader.batch_size=64", "loader.num_workers=1", "train.epochs=3",
    "train.progress_bar=false", "output.plot=false", "align.method=darec", "align.darec.sample_size=64",
]


def _launch(launcher_flags, dataset, run_dir):
    command = [
        sys.executable, "-m", "torch.distributed.run", *launcher_flags,
        "launch/train.py", "configs/train/default.yaml", f"data.path={dataset}", f"run_dir={run_dir}", *SETTINGS,
    ]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_two_nodes_train_like_one_node_with_two_processes(small_dataset, tmp_path):
    root, _ = small_dataset
    finish(_launch(["--standalone", "--nproc_per_node=2"], root, tmp_path / "one-node"))

    rendezvous = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                  f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=multinode-test"]
    # Both "nodes" share this filesystem, as nodes of a cluster share the run directory.
    nodes = [_launch(rendezvous, root, tmp_path / "two-nodes") for _ in range(2)]
    for node in nodes:
        finish(node)

    one = json.loads((tmp_path / "one-node" / "results.json").read_text())
    two = json.loads((tmp_path / "two-nodes" / "results.json").read_text())
    assert two["best_epoch"] == one["best_epoch"]
    for split in ("val", "test"):
        for metric, value in one[split].items():
            assert two[split][metric] == pytest.approx(value, abs=1e-6), (split, metric)
    records = [list(map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())) for run in ("one-node", "two-nodes")]
    # One entry per global rank: the two launchers formed one world of two, not two worlds of one.
    assert len(next(r for r in records[1] if r["kind"] == "train")["memory_mib"]["tables"]) == 2
    losses = [[record["loss"] for record in run if record["kind"] == "train"] for run in records]
    assert len(losses[0]) == 3
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
