"""Per-sample losses of the collaborative objective, averaged over the local batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bpr_loss(users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(s(u, i) - s(u, j)); `neg` holds num_negatives rows per user, user-major."""
    per_user = neg.shape[0] // users.shape[0]
    users_rep = users.repeat_interleave(per_user, dim=0)
    pos_rep = pos.repeat_interleave(per_user, dim=0)
    margin = (users_rep * pos_rep).sum(-1) - (users_rep * neg).sum(-1)
    return -F.logsigmoid(margin).mean()


def l2_penalty(batch_size: int, *embeddings: torch.Tensor) -> torch.Tensor:
    """LightGCN's regulariser: half the squared norms of the batch's input embeddings, per interaction."""
    return sum(e.pow(2).sum() for e in embeddings) / (2.0 * batch_size)
