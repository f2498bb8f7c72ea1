"""Backbones are defined by their propagation rows: a node's embedding is sum_j w_vj E_j.

MF uses identity rows (a node is its own table row). LightGCN uses the rows of
P = sum_k a_k A^k that the Spark job precomputed, so LightGCN costs one weighted,
pooled lookup per batch node instead of a full-graph propagation per step. GCCF
(as RLMRec runs it: no layer transforms) concatenates [E, A E, ..., A^L E] over
the self-loop graph: one pooled lookup per layer's row block. A new backbone of
this linear family is one more entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from darec_dist.data.dataset import CSR, DatasetError, PreparedDataset


@dataclass
class ModelConfig:
    backbone: Literal["mf", "lightgcn", "gccf"] = "lightgcn"
    dim: int = 32
    # L2 penalty on the batch nodes' input embeddings (LightGCN's reg), halved and divided by the batch size.
    reg: float = 1e-6

    def __post_init__(self) -> None:
        if self.dim < 1 or self.reg < 0:
            raise ValueError("model.dim must be >= 1 and model.reg >= 0")
        if self.dim % 4:  # or TorchRec's sharder fails at setup on the fused kernels, after every rank has started
            raise ValueError(f"model.dim must be a multiple of 4 (FBGEMM's embedding kernels need it), got {self.dim}")


def propagation_rows(cfg: ModelConfig, dataset: PreparedDataset) -> CSR | None:
    """The rows the backbone pools over (in dataset.graph_blocks blocks); None stands for identity rows."""
    if cfg.backbone == "mf":
        return None
    graph = dataset.manifest["graph"]
    if int(graph["layers"]) < 1:
        raise DatasetError(f"{dataset.root}: model.backbone={cfg.backbone} needs graph rows with layers >= 1 (prepare graph.layers)")
    per_layer = bool(graph.get("per_layer", False))
    if cfg.backbone == "lightgcn" and per_layer:
        raise DatasetError(f"{dataset.root}: model.backbone=lightgcn sums the layers, but this dataset keeps them apart "
                         "(prepared with graph.per_layer=true, for gccf)")
    if cfg.backbone == "lightgcn" and graph.get("self_loops", False):  # (LightGCN propagates without them)
        raise DatasetError(f"{dataset.root}: model.backbone=lightgcn propagates over the graph without self-loops, but "
                           "this dataset's rows were built with them (prepared with graph.self_loops=true, for gccf)")
    if cfg.backbone == "gccf" and not (per_layer and graph.get("self_loops", False)):
        raise DatasetError(f"{dataset.root}: model.backbone=gccf needs per-layer rows of the self-loop graph "
                         "(prepare with graph.per_layer=true graph.self_loops=true)")
    return dataset.graph


def output_dim(cfg: ModelConfig, dataset: PreparedDataset) -> int:
    """The width of a node's collaborative embedding: model.dim per row block."""
    return cfg.dim * (dataset.graph_blocks if cfg.backbone == "gccf" else 1)
