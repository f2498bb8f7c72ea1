"""RLMRec-Gen: masked reconstruction of LLM embeddings from collaborative context (Ren et al., WWW 2024).

A fraction of the batch's nodes is masked: the node's own input row is replaced
by a learnable mask token inside its embedding, c~_v = c_v - P_vv (E_v - m), so it
must be explained by its graph context; sigma_up maps c~_v to the LLM space and an
InfoNCE over the masked set (all ranks) pulls it to l_v. RLMRec masks inputs of
the whole graph and propagates again; with precomputed rows the node's own input
is what can be masked exactly, at the cost of a batch. With MF rows (P_vv = 1)
the masked embedding is the mask token alone, which trains nothing but this module
(measured on ML-100K: base MF to the last digit), so it declares `needs_graph_context`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from darec_dist.models.aligners.base import Aligner, AlignInputs, projector, sample_count, sample_index
from darec_dist.models.aligners.coupled_losses import info_nce


@dataclass
class GenConfig:
    # RLMRec's Amazon-book LightGCN settings: mask ratio 0.15, weight 0.1, temperature 0.5.
    weight: float = 0.1
    temperature: float = 0.5
    mask_ratio: float = 0.15

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio <= 1.0:
            raise ValueError(f"align.gen.mask_ratio must be in (0, 1], got {self.mask_ratio}")
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

    def forward(self, inputs: AlignInputs) -> dict[str, torch.Tensor]:
        nodes = inputs.nodes()
        available = nodes.collab["all"].shape[0]
        masked = nodes.rows(sample_index(available, sample_count(available, round(self.cfg.mask_ratio * available)), self.mask_token.device))
        return {"rlmrec_gen": self.cfg.weight * self.reconstruction_loss(masked)}

    def reconstruction_loss(self, masked: AlignInputs) -> torch.Tensor:
        # A node masked on two rows (an active user) is one node among the negatives.
        ids = None if masked.ids is None else masked.ids["all"]
        return info_nce(self.up(self.masked_embeddings(masked)), masked.llm["all"], self.cfg.temperature, ids)

    def masked_embeddings(self, masked: AlignInputs) -> torch.Tensor:
        """c~_v: each row block b of c holds P^b_vv E_v of the node's own input (one block but for GCCF)."""
        c, ego, w = masked.collab["all"], masked.ego["all"], masked.self_weight["all"]
        return c - (w.view(len(w), -1, 1) * (ego - self.mask_token).unsqueeze(1)).flatten(1)
