"""Shards read back by 2 ranks x 2 DataLoader workers yield every training interaction exactly once."""

import json
import pickle

import torch

from darec_dist.data.dataset import PreparedDataset
from darec_dist.data.shards import interaction_blocks
from tests.dist_helpers import run_distributed


def read_my_share(rank, world_size, root, out_dir):
    dataset = PreparedDataset.open(root)
    pairs = []
    for epoch in (0, 1):
        loader = torch.utils.data.DataLoader(interaction_blocks(dataset.shard_urls(), seed=3, epoch=epoch), batch_size=None, num_workers=2)
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
