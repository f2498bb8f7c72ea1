"""Alignment methods, selected by `align.method`; each is one module and works with every backbone."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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


def build_aligner(cfg: AlignConfig, collab_dim: int, llm_dim: int, seed: int = 0, input_dim: int | None = None) -> Aligner:
    """collab_dim: the width of the backbone's c; input_dim: of its table rows (default collab_dim)."""
    if cfg.method == "none":
        return NoAlignment()
    if cfg.method == "rlmrec-con":
        return RLMRecCon(cfg.con, collab_dim, llm_dim)
    if cfg.method == "rlmrec-gen":
        return RLMRecGen(cfg.gen, collab_dim, llm_dim, input_dim or collab_dim)
    if cfg.method == "darec":
        return DaRec(cfg.darec, collab_dim, llm_dim, seed)
    raise ValueError(f"align.method: unknown method {cfg.method!r}")


__all__ = ["AlignConfig", "AlignInputs", "Aligner", "build_aligner"]
