"""Node masking over precomputed propagation rows (RLMRec-Gen's masked forward).

A node is masked at a step when a hash of its key and the step's salt falls below the
mask ratio: every rank masks the same nodes without a draw over the whole graph (which
would cost O(nodes) per step on an industrial catalogue), and a rank needs only the keys
it holds. The batch is then pooled without the masked entries of its rows; what they
weighed is returned per bag, for the aligner's mask-token term.
"""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

_LOW32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors (each product stays below 2^59, so nothing overflows)."""
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & _LOW32
    return (x >> 16) ^ x


def step_salt() -> int:
    """A step's salt, from torch's global generator: every rank draws the same (seeded alike), and a resume the same
    again (the generator's state is in every checkpoint)."""
    return int(torch.randint(2**31, ()).item())


def masked_nodes(keys: torch.Tensor, salt: int, ratio: float) -> torch.Tensor:
    """Whether each node key (int64, >= 0) is masked at the step with this salt: about `ratio` of all nodes."""
    h = _mix32(_mix32((keys & _LOW32) ^ (salt & _LOW32)) ^ (keys >> 32))
    return h < int(ratio * 2**32)


def without_masked_entries(
    features: KeyedJaggedTensor, key_offsets: dict[str, int], salt: int, ratio: float
) -> tuple[KeyedJaggedTensor, dict[str, torch.Tensor]]:
    """The weighted KJT with the masked nodes' entries zeroed in the features named in key_offsets (each maps a
    table-local id to its node key by adding its offset), and per such feature the zeroed weight of each bag."""
    weights, values = features.weights(), features.values()
    per_key = features.length_per_key()
    stride = features.stride()
    keep = torch.ones_like(weights)
    masked_weight = {}
    start = 0
    lengths = features.lengths()
    for k, (key, count) in enumerate(zip(features.keys(), per_key)):
        if key in key_offsets:
            entries = slice(start, start + count)
            hit = masked_nodes(values[entries] + key_offsets[key], salt, ratio)
            keep[entries] = (~hit).to(weights.dtype)
            bag = torch.repeat_interleave(torch.arange(stride, device=values.device), lengths[k * stride : (k + 1) * stride])
            masked_weight[key] = torch.zeros(stride, dtype=weights.dtype, device=weights.device).index_add_(
                0, bag, weights[entries] * hit.to(weights.dtype)
            )
        start += count
    kept = KeyedJaggedTensor(keys=features.keys(), values=values, lengths=lengths, weights=weights * keep)
    return kept, masked_weight
