"""The aligner interface: what every alignment method (none, RLMRec-Con/Gen, DaRec) implements.

An aligner sees, per group of the batch (`user`, `pos`, `neg`), the collaborative
embeddings c from any backbone, the frozen LLM embeddings l of the same nodes,
the nodes' input rows and how much of its own input each c holds (P_vv); it
returns its weighted losses by name. It never looks at which backbone made c.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

NodeEmbeddings = dict[str, torch.Tensor]


@dataclass
class AlignInputs:
    collab: NodeEmbeddings
    llm: NodeEmbeddings | None
    # The nodes' own input rows E_v and self weights P_vv (1 for MF), for aligners that mask inputs.
    ego: NodeEmbeddings
    self_weight: NodeEmbeddings
    # Per group, a key per row, equal for rows of the same node on every rank and distinct between users and items
    # (the trainer's: user id, or num_users + item id): an aligner can run its per-node work (projections) once per
    # distinct node, and count a node once among contrastive negatives. None: treat every row as distinct.
    ids: NodeEmbeddings | None = None

    def nodes(self, groups: tuple[str, ...] = ("user", "pos")) -> "AlignInputs":
        """The listed groups concatenated into one group `all` (users and their positive items by default)."""

        def join(parts: NodeEmbeddings | None) -> NodeEmbeddings | None:
            return None if parts is None else {"all": torch.cat([parts[g] for g in groups])}

        return AlignInputs(join(self.collab), join(self.llm), join(self.ego), join(self.self_weight), join(self.ids))

    def rows(self, index: torch.Tensor) -> "AlignInputs":
        """A subset of the `all` group's rows."""

        def pick(parts: NodeEmbeddings | None) -> NodeEmbeddings | None:
            return None if parts is None else {"all": parts["all"][index]}

        return AlignInputs(pick(self.collab), pick(self.llm), pick(self.ego), pick(self.self_weight), pick(self.ids))


def projector(d_in: int, d_out: int) -> nn.Module:
    """RLMRec's projector shape: Linear -> LeakyReLU -> Linear, hidden width (d_in + d_out) / 2."""
    hidden = (d_in + d_out) // 2
    return nn.Sequential(nn.Linear(d_in, hidden), nn.LeakyReLU(), nn.Linear(hidden, d_out))


def distinct_rows(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, inverse): the first row of each distinct id, and for every row the index of its id in `first`."""
    distinct, inverse = torch.unique(ids, return_inverse=True)
    positions = torch.arange(len(ids), device=ids.device)
    first = torch.full((len(distinct),), len(ids), device=ids.device).scatter_reduce_(0, inverse, positions, "amin")
    return first, inverse


def sample_count(available: int, requested: int) -> int:
    return min(available, max(1, requested))


def sample_index(available: int, count: int, device: torch.device) -> torch.Tensor:
    """`count` distinct rows, drawn from the global torch RNG (saved in checkpoints, so a resume redraws alike).

    Taking every row needs no draw, which keeps such a step independent of the world size.
    """
    if count >= available:
        return torch.arange(available, device=device)
    return torch.randperm(available)[:count].to(device)


class Aligner(nn.Module):
    # The batch groups whose frozen LLM embeddings this aligner reads (the trainer looks up only these).
    llm_groups: tuple[str, ...] = ("user", "pos", "neg")
    # Whether the loss reaches the tables only through a node's graph context (its propagation row's other
    # entries); with identity rows (MF) it would train nothing but the aligner, so the trainer refuses the pair.
    needs_graph_context: bool = False

    def llm_rows(self, local_batch: int, world: int) -> int | None:
        """How many leading rows of each group of a rank's batch need LLM embeddings (None: all).

        Batches come out of a shuffle buffer, so a prefix is a uniform sample; an aligner that only
        needs a sample saves the lookups and projections of the rest.
        """
        return None

    @property
    def uses_llm(self) -> bool:
        return bool(self.llm_groups)

    def forward(self, inputs: AlignInputs) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def scoring_vectors(self, collab: torch.Tensor, kind: str) -> torch.Tensor:
        """The vectors that rank items for users (kind is "user" or "item"); the backbone's c by default."""
        return collab


class NoAlignment(Aligner):
    """The plain backbone: no LLM side at all."""

    llm_groups = ()

    def forward(self, inputs: AlignInputs) -> dict[str, torch.Tensor]:
        return {}
