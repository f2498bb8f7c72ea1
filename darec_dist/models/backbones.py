"""Backbones are defined by their propagation rows: a node's embedding is sum_j w_vj E_j.

MF uses identity rows (a node is its own table row). LightGCN uses the rows of
P = sum_k a_k A^k that the Spark job precomputed, so LightGCN costs one weighted,
pooled lookup per batch node instead of a full-graph propagation per step. A new
backbone of this linear family is one more entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from darec_dist.data.dataset import CSR, PreparedDataset


@dataclass
class ModelConfig:
    backbone: Literal["mf", "lightgcn"] = "lightgcn"
    dim: int = 32
    # L2 penalty on the batch nodes' input embeddings (LightGCN's reg), divided by the batch size.
    reg: float = 1e-6

    def __post_init__(self) -> None:
        if self.dim < 1 or self.reg < 0:
            raise ValueError("model.dim must be >= 1 and model.reg >= 0")


def propagation_rows(cfg: ModelConfig, dataset: PreparedDataset) -> CSR | None:
    """The rows the backbone pools over; None stands for identity rows."""
    if cfg.backbone == "mf":
        return None
    if cfg.backbone == "lightgcn":
        if int(dataset.manifest["graph"]["layers"]) < 1:
            raise ValueError(f"{dataset.root}: model.backbone=lightgcn needs graph rows with layers >= 1 (prepare graph.layers)")
        return dataset.graph
    raise ValueError(f"model.backbone: unknown backbone {cfg.backbone!r}")
