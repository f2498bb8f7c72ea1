"""Build trainers on small datasets inside test processes."""

from __future__ import annotations

import os
import subprocess

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np

from darec_dist.config import load_config
from darec_dist.train.config import TrainConfig


def train_config(dataset_root, run_dir, *overrides: str) -> TrainConfig:
    base = [
        f"data.path={dataset_root}",
        f"run_dir={run_dir}",
        "device=cpu",
        "model.dim=8",
        "loader.num_workers=0",
        "train.progress_bar=false",
        "output.plot=false",
    ]
    return load_config(TrainConfig, None, base + list(overrides))


def global_batch(num_users: int, num_items: int, size: int, negatives: int = 1, seed: int = 0):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, num_users, size).astype(np.int64)
    pos = rng.integers(0, num_items, size).astype(np.int64)
    neg = rng.integers(0, num_items, size * negatives).astype(np.int64)
    return users, pos, neg


def local_part(users, pos, neg, rank: int, world_size: int):
    """Rank r's contiguous slice of the global batch (negatives are user-major, so slice them alike)."""
    b = len(users) // world_size
    per_user = len(neg) // len(users)
    lo, hi = rank * b, (rank + 1) * b
    return users[lo:hi], pos[lo:hi], neg[lo * per_user : hi * per_user]


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    """Wait for a launched run; its output, after asserting that it succeeded."""
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-4000:]
    return out
