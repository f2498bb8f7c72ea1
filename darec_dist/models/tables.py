"""The sparse part: TorchRec embedding tables sharded by DistributedModelParallel.

Two sharded modules: the trainable user/item tables (weighted, sum-pooled bags
of propagation rows; fused optimizer in the backward pass) and the frozen
LLM-embedding tables loaded from the dataset (one row per node, unpooled). The
sharding is decided here, in one place: TorchRec's planner, or a plan fixed in
config. Tables are built on the meta device so each rank only ever allocates its
own shards, and filled chunk by chunk, so no process holds a whole table.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_training import DenseTableBatchedEmbeddingBagsCodegen, SplitTableBatchedEmbeddingBagsCodegen
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import DataType, EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig, PoolingType
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan, data_parallel, row_wise, table_wise
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from darec_dist.config import ConfigError
from darec_dist.distributed.env import DistEnv

Sharding = Literal["auto", "table_wise", "row_wise", "column_wise", "data_parallel"]
FILL_CHUNK_ROWS = 65536


@dataclass
class SparseConfig:
    # adam: fused on GPU; on CPU fbgemm has no fused Adam, so the tables use the dense kernel and torch Adam.
    optimizer: Literal["adam", "rowwise_adagrad", "adagrad", "sgd"] = "adam"
    lr: float = 1e-3
    eps: float = 1e-8
    sharding: Sharding = "auto"
    llm_sharding: Sharding = "row_wise"
    # Storage of the frozen LLM tables, the largest tables at scale (launch/plan.py): fp16 halves them
    # (rows are read back as float32); fp32 keeps the dataset's rows exact.
    llm_dtype: Literal["fp32", "fp16"] = "fp32"
    # RLMRec initialises its tables with xavier_uniform; LightGCN's paper with normal(0, 0.1).
    init: Literal["xavier_uniform", "normal"] = "xavier_uniform"
    init_std: float = 0.1

    def __post_init__(self) -> None:
        if not self.lr > 0 or not self.eps > 0 or not self.init_std > 0:
            raise ValueError(f"sparse.lr, sparse.eps and sparse.init_std must be > 0, got {self.lr}, {self.eps}, {self.init_std}")
        # Adam's first step is lr / (1 - beta1) (beta1 0.9), a float32 scalar: past float32's range torch raises mid-step.
        if self.optimizer == "adam" and self.lr / (1 - 0.9) > torch.finfo(torch.float32).max:
            raise ValueError(f"sparse.lr={self.lr}: Adam's first step, lr / (1 - beta1) = {self.lr / 0.1:g}, is past float32's range")
        if self.llm_sharding == "data_parallel":
            raise ValueError("sparse.llm_sharding: the frozen LLM tables are sharded, never copied to every rank; "
                             "use auto, table_wise, row_wise or column_wise")


class TableModule(nn.Module):
    """What DMP shards for the trainable tables: one weighted, sum-pooled EmbeddingBagCollection."""

    pooled = True
    sharder = EmbeddingBagCollectionSharder

    def __init__(self, tables: list[EmbeddingBagConfig]):
        super().__init__()
        self.ebc = EmbeddingBagCollection(tables=tables, is_weighted=True, device=torch.device("meta"))

    def table_names(self) -> list[str]:
        return [cfg.name for cfg in self.ebc.embedding_bag_configs()]

    def table_dims(self) -> dict[str, int]:
        return {cfg.name: cfg.embedding_dim for cfg in self.ebc.embedding_bag_configs()}

    def forward(self, features: KeyedJaggedTensor):
        return self.ebc(features)


class RowModule(nn.Module):
    """What DMP shards for the frozen LLM tables: an EmbeddingCollection, one id per node and no pooling.

    Sharded row-wise, it sends back only the rows a rank asked for (an all-to-all); a pooled
    collection would reduce-scatter a batch-wide partial sum at the LLM width from every rank
    instead (measured in docs/results.md, "Cost of a DaRec step").
    """

    pooled = False
    sharder = EmbeddingCollectionSharder

    def __init__(self, tables: list[EmbeddingConfig]):
        super().__init__()
        self.ec = EmbeddingCollection(tables=tables, device=torch.device("meta"))

    def table_names(self) -> list[str]:
        return [cfg.name for cfg in self.ec.embedding_configs()]

    def table_dims(self) -> dict[str, int]:
        return {cfg.name: cfg.embedding_dim for cfg in self.ec.embedding_configs()}

    def forward(self, features: KeyedJaggedTensor):
        return self.ec(features)


@dataclass
class ShardedTables:
    """A DMP-sharded TableModule or RowModule, with the torch optimizer of its dense-kernel tables (if any)."""

    module: DistributedModelParallel
    dense_optimizer: KeyedOptimizerWrapper | None
    plan: dict[str, tuple[str, str, list[int] | None]]
    pooled: bool

    def lookup(self, features: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """Per feature name: the pooled embedding of each bag, or (unpooled tables) the row of each id."""
        out = self.module(features)
        if self.pooled:
            return out.to_dict()
        return {name: rows.values() for name, rows in out.items()}

    def step(self) -> None:
        """Fused tables were updated in the backward pass; dense-kernel tables are stepped here."""
        if self.dense_optimizer is not None:
            self.dense_optimizer.step()
            self.dense_optimizer.zero_grad()

    @property
    def optimizer_step(self) -> int:
        """The fused optimizer's step count (fbgemm's per-module counter: Adam's bias correction reads it)."""
        return max((int(m.iter.item()) for m in self._counted_modules()), default=0)

    def set_optimizer_step(self, step: int) -> None:
        # TorchRec's state_dict leaves the counter out: a resume restored Adam's moments but restarted the
        # count at 0, which rescales the first updates (GPU; on CPU Adam runs as torch's, whose state keeps it).
        for module in self._counted_modules():
            module.iter.fill_(step)
            module.iter_cpu.fill_(step)

    @contextmanager
    def optimizer_step_kept(self):
        """Lookups without training (evaluation) leave the count as it was: fbgemm counts every forward."""
        saved = [(m, m.iter.clone(), m.iter_cpu.clone()) for m in self._counted_modules()]
        try:
            yield
        finally:
            for module, count, count_cpu in saved:
                module.iter.copy_(count)
                module.iter_cpu.copy_(count_cpu)

    def _counted_modules(self):
        return [m for m in _table_batched_modules(self.module) if hasattr(m, "iter") and hasattr(m, "iter_cpu")]

    def local_shards(self, table: str):
        """(row offset, column offset, tensor view) of each shard of `table` held by this rank."""
        for key, value in self.module.state_dict().items():
            if key.endswith((f"embedding_bags.{table}.weight", f"embeddings.{table}.weight")):
                if isinstance(value, ShardedTensor):
                    for shard in value.local_shards():
                        (r0, c0) = shard.metadata.shard_offsets
                        yield r0, c0, shard.tensor
                else:  # data-parallel: every rank holds the whole table
                    yield 0, 0, value

    def local_bytes(self) -> int:
        """Bytes of this rank's shards of every table and of their optimizer state: its share of the tables."""
        state = [self.module.state_dict()]
        if hasattr(self.module, "fused_optimizer"):
            state.append(self.module.fused_optimizer.state_dict()["state"])
        if self.dense_optimizer is not None:
            state.append(self.dense_optimizer.state_dict()["state"])
        return sum(_local_nbytes(value) for tree in state for value in _leaves(tree))

    def fill(self, table: str, rows: Callable[[int, int], np.ndarray]) -> None:
        """Write rows[start:end] (a function returning a float array) into this rank's shards, chunk by chunk."""
        with torch.no_grad():
            for r0, c0, tensor in self.local_shards(table):
                num_rows, num_cols = tensor.shape
                for start in range(0, num_rows, FILL_CHUNK_ROWS):
                    end = min(num_rows, start + FILL_CHUNK_ROWS)
                    block = rows(r0 + start, r0 + end)[:, c0 : c0 + num_cols]
                    tensor[start:end].copy_(torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)))


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    elif isinstance(tree, (torch.Tensor, ShardedTensor)):
        yield tree


def _local_nbytes(value: torch.Tensor | ShardedTensor) -> int:
    tensors = [shard.tensor for shard in value.local_shards()] if isinstance(value, ShardedTensor) else [value]
    return sum(t.numel() * t.element_size() for t in tensors)


def _fused_optimizer(cfg: SparseConfig) -> dict:
    kinds = {
        "sgd": EmbOptimType.EXACT_SGD,
        "adagrad": EmbOptimType.EXACT_ADAGRAD,
        "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        "adam": EmbOptimType.ADAM,
    }
    params = {"optimizer": kinds[cfg.optimizer], "learning_rate": cfg.lr, "eps": cfg.eps}
    if cfg.optimizer == "adam":
        params.update(beta1=0.9, beta2=0.999, weight_decay=0.0)
    return params


def _torch_optimizer(cfg: SparseConfig):
    makers = {
        "sgd": lambda p: torch.optim.SGD(p, lr=cfg.lr),
        "adagrad": lambda p: torch.optim.Adagrad(p, lr=cfg.lr, eps=cfg.eps),
        "rowwise_adagrad": lambda p: RowWiseAdagrad(p, lr=cfg.lr, eps=cfg.eps),
        "adam": lambda p: torch.optim.Adam(p, lr=cfg.lr, eps=cfg.eps),
    }
    return makers[cfg.optimizer]


# The optimizer class TorchRec's planner sizes a table's optimizer state by (Adam 2x the weights, Adagrad 1x,
# row-wise Adagrad a value per row, SGD none).
PLANNER_OPTIMIZERS = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "adam": torch.optim.Adam, "rowwise_adagrad": RowWiseAdagrad}


@contextmanager
def optimizer_state_planned(module: nn.Module, optimizer: str | None):
    """Within it, TorchRec's planner counts the tables' optimizer state: it reads the class from each weight's
    `_optimizer_classes`, which only apply_optimizer_in_backward sets, so fused optimizers were planned as weights
    alone (Adam's tables at a third of their size). Removed after, because the sharder would also read it as
    optimizer settings. optimizer None (frozen tables): no state."""
    weights = list(module.parameters()) if optimizer is not None else []
    for weight in weights:
        weight._optimizer_classes = [PLANNER_OPTIMIZERS[optimizer]]
    try:
        yield
    finally:
        for weight in weights:
            del weight._optimizer_classes


def compute_kernel(cfg: SparseConfig, sharding: Sharding, device: torch.device) -> str:
    if sharding == "data_parallel" or (cfg.optimizer == "adam" and device.type == "cpu"):
        return EmbeddingComputeKernel.DENSE.value
    return EmbeddingComputeKernel.FUSED.value


def check_column_shards(dims: dict[str, int], world_size: int, key: str) -> None:
    """Column-wise, each rank holds an equal slice of a table's columns, which fbgemm's kernels need in multiples of
    4: refused here, with the key to change, rather than as each rank's traceback from TorchRec or fbgemm."""
    for table, dim in dims.items():
        if dim % world_size or (dim // world_size) % 4:
            raise ConfigError(f"{key}=column_wise: table {table} is {dim} wide, which {world_size} processes cannot split "
                              f"into equal column shards of a multiple of 4; use a width divisible by {4 * world_size}, "
                              "or another sharding")


def make_plan(
    module: TableModule | RowModule, sharding: Sharding, kernel: str, sharder, env: DistEnv, optimizer: str | None
) -> ShardingPlan:
    (attribute, collection), = module.named_children()
    tables = module.table_names()
    # Processes per node (torchrun sets it): the planner and TorchRec's placements tell intra- from inter-node links by it.
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
    if sharding == "auto":
        # The dense kernel's torch optimizer keeps plain per-rank tensors, which a checkpoint cannot tell apart
        # across the shards of a row- or column-wise table (below): let the planner place such tables whole.
        types = [ShardingType.DATA_PARALLEL.value, ShardingType.TABLE_WISE.value] if kernel == EmbeddingComputeKernel.DENSE.value else None
        # The device's own memory, not the planner's default of 32 GiB per GPU (the planner keeps its reserve).
        memory = {"hbm_cap": torch.cuda.get_device_properties(env.device).total_memory} if env.device.type == "cuda" else {}
        planner = EmbeddingShardingPlanner(
            topology=Topology(world_size=env.world_size, local_world_size=local_world, compute_device=env.device.type, **memory),
            constraints={t: ParameterConstraints(compute_kernels=[kernel], sharding_types=types) for t in tables},
        )
        with optimizer_state_planned(module, optimizer):
            return planner.collective_plan(module, [sharder], dist.GroupMember.WORLD)
    fixed = {
        "table_wise": lambda i: table_wise(rank=i % env.world_size, compute_kernel=kernel),
        "row_wise": lambda i: row_wise(compute_kernel=kernel),
        "column_wise": lambda i: column_wise(ranks=list(range(env.world_size)), compute_kernel=kernel),
        "data_parallel": lambda i: data_parallel(),
    }[sharding]
    per_table = {name: fixed(i) for i, name in enumerate(tables)}
    plan = construct_module_sharding_plan(
        collection, per_table, sharder=sharder, local_size=local_world, world_size=env.world_size, device_type=env.device.type
    )
    return ShardingPlan({attribute: plan})


def shard(module: TableModule | RowModule, sharding: Sharding, cfg: SparseConfig, env: DistEnv, frozen: bool = False) -> ShardedTables:
    if frozen:
        # Frozen tables: fused kernel with a stateless optimizer that never runs (no backward reaches them).
        kernel = EmbeddingComputeKernel.FUSED.value
        fused = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.0}
    else:
        kernel = compute_kernel(cfg, sharding, env.device)
        fused = _fused_optimizer(cfg)
        if kernel == EmbeddingComputeKernel.DENSE.value and sharding in ("row_wise", "column_wise"):
            # torch.distributed.checkpoint would keep one rank's optimizer state for every shard (same key, plain
            # tensors), so a resume would load it into the other ranks' rows or columns.
            raise ConfigError(
                f"sparse.sharding={sharding} with sparse.optimizer={cfg.optimizer} on {env.device.type}: this runs the dense "
                "kernel, whose optimizer state cannot be checkpointed per shard; use sparse.sharding=auto, table_wise or "
                "data_parallel, or a fused optimizer (rowwise_adagrad, adagrad, sgd)"
            )
    if sharding == "column_wise":
        check_column_shards(module.table_dims(), env.world_size, "sparse.llm_sharding" if frozen else "sparse.sharding")
    sharder = module.sharder(fused_params=fused)
    plan = make_plan(module, sharding, kernel, sharder, env, None if frozen else cfg.optimizer)
    dmp = DistributedModelParallel(module, device=env.device, plan=plan, sharders=[sharder])
    (module_plan,) = plan.plan.values()
    summary = {name: (p.sharding_type, p.compute_kernel, p.ranks) for name, p in module_plan.items()}
    dense_tables = [name for name, (_, k, _) in summary.items() if k == EmbeddingComputeKernel.DENSE.value]
    optimizer = None
    if dense_tables and not frozen:
        params = {n: p for n, p in dmp.named_parameters() if p.numel() > 0 and any(f".{t}." in n for t in dense_tables)}
        # None on a rank that holds no table (table-wise over more ranks than tables): torch refuses an empty one.
        optimizer = KeyedOptimizerWrapper(params, _torch_optimizer(cfg)) if params else None
    tables = ShardedTables(module=dmp, dense_optimizer=optimizer, plan=summary, pooled=module.pooled)
    if frozen:
        _freeze(dmp)
    else:
        _skip_weight_gradients(dmp)
    return tables


def _skip_weight_gradients(dmp: DistributedModelParallel) -> None:
    """Spare fbgemm the gradient of the bags' per-sample weights when they need none.

    fbgemm's table-batched backward also differentiates the per-sample weights whenever a lookup has them,
    unless `feature_requires_grad` says per feature that no gradient is wanted, and TorchRec never passes
    it. Ours are propagation coefficients, data: on this CPU that unused gradient was most of the table
    backward (3 to 4.5 times the lookup's time without it, bench/weighted_lookup.py). The tables'
    gradients and updates are unchanged bit for bit.
    """
    for module in _table_batched_modules(dmp):
        module.forward = _without_weight_gradients(module.forward, module.feature_dims.numel())


def _without_weight_gradients(forward: Callable, features: int) -> Callable:
    def lookup(indices, offsets, per_sample_weights=None, feature_requires_grad=None, **kwargs):
        if per_sample_weights is not None and feature_requires_grad is None and not per_sample_weights.requires_grad:
            feature_requires_grad = torch.zeros(features, dtype=torch.int32, device=per_sample_weights.device)
        return forward(indices, offsets, per_sample_weights=per_sample_weights, feature_requires_grad=feature_requires_grad, **kwargs)

    return lookup


def _table_batched_modules(dmp: DistributedModelParallel):
    """The fbgemm modules that hold a sharded collection's tables (TorchRec keeps its lookups, and any DDP
    around them, out of the module tree)."""
    (collection,) = dmp._dmp_wrapped_module.children()
    for lookup in collection._lookups:
        for module in lookup.modules():
            if isinstance(module, (DenseTableBatchedEmbeddingBagsCodegen, SplitTableBatchedEmbeddingBagsCodegen)):
                yield module


def _freeze(dmp: DistributedModelParallel) -> None:
    """Stop autograd at the frozen tables' storage, so no backward runs through them."""
    for module in _table_batched_modules(dmp):
        for param in module.parameters(recurse=False):
            param.requires_grad_(False)


def init_rows(seed: int, table: str, num_rows: int, dim: int, cfg: SparseConfig) -> Callable[[int, int], np.ndarray]:
    """Initial values of rows [start, end), the same whatever the sharding and world size.

    Rows come in fixed chunks, each drawn from a generator seeded by (seed, table, chunk).
    """
    bound = float(np.sqrt(6.0 / (num_rows + dim)))

    def chunk(index: int) -> np.ndarray:
        digest = hashlib.blake2b(f"{seed}:{table}:{index}".encode(), digest_size=8).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        rows = min(FILL_CHUNK_ROWS, num_rows - index * FILL_CHUNK_ROWS)
        if cfg.init == "xavier_uniform":
            return rng.uniform(-bound, bound, size=(rows, dim)).astype(np.float32)
        return (rng.standard_normal((rows, dim)) * cfg.init_std).astype(np.float32)

    def rows(start: int, end: int) -> np.ndarray:
        first, last = start // FILL_CHUNK_ROWS, (end - 1) // FILL_CHUNK_ROWS
        block = np.concatenate([chunk(i) for i in range(first, last + 1)])
        offset = first * FILL_CHUNK_ROWS
        return block[start - offset : end - offset]

    return rows


def trainable_table_configs(sizes: dict[str, int], dim: int, features: dict[str, list[str]]) -> list[EmbeddingBagConfig]:
    """The user_id / item_id tables, given rows and feature names per kind ("user", "item")."""
    return [
        EmbeddingBagConfig(name=f"{kind}_id", embedding_dim=dim, num_embeddings=rows, feature_names=features[kind], pooling=PoolingType.SUM)
        for kind, rows in sizes.items()
    ]


def llm_table_configs(shapes: dict[str, tuple[int, int]], features: dict[str, list[str]], dtype: str) -> list[EmbeddingConfig]:
    """The frozen user_llm / item_llm tables, given (rows, width) and feature names per kind."""
    data_type = {"fp32": DataType.FP32, "fp16": DataType.FP16}[dtype]
    return [
        EmbeddingConfig(name=f"{kind}_llm", embedding_dim=width, num_embeddings=rows, feature_names=features[kind], data_type=data_type)
        for kind, (rows, width) in shapes.items()
    ]


def trainable_tables(
    num_users: int, num_items: int, dim: int, features: dict[str, list[str]], cfg: SparseConfig, env: DistEnv, seed: int,
    frozen: bool = False,
) -> ShardedTables:
    """The user and item tables (names user_id / item_id), sharded, initialised from the seed. frozen: for a model
    that only ranks, without optimizer state, so that any sharding serves whatever optimizer trained them."""
    sizes = {"user": num_users, "item": num_items}
    tables = shard(TableModule(trainable_table_configs(sizes, dim, features)), cfg.sharding, cfg, env, frozen=frozen)
    for kind, count in sizes.items():
        tables.fill(f"{kind}_id", init_rows(seed, f"{kind}_id", count, dim, cfg))
    return tables


def llm_tables(embeddings: dict[str, np.ndarray], features: dict[str, list[str]], cfg: SparseConfig, env: DistEnv) -> ShardedTables:
    """The frozen LLM-embedding tables (user_llm / item_llm), each rank loading only its shard rows."""
    narrow = [kind for kind, matrix in embeddings.items() if matrix.shape[1] % 4]
    if narrow:  # fbgemm's kernels would assert it on every rank
        raise ConfigError(f"the dataset's LLM embeddings are {embeddings[narrow[0]].shape[1]} wide, and the frozen LLM tables "
                          "need a multiple of 4 (fbgemm's kernels); prepare the dataset with such an embedding width, or train "
                          "with align.method=none")
    configs = llm_table_configs({kind: matrix.shape for kind, matrix in embeddings.items()}, features, cfg.llm_dtype)
    tables = shard(RowModule(configs), cfg.llm_sharding, cfg, env, frozen=True)
    for kind, matrix in embeddings.items():
        tables.fill(f"{kind}_llm", lambda start, end, m=matrix: np.asarray(m[start:end], dtype=np.float32))
    return tables
