"""The aligner interface: what every alignment method (none, RLMRec-Con/Gen, DaRec) implements.

An aligner sees, per group of the batch (`user`, `pos`, `neg`), the collaborative
embeddings c from any backbone, the frozen LLM embeddings l of the same nodes and
the nodes' input rows; it returns its weighted losses by name. It never looks at
which backbone made c. An aligner that masks the backbone's inputs (RLMRec-Gen)
also gets, per node, the weight of the masked entries of its propagation row.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

NodeEmbeddings = dict[str, torch.Tensor]


@dataclass
class AlignInputs:
    collab: NodeEmbeddings
    llm: NodeEmbeddings | None
    # The nodes' own input rows E_v (for the L2 penalty).
    ego: NodeEmbeddings
    # Per group, a key per row, equal for rows of the same node on every rank and distinct between users and items
    # (the trainer's: user id, or num_users + item id): an aligner can run its per-node work (projections) once per
    # distinct node, and count a node once among contrastive negatives. None: treat every row as distinct.
    ids: NodeEmbeddings | None = None
    # Set when the aligner masks inputs (`input_mask_ratio`): collab was pooled without this step's masked nodes'
    # entries, and masked_weight (rows, row blocks) is the weight those entries had in each row block; masked
    # says whether the row's own node is masked.
    masked_weight: NodeEmbeddings | None = None
    masked: NodeEmbeddings | None = None

    def nodes(self, groups: tuple[str, ...] = ("user", "pos")) -> "AlignInputs":
        """The listed groups concatenated into one group `all` (users and their positive items by default)."""

        def join(parts: NodeEmbeddings | None) -> NodeEmbeddings | None:
            return None if parts is None else {"all": torch.cat([parts[g] for g in groups])}

        return AlignInputs(**{f.name: join(getattr(self, f.name)) for f in fields(self)})

    def rows(self, index: torch.Tensor) -> "AlignInputs":
        """A subset of the `all` group's rows."""

        def pick(parts: NodeEmbeddings | None) -> NodeEmbeddings | None:
            return None if parts is None else {"all": parts["all"][index]}

        return AlignInputs(**{f.name: pick(getattr(self, f.name)) for f in fields(self)})


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


class Aligner(nn.Module):
    # The batch groups whose frozen LLM embeddings this aligner reads (the trainer looks up only these).
    llm_groups: tuple[str, ...] = ("user", "pos", "neg")
    # Whether the loss reaches the tables only through a node's graph context (its propagation row's other
    # entries); with identity rows (MF) it would train nothing but the aligner, so the trainer refuses the pair.
    needs_graph_context: bool = False

    # The fraction of all nodes whose input rows this aligner masks at each training step (0: none); the trainer
    # then pools the batch without their entries and passes their weights (AlignInputs.masked_weight).
    input_mask_ratio: float = 0.0

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

    def training_inputs(self, inputs: AlignInputs) -> AlignInputs:
        """The embeddings every training loss sees, BPR's included (RLMRec-Gen's: the masked forward)."""
        return inputs

    def scoring_vectors(self, collab: torch.Tensor, kind: str) -> torch.Tensor:
        """The vectors that rank items for users (kind is "user" or "item"); the backbone's c by default."""
        return collab


class NoAlignment(Aligner):
    """The plain backbone: no LLM side at all."""

    llm_groups = ()

    def forward(self, inputs: AlignInputs) -> dict[str, torch.Tensor]:
        return {}
