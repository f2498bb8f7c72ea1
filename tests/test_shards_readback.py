"""Shards read back by 2 ranks x 2 DataLoader workers yield every training interaction exactly once; the
loader's negatives avoid the user's train positives unless told not to; its workers leave Ctrl-C to the main
process and end with the epoch."""

import json
import multiprocessing
import os
import pickle
import signal

import pytest
import torch

from darec_dist.data.dataset import PreparedDataset
from darec_dist.data.features import FeatureBuilder
from darec_dist.data.loader import LoaderConfig, epoch_batches, steps_per_epoch
from darec_dist.data.shards import interaction_blocks
from tests.dist_helpers import run_distributed


def read_my_share(rank, world_size, root, out_dir):
    dataset = PreparedDataset.open(root)
    pairs = []
    for epoch in (0, 1):
        loader = torch.utils.data.DataLoader(interaction_blocks(dataset.shard_urls(), 3, epoch, dataset.num_users, dataset.num_items), batch_size=None, num_workers=2)
        got = [(int(u), int(i)) for users, items in loader for u, i in zip(users, items)]
        pairs.append(got)
    (out_dir / f"rank{rank}.pkl").write_bytes(pickle.dumps(pairs))


def test_two_ranks_two_workers_read_each_interaction_once(small_dataset, tmp_path):
    root, _ = small_dataset
    manifest = json.loads((root / "manifest.json").read_text())
    assert len(manifest["shards"]) >= 8
    run_distributed(read_my_share, 2, root, tmp_path)
    shares = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    train = PreparedDataset.open(root).interactions("train")
    expected = sorted((u, int(i)) for u in range(train.num_rows) for i in train.row(u))
    for epoch in (0, 1):
        rank0, rank1 = shares[0][epoch], shares[1][epoch]
        assert sorted(rank0 + rank1) == expected
        assert not set(rank0) & set(rank1)
    # Shard order is reshuffled per epoch: a rank's share changes between epochs.
    assert sorted(shares[0][0]) != sorted(shares[0][1])


def negatives_that_are_train_positives(root, reject: bool) -> tuple[int, int]:
    """(negatives that are a train positive of their user, all negatives) over one epoch of one rank's batches."""
    dataset = PreparedDataset.open(root)
    cfg = LoaderConfig(batch_size=32, num_negatives=4, reject_train_positives=reject, num_workers=0)
    train = dataset.interactions("train")
    positives = {(u, int(i)) for u in range(train.num_rows) for i in train.row(u)}
    hits = total = 0
    # Identity rows (no graph): only the sampled ids matter here.
    for batch in epoch_batches(dataset, cfg, FeatureBuilder(dataset.num_users, None), seed=1, epoch=0, world_size=1):
        users = batch.users.numpy().repeat(cfg.num_negatives)  # negatives are user-major
        hits += sum((int(u), int(i)) in positives for u, i in zip(users, batch.neg.numpy()))
        total += len(users)
    return hits, total


def test_negatives_are_train_positives_only_when_rejection_is_off(small_dataset):
    root, _ = small_dataset
    # Each user has about 6 train positives of 30 items: without rejection about one negative in five is one.
    hits, total = negatives_that_are_train_positives(root, reject=False)
    assert total >= 1000 and hits > total // 10
    hits, total = negatives_that_are_train_positives(root, reject=True)
    assert total >= 1000 and hits == 0


def test_loader_workers_leave_ctrl_c_to_the_main_process(small_dataset):
    """A terminal's Ctrl-C reaches the workers too: one that ended on it failed the main process's next batch."""
    root, _ = small_dataset
    dataset = PreparedDataset.open(root)
    cfg = LoaderConfig(batch_size=2, num_negatives=1, num_workers=1)
    batches = epoch_batches(dataset, cfg, FeatureBuilder(dataset.num_users, None), seed=1, epoch=0, world_size=1)
    got = [next(batches)]
    (worker,) = multiprocessing.active_children()
    os.kill(worker.pid, signal.SIGINT)
    got += list(batches)  # the rest of the epoch, well past what the worker had prefetched
    assert len(got) == steps_per_epoch(dataset, cfg, 1, 0, 1) > 20
    assert multiprocessing.active_children() == []  # ended with the epoch


def test_ctrl_c_while_a_batch_is_received_ends_the_workers_with_the_epoch(small_dataset, monkeypatch):
    """Ctrl-C in the main process is held while it forks the workers or receives a batch (cut there, it was lost in
    Python's after-fork hooks, or a worker printed a ConnectionResetError); the KeyboardInterrupt then leaves the
    epoch, whose workers end at once, though its traceback keeps the epoch's frame (after os._exit they printed a
    BrokenPipeError, CI)."""
    root, _ = small_dataset
    dataset = PreparedDataset.open(root)
    cfg = LoaderConfig(batch_size=8, num_negatives=1, num_workers=1)
    receive = torch.utils.data.dataloader._MultiProcessingDataLoaderIter._get_data

    def ctrl_c_then_receive(self):  # a terminal's Ctrl-C while the main process waits for a batch
        os.kill(os.getpid(), signal.SIGINT)
        return receive(self)

    monkeypatch.setattr(torch.utils.data.dataloader._MultiProcessingDataLoaderIter, "_get_data", ctrl_c_then_receive)
    batches = epoch_batches(dataset, cfg, FeatureBuilder(dataset.num_users, None), seed=1, epoch=0, world_size=1)
    with pytest.raises(KeyboardInterrupt) as interrupted:
        next(batches)
    where = [entry.name for entry in interrupted.traceback]
    assert where[-1] == "ctrl_c_held" and "epoch_batches" in where, where  # where the hold ends, not inside the DataLoader
    assert multiprocessing.active_children() == []


def test_heavy_users_get_uniform_negatives_outside_their_positives():
    """A user with 95 of 100 items hits a positive in a third of the draws after the 20 redraw rounds; the rest are
    drawn exactly. Each of its 5 other items is drawn about equally often."""
    import numpy as np

    from darec_dist.data.dataset import CSR
    from darec_dist.data.sampling import sample_negatives

    heavy = np.sort(np.random.default_rng(0).choice(100, 95, replace=False))
    train = CSR(np.array([0, 95, 98]), np.concatenate([heavy, [1, 5, 7]]))
    users = np.repeat([0, 1], 2000)
    negatives = sample_negatives(np.random.default_rng(1), users, 100, 3, train)
    assert not np.isin(negatives[:2000], heavy).any() and not np.isin(negatives[2000:], [1, 5, 7]).any()
    items, counts = np.unique(negatives[:2000], return_counts=True)
    assert set(items) == set(range(100)) - set(heavy.tolist())
    assert counts.min() > 0.9 * 6000 / 5 and counts.max() < 1.1 * 6000 / 5


@pytest.fixture
def dataset_with_a_full_user(dataset_copy):
    """The small dataset with every item among user 0's train positives (only the split's arrays changed; as many
    entries taken from the other users' rows, so that they hold what the manifest counts)."""
    import numpy as np

    from darec_dist.data import layout

    indptr_path, items_path = (dataset_copy / layout.split_indptr("train"), dataset_copy / layout.split_items("train"))
    indptr, items = np.load(indptr_path), np.load(items_path)
    num_items = json.loads((dataset_copy / "manifest.json").read_text())["num_items"]
    rows = [np.arange(num_items), *(items[indptr[u] : indptr[u + 1]] for u in range(1, len(indptr) - 1))]
    surplus = sum(map(len, rows)) - len(items)
    for u in range(1, len(rows)):
        taken = min(surplus, len(rows[u]) - 1)
        rows[u], surplus = rows[u][: len(rows[u]) - taken], surplus - taken
    assert surplus == 0
    np.save(indptr_path, np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(indptr.dtype))
    np.save(items_path, np.concatenate(rows).astype(items.dtype))
    return dataset_copy


def test_a_user_with_every_item_is_refused_when_negatives_avoid_positives(dataset_with_a_full_user):
    from darec_dist.config import load_config
    from darec_dist.data.dataset import DatasetError
    from darec_dist.train.config import TrainConfig
    from darec_dist.train.run_dataset import open_dataset

    settings = [f"data.path={dataset_with_a_full_user}", "loader.batch_size=16"]
    with pytest.raises(DatasetError, match=r"1 user\(s\) have every one of the \d+ items .*contiguous ids 0;.*reject_train_positives=false"):
        open_dataset(load_config(TrainConfig, None, settings), 1, verify_checksums=False)
    open_dataset(load_config(TrainConfig, None, [*settings, "loader.reject_train_positives=false"]), 1, verify_checksums=False)


def test_shards_that_run_out_before_the_manifests_count_stop_the_epoch_with_an_error(dataset_copy):
    """Unchecked shards (data.verify_checksums=false) holding fewer interactions than the manifest counts: a rank
    that quietly ended its epoch early left the others waiting in the step's collectives."""
    from darec_dist.data.dataset import DatasetError

    manifest = json.loads((dataset_copy / "manifest.json").read_text())
    for shard in manifest["shards"]:
        shard["interactions"] *= 2
    manifest["splits"]["train"] *= 2  # (as the shards' sum: rows, which a dataset with repeated pairs may hold)
    (dataset_copy / "manifest.json").write_text(json.dumps(manifest))
    dataset = PreparedDataset.open(dataset_copy, verify_checksums=False)
    cfg = LoaderConfig(batch_size=16, num_negatives=1, num_workers=0)
    with pytest.raises(DatasetError, match="shards ran out after .* batches"):
        list(epoch_batches(dataset, cfg, FeatureBuilder(dataset.num_users, None), seed=1, epoch=0, world_size=1))
