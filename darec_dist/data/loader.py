"""Training batches: WebDataset shards -> shuffle buffer -> negatives -> feature bags, equal steps per rank.

Each DataLoader worker reads the shards that `split_by_node` and `split_by_worker`
hand it, shuffles interactions through a buffer reseeded every epoch, samples
negatives and gathers every batch node's propagation row (the expensive part),
and builds the batch's KeyedJaggedTensors, so the training process receives them ready. The
number of steps per epoch is computed from the manifest so that every rank takes
the same number of steps and collectives never wait on a rank that ran dry.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import webdataset as wds

from darec_dist.config import ConfigError
from darec_dist.data.dataset import DatasetError, PreparedDataset
from darec_dist.data.features import BatchFeatures, FeatureBuilder
from darec_dist.data.sampling import sample_negatives
from darec_dist.data.shards import epoch_shard_order, interaction_blocks
from darec_dist.signals import ctrl_c_held


@dataclass
class LoaderConfig:
    # Interactions per step summed over all ranks (the global batch).
    batch_size: int = 4096
    num_negatives: int = 1
    # Redraw a negative that is one of the user's train positives.
    reject_train_positives: bool = True
    # Interactions held per worker for shuffling across blocks and shards.
    shuffle_buffer: int = 65536
    num_workers: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_negatives < 1 or self.shuffle_buffer < 0 or self.num_workers < 0:
            raise ValueError("loader: batch_size and num_negatives must be >= 1, shuffle_buffer and num_workers >= 0")


def local_batch_size(cfg: LoaderConfig, world_size: int) -> int:
    if cfg.batch_size % world_size:
        raise ConfigError(f"loader.batch_size={cfg.batch_size} is not divisible by the world size {world_size}")
    return cfg.batch_size // world_size


def check_world_fits(dataset: PreparedDataset, world_size: int, num_workers: int) -> None:
    """Every worker of every rank needs at least one shard."""
    readers = world_size * max(1, num_workers)
    if len(dataset.shards) < readers:
        raise DatasetError(
            f"{dataset.root}: {len(dataset.shards)} shards cannot feed {world_size} ranks x {max(1, num_workers)} workers "
            f"= {readers} readers; re-run prepare with shards.factor a multiple of {readers} or use fewer ranks/workers"
        )


def worker_interaction_counts(dataset: PreparedDataset, seed: int, epoch: int, world_size: int, num_workers: int) -> np.ndarray:
    """[rank, worker] -> interactions that reader gets this epoch (mirrors split_by_node / split_by_worker)."""
    count_of = {str(dataset.root / s["path"]): int(s["interactions"]) for s in dataset.shards}
    order = epoch_shard_order(dataset.shard_urls(), seed, epoch)
    workers = max(1, num_workers)
    counts = np.zeros((world_size, workers), dtype=np.int64)
    for rank in range(world_size):
        for worker, url in enumerate(order[rank::world_size]):
            counts[rank, worker % workers] += count_of[url]
    return counts


def steps_per_epoch(dataset: PreparedDataset, cfg: LoaderConfig, seed: int, epoch: int, world_size: int) -> int:
    """The steps every rank can take: the smallest rank's full local batches, summed over its workers."""
    local = local_batch_size(cfg, world_size)
    counts = worker_interaction_counts(dataset, seed, epoch, world_size, cfg.num_workers)
    steps = int((counts // local).sum(axis=1).min())
    if steps == 0:
        raise DatasetError(
            f"{dataset.root}: in epoch {epoch}'s shard order a worker's shards hold fewer than one local batch ({local} "
            "interactions); lower loader.batch_size or loader.num_workers"
        )
    return steps


def check_every_epoch_has_a_batch(dataset: PreparedDataset, cfg: LoaderConfig, seed: int, epochs: int, world_size: int) -> None:
    """Each epoch deals the shards anew: where they do not split evenly over the readers, a later epoch can leave a
    rank less than one batch though the first did not. Checked for every epoch before any setup (a shuffle of the
    shard list each), not found after hours of training."""
    for epoch in range(epochs):
        steps_per_epoch(dataset, cfg, seed, epoch, world_size)


def uneven_shards_warning(dataset: PreparedDataset, cfg: LoaderConfig, seed: int, world_size: int) -> str | None:
    """What an epoch leaves out when the ranks hold unequal shares of the shards (None: they hold equal ones).

    Every rank takes the steps of the one with the fewest interactions, so collectives never wait on a rank that has
    run out; the rest of the others' shares is not trained on that epoch (which shards, the order decides anew).
    """
    if len(dataset.shards) % world_size == 0:
        return None
    trained = steps_per_epoch(dataset, cfg, seed, 0, world_size) * local_batch_size(cfg, world_size) * world_size
    total = sum(int(s["interactions"]) for s in dataset.shards)
    return (f"{dataset.root}: {len(dataset.shards)} shards do not split evenly over {world_size} ranks, and every rank "
            f"takes the steps of the one with the fewest interactions, so an epoch trains on {trained:,} of the "
            f"{total:,} train interactions ({trained / total:.0%}); re-run prepare with shards.factor a multiple of "
            f"{world_size} to train on them all")


class ShuffleBuffer:
    """Hands out uniformly drawn batches from a pool it keeps at `capacity` interactions or more once filled
    (the loader draws only while it holds capacity + a batch, then drains it at the epoch's end)."""

    def __init__(self, capacity: int, rng: np.random.Generator):
        self.capacity, self.rng = capacity, rng
        self.users = np.zeros(0, np.int64)
        self.items = np.zeros(0, np.int64)

    def add(self, users: np.ndarray, items: np.ndarray) -> None:
        self.users = np.concatenate([self.users, users])
        self.items = np.concatenate([self.items, items])

    def __len__(self) -> int:
        return len(self.users)

    def draw(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        picked = self.rng.choice(len(self.users), size=size, replace=False)
        keep = np.ones(len(self.users), dtype=bool)
        keep[picked] = False
        batch = self.users[picked], self.items[picked]
        self.users, self.items = self.users[keep], self.items[keep]
        return batch


class TrainBatches(torch.utils.data.IterableDataset):
    """One epoch of one rank's local batches: BatchFeatures with exactly `local_batch` interactions each."""

    def __init__(self, dataset: PreparedDataset, cfg: LoaderConfig, features: FeatureBuilder, seed: int, epoch: int, local_batch: int):
        self.dataset, self.cfg, self.features = dataset, cfg, features
        self.seed, self.epoch, self.local_batch = seed, epoch, local_batch

    def _rng(self) -> np.random.Generator:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        return np.random.default_rng([self.seed, self.epoch, rank, worker])

    def __iter__(self) -> Iterator[BatchFeatures]:
        rng = self._rng()
        train = self.dataset.interactions("train") if self.cfg.reject_train_positives else None
        buffer = ShuffleBuffer(max(self.cfg.shuffle_buffer, self.local_batch), rng)
        for users, items in interaction_blocks(self.dataset.shard_urls(), self.seed, self.epoch, self.dataset.num_users,
                                               self.dataset.num_items):
            buffer.add(users, items)
            while len(buffer) >= buffer.capacity + self.local_batch:
                yield self._batch(rng, train, *buffer.draw(self.local_batch))
        while len(buffer) >= self.local_batch:
            yield self._batch(rng, train, *buffer.draw(self.local_batch))

    def _batch(self, rng, train, users: np.ndarray, items: np.ndarray) -> BatchFeatures:
        negatives = sample_negatives(rng, users, self.dataset.num_items, self.cfg.num_negatives, train)
        return self.features.build(users, items, negatives.reshape(-1))


def epoch_batches(
    dataset: PreparedDataset, cfg: LoaderConfig, features: FeatureBuilder, seed: int, epoch: int, world_size: int, skip: int = 0
) -> Iterator[BatchFeatures]:
    """This rank's batches of one epoch: exactly `steps_per_epoch` of them, the first `skip` dropped (resume)."""
    steps = steps_per_epoch(dataset, cfg, seed, epoch, world_size)
    source = TrainBatches(dataset, cfg, features, seed, epoch, local_batch_size(cfg, world_size))
    loader = torch.utils.data.DataLoader(
        source,
        batch_size=None,
        num_workers=cfg.num_workers,
        prefetch_factor=4 if cfg.num_workers > 0 else None,
        persistent_workers=False,
        # Its base seed from its own generator, not the global one: an epoch resumed mid-way would otherwise draw it
        # after the checkpoint's RNG state was restored, and the model's own draws (RLMRec-Gen's masks) would shift.
        # (The batches' randomness is the rank's numpy generator above.)
        generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch),
        worker_init_fn=_ignore_ctrl_c,
    )
    # Ctrl-C is held while workers fork (taken inside Python's after-fork hooks it was printed as "Exception ignored"
    # and lost, and the run went on) and while a batch is received (cut mid-way, the worker serving its tensors'
    # file descriptors printed a ConnectionResetError traceback). A second Ctrl-C is taken at once (a hung worker).
    received = None
    try:
        with ctrl_c_held():
            received = iter(loader)
        for step in range(steps):
            with ctrl_c_held():
                batch = next(received, None)
            if batch is None:
                # Ending here would leave the other ranks waiting in the step's collectives. Reached where the shards
                # hold fewer interactions than the manifest counts, unnoticed only with data.verify_checksums=false.
                raise DatasetError(f"{dataset.root}: this rank's shards ran out after {step} of the epoch's {steps} batches; "
                                   "they hold fewer interactions than manifest.json counts (check them: data.verify_checksums=true)")
            if step >= skip:
                yield batch
    finally:
        # The last reference: the workers are ended now, also when an exception passes through here (whose traceback
        # keeps this frame), not left to find the main process gone (os._exit) and print a BrokenPipeError. Held:
        # a Ctrl-C taken inside the DataLoader's __del__ would be printed as "Exception ignored" and lost.
        with ctrl_c_held():
            received = None


def _ignore_ctrl_c(worker_id: int) -> None:
    """A terminal's Ctrl-C reaches the workers too; the main process alone answers it and ends them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
