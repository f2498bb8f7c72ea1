"""Start real worker processes with a gloo process group (torch.multiprocessing, world size 1 or 2)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from darec_dist.distributed.env import DistEnv, exit_without_finalisation, free_port


def full_table(tables, table: str, num_rows: int, dim: int) -> torch.Tensor:
    """The whole of a sharded table (a ShardedTables') on every rank, summed from each rank's shards."""
    out = torch.zeros(num_rows, dim)
    for r0, c0, tensor in tables.local_shards(table):
        out[r0 : r0 + tensor.shape[0], c0 : c0 + tensor.shape[1]] = tensor.detach()
    if dist.is_initialized() and tables.plan[table][0] != "data_parallel":
        dist.all_reduce(out)
    return out


def cpu_env(rank: int, world_size: int) -> DistEnv:
    """The DistEnv `distributed()` would give a CPU worker started by run_distributed (its group is already up)."""
    return DistEnv(rank=rank, world_size=world_size, device=torch.device("cpu"))


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)})
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    # fn has finished and written its results (see exit_without_finalisation).
    exit_without_finalisation(0)


def run_distributed(fn, world_size: int, *args) -> None:
    """Run fn(rank, world_size, *args) in `world_size` fresh processes; raises if any of them fails."""
    mp.start_processes(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True, start_method="spawn")


def _save_rank0(rank: int, world_size: int, path: Path, fn, args) -> None:
    result = fn(rank, world_size, *args)
    if rank == 0:
        path.write_bytes(pickle.dumps(result))


def results_per_world_size(fn, out_dir: Path, *args, world_sizes=(1, 2)) -> list:
    """Run fn(rank, world_size, *args) at each world size in fresh processes; rank 0's return values, in order."""
    results = []
    for world_size in world_sizes:
        path = out_dir / f"world{world_size}.pkl"
        run_distributed(_save_rank0, world_size, path, fn, args)
        results.append(pickle.loads(path.read_bytes()))
    return results
