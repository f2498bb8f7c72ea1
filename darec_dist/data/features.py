"""Batches as KeyedJaggedTensors: each distinct batch node becomes a weighted bag over the user and item tables.

A node's collaborative embedding is sum_j w_vj E_j over its row (docs/design.md,
"Backbones as propagation rows"): for MF the row is the node itself, for LightGCN its
precomputed propagation row. The row's user entries form a bag on the user
table (feature `node_via_user`) and its item entries a bag on the item table
(`node_via_item`); the pooled sums of both bags add up to the node's embedding.
A backbone with several row blocks (GCCF: one per layer) has one such pair of
features per block (`node_via_user_b1`, ...), whose sums are concatenated.
Groups: `user` (the batch users), `pos` (their positives), `neg` (the negatives).
A node that occurs several times in a batch (a popular item, an active user)
is looked up once, and each group indexes the distinct nodes' embeddings: on
small catalogues this cuts a step's lookups (and its input all-to-all) by about
half. Backbones whose rows are not the identity also look up the batch
nodes' own rows (`<group>_ego`) for the L2 penalty on the input embeddings.

A KeyedJaggedTensor has the same number of bags for every key, so keys with
fewer bags than the largest are padded with empty bags, and their pooled
outputs are cut back to size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from darec_dist.data.dataset import CSR
from darec_dist.data.sampling import gather_rows

GROUPS = ("user", "pos", "neg")
TABLES = ("user", "item")


NODE_FEATURES = {"user": "node_via_user", "item": "node_via_item"}
EGO_FEATURES = {"user": "user_ego", "pos": "pos_ego", "neg": "neg_ego"}
EGO_TABLE = {"user": "user", "pos": "item", "neg": "item"}
LLM_FEATURES = {"user": "llm_user", "item": "llm_item"}


def node_feature(table: str, block: int) -> str:
    """The feature that pools row block `block`'s entries on `table` (block 0 keeps the plain name)."""
    return NODE_FEATURES[table] + (f"_b{block}" if block else "")


class NodeRows:
    """Rows of node ids (users 0..U-1, items U..U+I-1) in `blocks` row blocks of num_nodes rows each;
    graph None means identity rows (MF)."""

    def __init__(self, num_users: int, graph: CSR | None, blocks: int = 1):
        self.num_users, self.graph, self.blocks = num_users, graph, blocks
        self.num_nodes = None if graph is None else graph.num_rows // blocks

    def gather(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.graph is None:
            return _single(nodes.astype(np.int64))
        return gather_rows(self.graph, nodes)

    def split_by_table(self, nodes: np.ndarray) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per (table, block): (bag lengths, table-local ids, weights) of the nodes' rows in that block."""
        parts = {}
        for block in range(self.blocks):
            rows = nodes if block == 0 else nodes + block * self.num_nodes
            lengths, columns, weights = self.gather(rows)
            is_user = columns < self.num_users
            row_of_entry = np.repeat(np.arange(len(nodes)), lengths)
            user_lengths = np.bincount(row_of_entry[is_user], minlength=len(nodes)).astype(np.int64)
            parts["user", block] = (user_lengths, columns[is_user], weights[is_user])
            parts["item", block] = (lengths - user_lengths, columns[~is_user] - self.num_users, weights[~is_user])
        return parts


@dataclass
class BatchFeatures:
    """One local batch: ids, and the KJTs for the trainable tables and (optionally) the frozen LLM tables."""

    users: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor
    sparse: KeyedJaggedTensor
    llm: KeyedJaggedTensor | None
    # Per group: the position of each of its nodes among the distinct nodes that `sparse` looks up.
    node_index: dict[str, torch.Tensor]
    # Per group the aligner reads: the position of each of its first `llm_rows` nodes among the distinct
    # ids that `llm` looks up on the group's LLM table.
    llm_index: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.users)

    def group_sizes(self) -> dict[str, int]:
        return {"user": len(self.users), "pos": len(self.pos), "neg": len(self.neg)}


def _kjt(parts: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], keys: list[str], weighted: bool = True) -> KeyedJaggedTensor:
    """One KJT; every key padded with empty bags up to the largest key's bag count."""
    stride = max(len(parts[k][0]) for k in keys)
    lengths = [np.pad(parts[k][0], (0, stride - len(parts[k][0]))) for k in keys]
    weights = torch.from_numpy(np.concatenate([parts[k][2] for k in keys]).astype(np.float32)) if weighted else None
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(np.concatenate([parts[k][1] for k in keys]).astype(np.int64)),
        lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int64)),
        weights=weights,
    )


def pad_bags(features: KeyedJaggedTensor, stride: int) -> KeyedJaggedTensor:
    """The same KJT with every key padded with empty bags up to `stride` bags."""
    if stride == features.stride():
        return features
    lengths = features.lengths().view(len(features.keys()), features.stride())
    lengths = torch.nn.functional.pad(lengths, (0, stride - features.stride())).flatten()
    return KeyedJaggedTensor(keys=features.keys(), values=features.values(), lengths=lengths, weights=features.weights_or_none())


def _distinct(per_group: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The distinct ids of the groups together, and per group the index of each id among them."""
    distinct, inverse = np.unique(np.concatenate(per_group), return_inverse=True)
    bounds = np.cumsum([0] + [len(ids) for ids in per_group])
    return distinct, [inverse[bounds[i] : bounds[i + 1]] for i in range(len(per_group))]


def _single(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.ones(len(ids), np.int64), ids, np.ones(len(ids), np.float32)


class FeatureBuilder:
    """Turns (users, positives, negatives) into BatchFeatures; runs inside DataLoader workers."""

    def __init__(
        self, num_users: int, graph: CSR | None, llm_groups: tuple[str, ...] = (), llm_rows: int | None = None, blocks: int = 1
    ):
        self.rows = NodeRows(num_users, graph, blocks)
        self.num_users, self.llm_groups = num_users, llm_groups
        # LLM embeddings are looked up for the first `llm_rows` interactions only (None: all).
        self.llm_rows = llm_rows
        self.with_ego = graph is not None

    def llm_groups_on(self, table: str) -> list[str]:
        """The groups the aligner reads whose nodes live on `table` ("user" or "item")."""
        return [g for g in self.llm_groups if EGO_TABLE[g] == table]

    def llm_feature_names(self, table: str) -> list[str]:
        """The frozen LLM table's features: one over the distinct nodes of the groups the aligner reads."""
        return [LLM_FEATURES[table]] if self.llm_groups_on(table) else []

    def feature_names(self, table: str) -> list[str]:
        """The trainable-table features served by `table` ("user" or "item")."""
        names = [node_feature(table, block) for block in range(self.rows.blocks)]
        if self.with_ego:
            names += [EGO_FEATURES[g] for g in GROUPS if EGO_TABLE[g] == table]
        return names

    @property
    def keys(self) -> list[str]:
        return self.feature_names("user") + self.feature_names("item")

    def node_features(
        self, nodes: dict[str, np.ndarray], ego: dict[str, np.ndarray] | None = None
    ) -> tuple[KeyedJaggedTensor, dict[str, np.ndarray]]:
        """The trainable-table KJT for node ids per group (and table-local ego ids per group), and per group
        the index of each node among the distinct nodes looked up."""
        empty = np.zeros(0, np.int64)
        distinct, index = _distinct([nodes.get(g, empty) for g in GROUPS])
        node_index = dict(zip(GROUPS, index))
        by_table = self.rows.split_by_table(distinct)
        parts = {node_feature(table, block): part for (table, block), part in by_table.items()}
        if self.with_ego:
            for group in GROUPS:
                parts[EGO_FEATURES[group]] = _single((ego or {}).get(group, empty))
        return _kjt(parts, self.keys), node_index

    def build(self, users: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> BatchFeatures:
        local_ids = {"user": users, "pos": pos, "neg": neg}
        nodes = {"user": users, "pos": pos + self.num_users, "neg": neg + self.num_users}
        sparse, node_index = self.node_features(nodes, ego=local_ids)
        llm, llm_index, llm_parts = None, {}, {}
        for table in TABLES:
            groups = self.llm_groups_on(table)
            if groups:
                distinct, index = _distinct([local_ids[g][: self.llm_rows] for g in groups])
                llm_parts[LLM_FEATURES[table]] = _single(distinct)
                llm_index.update(zip(groups, index))
        if llm_parts:
            llm = _kjt(llm_parts, list(llm_parts), weighted=False)
        return BatchFeatures(
            torch.from_numpy(users),
            torch.from_numpy(pos),
            torch.from_numpy(neg),
            sparse,
            llm,
            {g: torch.from_numpy(i) for g, i in node_index.items()},
            {g: torch.from_numpy(i) for g, i in llm_index.items()},
        )
