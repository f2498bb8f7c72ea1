"""Per-rank memory at stages of a run, beside the rank's share of the sharded tables.

Private memory is resident memory that is not file-backed or shared (RSS minus shared pages):
the memory-mapped graph rows and embeddings are page cache the kernel can drop, and do not
count. The peak RSS so far (which does count them) shows in which stage a transient peak fell.
"""

from __future__ import annotations

import resource

import psutil
import torch.distributed as dist

MIB = 2**20


def stage() -> dict[str, float]:
    """This process's private memory now and its peak RSS so far, in MiB."""
    info = psutil.Process().memory_info()
    return {"private": (info.rss - info.shared) / MIB, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def per_rank(value):
    """`value` of every rank, in rank order (a collective: every rank calls it)."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values
