"""RLMRec-Gen: masked reconstruction of LLM embeddings from collaborative context (Ren et al., WWW 2024).

As RLMRec runs it: at every training step a fraction of all nodes is masked, their
input rows replaced by a learnable mask token m throughout the graph, and the model
trained on that masked forward: BPR as well as the reconstruction, in which
sigma_up maps each masked node's embedding to the LLM space and an InfoNCE over
the masked nodes (all ranks) pulls it to the node's LLM embedding l_v.

With precomputed rows a node's masked embedding is exact without propagating again:
c~_v = sum_j P_vj (E_j, or m where j is masked) = (c_v pooled without the masked
entries) + (the weight of the masked entries) m, per row block. The trainer pools the
batch without this step's masked entries (`input_mask_ratio`); this module adds the
mask-token term. The masked set is a hash of the node and a per-step salt
(darec_dist/models/masking.py), the same on every rank, and the reconstruction runs
over the batch's masked users and positives (RLMRec's over every masked node of the
graph, which needs a forward of the whole graph). With MF rows a masked node is the
mask token alone, so the reconstruction trains nothing but this module; the aligner
declares `needs_graph_context`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from darec_dist.models.aligners.base import Aligner, AlignInputs, projector
from darec_dist.models.aligners.coupled_losses import info_nce_to_frozen


@dataclass
class GenConfig:
    # RLMRec's Amazon-book LightGCN settings: mask ratio 0.15, weight 0.1, temperature 0.5.
    weight: float = 0.1
    temperature: float = 0.5
    mask_ratio: float = 0.15

    def __post_init__(self) -> None:
        # (Not 1: every node masked leaves BPR and the reconstruction only the mask token, and the tables untrained.)
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"align.gen.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not (self.temperature > 0 and self.weight >= 0):
            raise ValueError(f"align.gen.temperature must be > 0 and align.gen.weight >= 0, got {self.temperature} and {self.weight}")


class RLMRecGen(Aligner):
    llm_groups = ("user", "pos")
    needs_graph_context = True

    def __init__(self, cfg: GenConfig, collab_dim: int, llm_dim: int, input_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        # The mask token replaces a node's input row, so it has the tables' width.
        self.mask_token = nn.Parameter(torch.zeros(input_dim or collab_dim))
        self.up = projector(collab_dim, llm_dim)

    @property
    def input_mask_ratio(self) -> float:
        return self.cfg.mask_ratio

    def training_inputs(self, inputs: AlignInputs) -> AlignInputs:
        """c~: each row block b of c gains (the weight of its masked entries) x m."""
        if inputs.masked_weight is None:
            raise ValueError("RLMRec-Gen trains on the masked forward: AlignInputs.masked_weight is missing")
        token = self.mask_token
        collab = {g: c + (inputs.masked_weight[g].unsqueeze(-1) * token).flatten(1) for g, c in inputs.collab.items()}
        return replace(inputs, collab=collab)

    def forward(self, inputs: AlignInputs) -> dict[str, torch.Tensor]:
        nodes = inputs.nodes()
        masked = nodes.rows(nodes.masked["all"].nonzero().squeeze(1))
        return {"rlmrec_gen": self.cfg.weight * self.reconstruction_loss(masked)}

    def reconstruction_loss(self, masked: AlignInputs) -> torch.Tensor:
        """InfoNCE of sigma_up(c~_v) against l_v over the masked nodes of every rank's rows; a node on two rows (an
        active user) is one anchor and one negative."""
        return info_nce_to_frozen(self.up(masked.collab["all"]), masked.llm["all"], self.cfg.temperature, masked.ids["all"])
