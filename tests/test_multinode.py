"""Multi-node: two torchrun launchers meeting through c10d rendezvous (--nnodes=2, one process each)
train exactly as one launcher with two processes, so data, tables and collectives are split by
global rank, not by node-local rank."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from darec_dist.distributed.env import free_port
from darec_dist.train import checkpoint
from tests.conftest import REPO
from tests.train_helpers import finish

SETTINGS = [
    "device=cpu", "model.dim=8", "loader.batch_size=64", "loader.num_workers=1", "train.epochs=3",
    "train.progress_bar=false", "output.plot=false", "align.method=darec", "align.darec.sample_size=64",
]


def _launch(launcher_flags, dataset, run_dir, *extra):
    command = [
        sys.executable, "-m", "torch.distributed.run", *launcher_flags,
        "launch/train.py", "configs/train/default.yaml", f"data.path={dataset}", f"run_dir={run_dir}", *SETTINGS, *extra,
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


def test_a_rank_killed_on_one_node_is_restarted_on_both(small_dataset, tmp_path):
    """torchrun --max-restarts across nodes: the node of the rank killed restarts its worker (its restart count goes up),
    rank 0's node restarts its own for the membership change (its count does not). Both ranks must still meet in one new
    process group: they hung when each named the attempt by its own node's count."""
    root, _ = small_dataset
    finish(_launch(["--standalone", "--nproc_per_node=2"], root, tmp_path / "reference", "train.epochs=4"))
    rendezvous = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
                  "--rdzv-id=multinode-restart", "--max-restarts=1", "--monitor-interval=0.5"]
    run_dir = tmp_path / "two-nodes"
    extra = ("train.epochs=4", "checkpoint.every_steps=2", "--resume", "auto")
    nodes = [_launch(rendezvous, root, run_dir, *extra) for _ in range(2)]
    deadline = time.time() + 300
    while checkpoint.latest(run_dir) is None:
        assert all(node.poll() is None for node in nodes) and time.time() < deadline, "ended before its first checkpoint"
        time.sleep(0.05)
    workers = [p for node in nodes for p in psutil.Process(node.pid).children() if "launch/train.py" in " ".join(p.cmdline())]
    os.kill(next(p for p in workers if p.environ()["RANK"] == "1").pid, signal.SIGKILL)  # its node's count goes up, rank 0's not
    outputs = [finish(node) for node in nodes]
    assert any("resumed from" in out for out in outputs), outputs[0][-3000:]
    reference = json.loads((tmp_path / "reference" / "results.json").read_text())
    recovered = json.loads((run_dir / "results.json").read_text())
    assert recovered["best_epoch"] == reference["best_epoch"]
    for split in ("val", "test"):
        for metric, value in reference[split].items():
            assert recovered[split][metric] == pytest.approx(value, abs=1e-6), (split, metric)


def _fail_with_a_collective_in_flight(rank: int, port: int, out_dir) -> None:
    """Rank 0 starts an all-reduce rank 1 never joins, then fails; rank 1 stays up until rank 0 is out."""
    import torch
    import torch.distributed as dist

    from darec_dist.distributed import env

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2",
                       "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"})
    env.TEARDOWN_AFTER_ERROR_S = 3.0
    done = out_dir / "rank0-out"
    if rank == 1:
        with env.distributed("cpu"):
            deadline = time.time() + 120
            while not done.exists() and time.time() < deadline:
                time.sleep(0.1)
            os._exit(0)  # (no barrier: rank 0 is gone)
    started = time.time()
    try:
        with env.distributed("cpu"):
            dist.all_reduce(torch.ones(4), async_op=True)
            started = time.time()
            raise RuntimeError("a failure with a collective in flight")
    except RuntimeError:
        done.write_text(str(time.time() - started))
    os._exit(0)


def test_a_failing_rank_exits_without_waiting_for_a_collective_in_flight(tmp_path):
    """Its group's teardown waited for the collective until the 30-minute timeout, so torchrun could not stop the job."""
    import torch.multiprocessing as mp

    mp.start_processes(_fail_with_a_collective_in_flight, args=(free_port(), tmp_path), nprocs=2, join=True,
                       start_method="spawn")
    assert float((tmp_path / "rank0-out").read_text()) < 15
