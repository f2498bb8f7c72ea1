"""RLMRec-Gen's node masking against plain implementations: which nodes a step masks, and the batch pooled
without their entries."""

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from darec_dist.models.aligners.coupled_losses import info_nce, info_nce_to_frozen
from darec_dist.models.masking import masked_nodes, without_masked_entries


def test_a_step_masks_about_the_ratio_of_nodes_and_each_salt_another_set():
    keys = torch.arange(200_000) + 2**33  # beyond 32 bits too
    first, again, other = masked_nodes(keys, 7, 0.15), masked_nodes(keys, 7, 0.15), masked_nodes(keys, 8, 0.15)
    assert torch.equal(first, again)
    assert abs(first.float().mean().item() - 0.15) < 0.005
    assert abs(other.float().mean().item() - 0.15) < 0.005
    overlap = (first & other).float().mean().item()
    assert abs(overlap - 0.15**2) < 0.005, "two steps' masks should be independent"
    assert masked_nodes(keys[:100], 7, 1.0).all()


def test_masked_entries_are_zeroed_and_their_weight_summed_per_bag():
    rng = np.random.default_rng(0)
    lengths = torch.tensor([3, 0, 4, 2, 5, 1])  # keys a (3 bags), b (3 bags)
    values = torch.from_numpy(rng.integers(0, 40, int(lengths.sum())))
    weights = torch.from_numpy(rng.random(int(lengths.sum())).astype(np.float32))
    features = KeyedJaggedTensor(keys=["a", "b"], values=values, lengths=lengths, weights=weights)
    offsets, salt, ratio = {"b": 100}, 3, 0.5  # only b's entries are maskable; its ids are node keys from 100
    kept, masked_weight = without_masked_entries(features, offsets, salt, ratio)
    assert set(masked_weight) == {"b"}
    bag_of_entry = np.repeat(np.arange(6), lengths.numpy())
    want_weights, want_sums = weights.clone(), np.zeros(3, np.float32)
    for e in range(len(values)):
        bag = bag_of_entry[e]
        if bag >= 3 and masked_nodes(torch.tensor([int(values[e]) + 100]), salt, ratio).item():
            want_sums[bag - 3] += weights[e].item()
            want_weights[e] = 0.0
    assert 0 < want_sums.sum() < weights[lengths[:3].sum() :].sum()
    torch.testing.assert_close(kept.weights(), want_weights)
    torch.testing.assert_close(masked_weight["b"], torch.from_numpy(want_sums))
    assert torch.equal(kept.values(), values) and torch.equal(kept.lengths(), lengths)


def test_info_nce_to_frozen_is_info_nce_over_each_node_once_on_one_process():
    """A node on several rows is one anchor, as RLMRec's masked seeds are, not one per row."""
    torch.manual_seed(0)
    anchors = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.randn(9, 5, dtype=torch.float64)
    ids = torch.tensor([4, 1, 4, 0, 2, 1, 7, 3, 5])
    first = [0, 1, 3, 4, 6, 7, 8]
    rows = anchors[[0, 1, 0, 3, 4, 1, 6, 7, 8]]  # a node's rows share its embedding and its LLM row
    targets[2], targets[5] = targets[0], targets[1]
    got = info_nce_to_frozen(rows, targets, 0.3, ids)
    want = info_nce(anchors[first], targets[first], 0.3)
    torch.testing.assert_close(got, want)
    got_grad, = torch.autograd.grad(got, anchors)
    torch.testing.assert_close(got_grad, torch.autograd.grad(want, anchors)[0])
