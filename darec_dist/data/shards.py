"""Reading the training shards: WebDataset, split by node (rank) and by DataLoader worker."""

from __future__ import annotations

import random
import webdataset as wds

from darec_dist.data import layout


def epoch_shard_order(urls: list[str], seed: int, epoch: int) -> list[str]:
    """The same permutation on every rank (so node splitting stays a partition), a new one every epoch."""
    order = list(urls)
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def interaction_blocks(urls: list[str], seed: int, epoch: int) -> wds.WebDataset:
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
        .to_tuple(layout.SAMPLE_USER_KEY, layout.SAMPLE_ITEM_KEY)
    )

