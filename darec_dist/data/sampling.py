"""Vectorised helpers over CSR arrays: membership tests, negative sampling, row gathering."""

from __future__ import annotations

import numpy as np

from darec_dist.data.dataset import CSR


def contains(csr: CSR, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """values[k] in row rows[k], for sorted CSR rows, by a vectorised binary search."""
    lo = np.asarray(csr.indptr[rows], dtype=np.int64)
    end = np.asarray(csr.indptr[rows + 1], dtype=np.int64)
    hi = end.copy()
    active = lo < hi
    while active.any():
        mid = (lo + hi) // 2
        less = np.zeros_like(active)
        less[active] = csr.indices[mid[active]] < values[active]
        lo = np.where(active & less, mid + 1, lo)
        hi = np.where(active & ~less, mid, hi)
        active = lo < hi
    found = lo < end
    found[found] = csr.indices[lo[found]] == values[found]
    return found


def sample_negatives(
    rng: np.random.Generator, users: np.ndarray, num_items: int, count: int, train: CSR | None, max_rounds: int = 20
) -> np.ndarray:
    """count uniform items per user, shape (len(users), count); with `train`, never one of the user's train positives
    (every user must have an item outside them: users_without_negatives)."""
    negatives = rng.integers(0, num_items, size=(len(users), count), dtype=np.int64)
    if train is None:
        return negatives
    flat_users = np.repeat(users, count)
    flat = negatives.reshape(-1)
    redraw = contains(train, flat_users, flat)
    for _ in range(max_rounds):
        if not redraw.any():
            break
        flat[redraw] = rng.integers(0, num_items, size=int(redraw.sum()), dtype=np.int64)
        redraw[redraw] = contains(train, flat_users[redraw], flat[redraw])
    # Users with nearly every item still hit a positive after the rounds above (at 95% of the items, a third of the
    # draws): draw theirs exactly, the r-th item outside the sorted row, which is r plus the positives p_j
    # with p_j - j <= r (p_j - j items outside the row come before p_j).
    for k in np.flatnonzero(redraw):
        positives = np.asarray(train.row(flat_users[k]), dtype=np.int64)
        r = int(rng.integers(0, num_items - len(positives)))
        flat[k] = r + np.searchsorted(positives - np.arange(len(positives)), r, side="right")
    return negatives


def users_without_negatives(train: CSR, num_items: int) -> np.ndarray:
    """The users whose train positives are every item: no negative can be drawn for them."""
    return np.flatnonzero(np.diff(np.asarray(train.indptr, dtype=np.int64)) >= num_items)


def gather_rows(csr: CSR, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(lengths, concatenated column ids, concatenated values) of the given rows, in order."""
    starts = np.asarray(csr.indptr[rows], dtype=np.int64)
    lengths = np.asarray(csr.indptr[rows + 1], dtype=np.int64) - starts
    total = int(lengths.sum())
    if total == 0:
        empty_values = None if csr.values is None else np.zeros(0, np.float32)
        return lengths, np.zeros(0, np.int64), empty_values
    # Position k of row r maps to starts[r] + k: one arange shifted per row.
    shift = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    positions = np.arange(total, dtype=np.int64) + shift
    columns = np.asarray(csr.indices[positions], dtype=np.int64)
    values = None if csr.values is None else np.asarray(csr.values[positions], dtype=np.float32)
    return lengths, columns, values
