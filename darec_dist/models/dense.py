"""The dense part: everything outside the embedding tables, trained by a DeepSpeed engine."""

from __future__ import annotations

import torch
from torch import nn

from darec_dist.models.aligners.base import Aligner, AlignInputs
from darec_dist.models.losses import bpr_loss, l2_penalty


class DenseArch(nn.Module):
    """Collaborative losses (BPR + L2) plus the aligner's losses; returns them by name with their `total`."""

    def __init__(self, aligner: Aligner, reg: float):
        super().__init__()
        self.aligner, self.reg = aligner, reg

    def forward(self, inputs: AlignInputs) -> dict[str, torch.Tensor]:
        inputs = self.aligner.training_inputs(inputs)
        collab, ego = inputs.collab, inputs.ego
        # BPR trains the vectors that rank items (the backbone's c unless the aligner scores with others).
        score = self.aligner.scoring_vectors
        losses = {"bpr": bpr_loss(score(collab["user"], "user"), score(collab["pos"], "item"), score(collab["neg"], "item"))}
        if self.reg > 0:
            losses["reg"] = self.reg * l2_penalty(collab["user"].shape[0], ego["user"], ego["pos"], ego["neg"])
        losses.update(self.aligner(inputs))
        losses["total"] = sum(losses.values())
        return losses
