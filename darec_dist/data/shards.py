"""Reading the training shards: WebDataset, split by node (rank) and by DataLoader worker."""

from __future__ import annotations

import random
from functools import partial

import numpy as np
import webdataset as wds

from darec_dist.data import layout
from darec_dist.data.dataset import DatasetError


def epoch_shard_order(urls: list[str], seed: int, epoch: int) -> list[str]:
    """The same permutation on every rank (so node splitting stays a partition), a new one every epoch."""
    order = list(urls)
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def interaction_blocks(urls: list[str], seed: int, epoch: int, num_users: int, num_items: int) -> wds.WebDataset:
    """(users, items) int64 arrays, one pair per WebDataset sample, from this rank's and worker's shards."""
    return (
        wds.WebDataset(
            epoch_shard_order(urls, seed, epoch),
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            shardshuffle=False,
            empty_check=False,
        )
        .decode()
        .map(partial(checked_block, num_users=num_users, num_items=num_items))
    )


def checked_block(sample: dict, num_users: int, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """A sample's (users, items), refused naming its shard and key where the arrays do not pair up or hold an id
    outside the dataset's (the checksums pass a tar written wrong; the loader would pair users with other users'
    items, or a table lookup read out of bounds)."""
    where = f"{sample.get('__url__')}: sample {sample.get('__key__')!r}"
    missing = [key for key in (layout.SAMPLE_USER_KEY, layout.SAMPLE_ITEM_KEY) if key not in sample]
    if missing:
        raise DatasetError(f"{where}: no {' or '.join(missing)} in it")
    users, items = np.asarray(sample[layout.SAMPLE_USER_KEY]), np.asarray(sample[layout.SAMPLE_ITEM_KEY])
    if users.ndim != 1 or users.shape != items.shape or users.dtype.kind not in "iu" or items.dtype.kind not in "iu":
        raise DatasetError(f"{where}: expected 1-d integer user and item arrays of one length, got "
                           f"{users.dtype} {users.shape} and {items.dtype} {items.shape}")
    for kind, ids, count in (("user", users, num_users), ("item", items, num_items)):
        if len(ids) and (ids.min() < 0 or ids.max() >= count):
            raise DatasetError(f"{where}: {kind} id {int(ids[(ids < 0) | (ids >= count)][0])} outside 0..{count - 1}")
    return users.astype(np.int64, copy=False), items.astype(np.int64, copy=False)
