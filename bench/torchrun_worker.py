"""Run a benchmark's own `--worker` mode under torchrun and read back the JSON its rank 0 wrote."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.cli import at_least

REPO = Path(__file__).resolve().parent.parent


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of this protocol: `--nproc` for the caller, and the hidden `--worker` and `--result`
    that `run_worker` passes to the script it starts."""
    parser.add_argument("--nproc", type=at_least(1), default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)


def slowest_rank_seconds(started: float, device) -> float:
    """Once every rank has finished, the seconds since `started` (a time.perf_counter()) of the slowest rank,
    on every rank: a collective step is only as fast as its slowest rank."""
    import torch
    import torch.distributed as dist

    dist.barrier()
    elapsed = torch.tensor(time.perf_counter() - started, device=device)  # NCCL carries CUDA tensors only
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def run_worker(script: str, nproc: int, worker_args: list[str], what: str) -> dict:
    """`torchrun --nproc_per_node=nproc script --worker *worker_args --result FILE`; the JSON in FILE.

    Exits naming `what` with the tail of each worker's own error output if they fail (torchrun writes each
    worker's output to its own file: on the console, torchrun's report of the failure buried the workers' message)."""
    with tempfile.TemporaryDirectory() as folder:
        result, logs = Path(folder) / "result.json", Path(folder) / "logs"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "--log-dir", str(logs),
                   "--redirects", "3", script, "--worker", *worker_args, "--result", str(result)]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            errors = [f"[local rank {log.parent.name}] ...{log.read_text()[-1000:]}" for log in sorted(logs.glob("*/attempt_*/*/stderr.log"))]
            raise SystemExit(f"{what}: failed\n" + ("\n".join(errors) if errors else f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"))
        return json.loads(result.read_text())
