"""Alignment methods, selected by `align.method`; each is one module and works with every backbone."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from darec_dist.models.aligners.base import Aligner, AlignInputs, NoAlignment
from darec_dist.models.aligners.darec import DaRec, DaRecConfig
from darec_dist.models.aligners.rlmrec_con import ConConfig, RLMRecCon
from darec_dist.models.aligners.rlmrec_gen import GenConfig, RLMRecGen


@dataclass
class AlignConfig:
    method: Literal["none", "rlmrec-con", "rlmrec-gen", "darec"] = "none"
    con: ConConfig = field(default_factory=ConConfig)
    gen: GenConfig = field(default_factory=GenConfig)
    darec: DaRecConfig = field(default_factory=DaRecConfig)
    # The projections' weights: "torch" keeps PyTorch's default (Kaiming-uniform with a = sqrt(5), what every
    # recorded result in docs/results.md used); "xavier" draws them as RLMRec's code does (xavier_uniform_, about
    # twice as large; the biases keep PyTorch's default there too).
    projector_init: Literal["torch", "xavier"] = "torch"


def build_aligner(cfg: AlignConfig, collab_dim: int, llm_dim: int, seed: int = 0, input_dim: int | None = None) -> Aligner:
    """collab_dim: the width of the backbone's c; input_dim: of its table rows (default collab_dim)."""
    if cfg.method == "none":
        return NoAlignment()
    if cfg.method == "rlmrec-con":
        aligner: Aligner = RLMRecCon(cfg.con, collab_dim, llm_dim)
    elif cfg.method == "rlmrec-gen":
        aligner = RLMRecGen(cfg.gen, collab_dim, llm_dim, input_dim or collab_dim)
    elif cfg.method == "darec":
        aligner = DaRec(cfg.darec, collab_dim, llm_dim, seed)
    else:
        raise ValueError(f"align.method: unknown method {cfg.method!r}")
    if cfg.projector_init == "xavier":
        # Every linear map of an aligner is one of its projections (centres and the mask token are plain parameters).
        for module in aligner.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
    return aligner


__all__ = ["AlignConfig", "AlignInputs", "Aligner", "build_aligner"]
