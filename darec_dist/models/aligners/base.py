"""The aligner interface: what every alignment method (none, RLMRec-Con/Gen, DaRec) implements.

An aligner sees the batch's collaborative embeddings c (from any backbone) and
the frozen LLM embeddings l of the same nodes, per group (`user`, `pos`, `neg`),
and returns its weighted losses by name. It never looks at which backbone made c.
"""

from __future__ import annotations

import torch
from torch import nn

NodeEmbeddings = dict[str, torch.Tensor]


class Aligner(nn.Module):
    # Whether the trainer must look up the frozen LLM embeddings for this aligner.
    uses_llm: bool = True

    def forward(self, collab: NodeEmbeddings, llm: NodeEmbeddings | None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def scoring_vectors(self, collab: torch.Tensor, kind: str) -> torch.Tensor:
        """The vectors that rank items for users (kind is "user" or "item"); the backbone's c by default."""
        return collab


class NoAlignment(Aligner):
    """The plain backbone: no LLM side at all."""

    uses_llm = False

    def forward(self, collab: NodeEmbeddings, llm: NodeEmbeddings | None) -> dict[str, torch.Tensor]:
        return {}
