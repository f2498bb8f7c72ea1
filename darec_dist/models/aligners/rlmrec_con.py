"""RLMRec-Con: contrastive alignment of c_v with the projected LLM embedding sigma_down(l_v) (Ren et al., WWW 2024).

As in RLMRec's code: one projector shared by users and items, cosine InfoNCE with
temperature tau; the positive of c_v is its own projected profile. The negatives
are the projected profiles of the global batch's nodes of the same group, computed
across ranks: for users each distinct user once (RLMRec takes every user's profile
once, which does not scale; the global batch's users are the scalable stand-in), for
items the batch's rows, as RLMRec's code takes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from darec_dist.models.aligners.base import Aligner, AlignInputs, projector
from darec_dist.models.aligners.coupled_losses import info_nce


@dataclass
class ConConfig:
    # RLMRec's Amazon-book LightGCN settings: kd_weight 1e-2, kd_temperature 0.2.
    weight: float = 0.01
    temperature: float = 0.2

    def __post_init__(self) -> None:
        # A temperature of 0 divides by zero (a NaN loss reported as divergence); a negative weight pushes apart.
        if not (self.temperature > 0 and self.weight >= 0):
            raise ValueError(f"align.con.temperature must be > 0 and align.con.weight >= 0, got {self.temperature} and {self.weight}")


class RLMRecCon(Aligner):
    def __init__(self, cfg: ConConfig, collab_dim: int, llm_dim: int):
        super().__init__()
        self.cfg = cfg
        self.down = projector(llm_dim, collab_dim)

    def forward(self, inputs: AlignInputs) -> dict[str, torch.Tensor]:
        loss = 0.0
        for group, c in inputs.collab.items():
            profiles = self.down(inputs.llm[group])
            once = inputs.ids["user"] if group == "user" and inputs.ids is not None else None
            loss = loss + info_nce(c, profiles, self.cfg.temperature, once) * (c.shape[0] / inputs.collab["user"].shape[0])
        return {"rlmrec_con": self.cfg.weight * loss}
