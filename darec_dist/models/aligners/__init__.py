"""Alignment methods, selected by `align.method`; each is one module and works with every backbone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from darec_dist.models.aligners.base import Aligner, NoAlignment


@dataclass
class AlignConfig:
    method: Literal["none"] = "none"


def build_aligner(cfg: AlignConfig, collab_dim: int, llm_dim: int) -> Aligner:
    if cfg.method == "none":
        return NoAlignment()
    raise ValueError(f"align.method: unknown method {cfg.method!r}")


__all__ = ["AlignConfig", "Aligner", "build_aligner"]
