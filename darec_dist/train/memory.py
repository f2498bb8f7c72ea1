"""Per-rank memory at stages of a run, beside the rank's share of the sharded tables.

Private memory is the unique set size (pages no other process maps): memory-mapped graph rows
and embeddings are shared page cache and do not count, so what remains above the tables' share
is what a rank itself allocates.
"""

from __future__ import annotations

import psutil
import torch.distributed as dist

MIB = 2**20


def private_mib() -> float:
    return psutil.Process().memory_full_info().uss / MIB


def per_rank(value: float) -> list[float]:
    """`value` of every rank, in rank order (a collective: every rank calls it)."""
    if not dist.is_initialized():
        return [value]
    values: list[float] = [0.0] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values
