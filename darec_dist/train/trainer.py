"""The model in one place: sharded tables (TorchRec) + dense part (DeepSpeed), and one training step."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import numpy as np
import torch

from darec_dist.config import ConfigError
from darec_dist.data.dataset import PreparedDataset
from darec_dist.data.features import EGO_FEATURES, EGO_TABLE, GROUPS, LLM_FEATURES, BatchFeatures, FeatureBuilder, node_feature, pad_bags
from darec_dist.data.loader import local_batch_size
from darec_dist.distributed.collectives import max_over_ranks
from darec_dist.distributed.env import DistEnv, rank_seed
from darec_dist.models.aligners import AlignInputs, build_aligner
from darec_dist.models.backbones import output_dim, propagation_rows
from darec_dist.models.dense import DenseArch
from darec_dist.models.masking import masked_nodes, step_salt, without_masked_entries
from darec_dist.models.tables import ShardedTables, llm_tables, trainable_tables
from darec_dist.train.config import TrainConfig, resolve_path


def feature_builder(cfg: TrainConfig, dataset: PreparedDataset, aligner, world_size: int) -> FeatureBuilder:
    """The batch builder for this model: its propagation rows, and the LLM rows its aligner reads."""
    rows = propagation_rows(cfg.model, dataset)
    if aligner.needs_graph_context and rows is None:
        raise ConfigError(
            f"align.method={cfg.align.method} needs a graph backbone (model.backbone=lightgcn or gccf): its loss reaches "
            f"the tables only through a node's graph context, which model.backbone={cfg.model.backbone} does not have"
        )
    llm_rows = aligner.llm_rows(local_batch_size(cfg.loader, world_size), world_size)
    blocks = dataset.graph_blocks if rows is not None else 1
    return FeatureBuilder(dataset.num_users, rows, aligner.llm_groups, llm_rows, blocks)


def deepspeed_engine(module: torch.nn.Module, cfg: TrainConfig, env: DistEnv):
    """A DeepSpeed engine that owns every dense parameter; None when there are none (plain backbones)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return None
    # DeepSpeed fixes its accelerator on first import: make it the run's device (DS_ACCELERATOR, if set, wins).
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if env.device.type == "cuda" else "cpu")
    import deepspeed
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != env.device.type:
        raise ConfigError(
            f"DeepSpeed's accelerator is {get_accelerator().device_name()!r} but device={env.device.type}: "
            f"set DS_ACCELERATOR={env.device.type} (or unset it)"
        )
    if env.device.type == "cpu":
        # Skips a ~60 s JIT build of DeepSpeed's shared-memory all-reduce; gloo does the work on CPU.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # Unless told the device, DeepSpeed moves itself to cuda:LOCAL_RANK, which is no device where each process sees
    # only its own GPU (pick_device then chose cuda:0).
    device_choice = SimpleNamespace(device_rank=env.device.index) if env.device.type == "cuda" else None
    engine, _, _, _ = deepspeed.initialize(
        args=device_choice, model=module, model_parameters=params, config=deepspeed_settings(cfg, env.world_size),
        dist_init_required=False,
    )
    return engine


def deepspeed_settings(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON of `dense.deepspeed_config`, with the batch sizes and `dense.lr` of this run."""
    path = resolve_path(cfg.dense.deepspeed_config)
    if not path.is_file():
        raise ConfigError(f"dense.deepspeed_config: {path} does not exist (a DeepSpeed JSON, e.g. configs/deepspeed/zero0.json)")
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"dense.deepspeed_config: {path} is not valid JSON ({err})") from None
    check_deepspeed_settings(settings, path)
    settings.update(
        train_batch_size=cfg.loader.batch_size,
        train_micro_batch_size_per_gpu=cfg.loader.batch_size // world_size,
        gradient_accumulation_steps=1,
    )
    if cfg.dense.lr is not None:
        if "params" not in settings.get("optimizer", {}):
            raise ConfigError(f"dense.lr is set but {path} has no optimizer.params to set it in")
        settings["optimizer"]["params"]["lr"] = cfg.dense.lr
    check_adam_step(settings["optimizer"], path)
    return settings


def check_adam_step(optimizer: dict, path) -> None:
    """Adam's first step is lr / (1 - beta1), a float32 scalar: past float32's range torch raises in the middle of it."""
    params = optimizer.get("params")
    if str(optimizer.get("type")).lower() not in ("adam", "adamw") or not isinstance(params, dict):
        return  # DeepSpeed names a malformed section itself
    lr, betas = params.get("lr", 1e-3), params.get("betas", [0.9, 0.999])
    beta1 = betas[0] if isinstance(betas, list) and betas else None
    if not all(isinstance(value, (int, float)) and math.isfinite(value) for value in (lr, beta1)):
        raise ConfigError(f"{path}: optimizer.params lr and betas must be finite numbers, got lr {lr!r}, betas {betas!r}")
    if beta1 < 1 and lr / (1 - beta1) > torch.finfo(torch.float32).max:
        raise ConfigError(f"the dense learning rate {lr} (dense.lr or {path}'s optimizer.params.lr) makes Adam's first step, "
                          f"lr / (1 - beta1) = {lr / (1 - beta1):g}, past float32's range")


# Not how the dense part learns: set by the trainer from loader.batch_size and the world size, or DeepSpeed's reporting.
NOT_TRAINING_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "steps_per_print",
                     "wall_clock_breakdown", "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger",
                     "flops_profiler", "memory_breakdown", "dump_state")


def dense_training_settings(cfg: TrainConfig) -> dict:
    """How the dense part learns: dense.deepspeed_config's contents with dense.lr, less the batch sizes and reporting.
    A run records it (its checkpoints, RUN_DIR/deepspeed.json): the config names the file, whose contents may change."""
    return {key: value for key, value in deepspeed_settings(cfg, 1).items() if key not in NOT_TRAINING_KEYS}


def check_deepspeed_settings(settings: dict, path) -> None:
    """Refuse before training what this trainer does not do with the dense part (each crashed mid-run)."""
    stage = settings.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(
            f"dense.deepspeed_config: {path} asks for ZeRO stage {stage}; use 0, 1 or 2 (stage 3 partitions the dense "
            "parameters themselves, which the aligners' in-place initialisation and the checkpoints here do not handle)"
        )
    for precision in ("fp16", "bf16"):
        if settings.get(precision, {}).get("enabled"):
            raise ConfigError(
                f"dense.deepspeed_config: {path} enables {precision}; the dense part trains in fp32 here (its inputs are "
                "the tables' fp32 rows), so leave it out"
            )
    if "optimizer" not in settings:
        raise ConfigError(f"dense.deepspeed_config: {path} has no optimizer section; DeepSpeed owns the dense optimizer "
                          "(see configs/deepspeed/zero0.json)")
    if settings.get("gradient_accumulation_steps", 1) != 1:
        raise ConfigError(f"dense.deepspeed_config: {path} sets gradient_accumulation_steps; the trainer steps once per "
                          "batch (loader.batch_size is the global batch): leave it out")


class Trainer:
    def __init__(self, cfg: TrainConfig, env: DistEnv, dataset: PreparedDataset, ranking_only: bool = False):
        """ranking_only: a model that only ranks (an evaluation): without the frozen LLM tables, which only the
        alignment losses read and which are the largest tables at scale (launch/plan.py), and without the trainable
        tables' optimizer state (so any sharding serves)."""
        self.cfg, self.env, self.dataset = cfg, env, dataset
        self.dim = output_dim(cfg.model, dataset)
        # The dense initialisation: the same on every rank and for every world size, whatever drew from torch's
        # generator before. Rank 0's stream (seed_everything), which DeepSpeed's broadcast of rank 0's weights
        # made every rank's before this reseed: recorded runs keep their initial weights.
        torch.manual_seed(rank_seed(cfg.seed, 0))
        self.aligner = build_aligner(cfg.align, self.dim, dataset.embedding_dim, cfg.seed, input_dim=cfg.model.dim)
        self.features = feature_builder(cfg, dataset, self.aligner, env.world_size)
        # Node key of a row entry = its table-local id + this offset, per propagation-row feature (for masking).
        self.row_key_offsets = {
            node_feature(kind, b): offset
            for kind, offset in (("user", 0), ("item", dataset.num_users))
            for b in range(self.features.rows.blocks)
        }
        table_features = {kind: self.features.feature_names(kind) for kind in ("user", "item")}
        self.tables: ShardedTables = trainable_tables(
            dataset.num_users, dataset.num_items, cfg.model.dim, table_features, cfg.sparse, env, cfg.seed, frozen=ranking_only
        )
        self.llm: ShardedTables | None = None
        if self.aligner.uses_llm and not ranking_only:
            features = {kind: self.features.llm_feature_names(kind) for kind in ("user", "item")}
            embeddings = {kind: dataset.embeddings(kind) for kind, names in features.items() if names}
            self.llm = llm_tables(embeddings, {kind: features[kind] for kind in embeddings}, cfg.sparse, env)
        # Building the tables draws from torch's generator (TorchRec initialises their storage before the seeded
        # rows replace it): reseeded so that training's draws (RLMRec-Gen's masks) start from the run's seed alone.
        torch.manual_seed(cfg.seed)
        self.dense = DenseArch(self.aligner, cfg.model.reg).to(env.device)
        self.engine = deepspeed_engine(self.dense, cfg, env)
        self._stepped = False  # see train_step
        self.nonfinite = False  # this rank's last loss, then (after the next step's lookup) any rank's: see losses()

    def weights_finite(self) -> bool:
        """Whether every weight this rank holds (its shards of the trainable tables, the dense part) is a finite number."""
        shards = (shard for table in self.tables.plan for _, _, shard in self.tables.local_shards(table))
        return all(bool(torch.isfinite(w).all()) for w in (*shards, *self.dense.parameters()))

    def losses(self, batch: BatchFeatures) -> dict[str, torch.Tensor]:
        sizes = batch.group_sizes()
        # Ranks look up different numbers of distinct nodes, but TorchRec's pooled output collectives
        # need the same bag count on every rank in their backward (under gloo: ReduceScatterV's all-gather).
        # Whether any rank's previous loss was not finite rides along, so that every rank stops on it at the same step.
        stride, nonfinite = max_over_ranks(batch.sparse.stride(), int(self.nonfinite))
        self.nonfinite = bool(nonfinite)
        sparse = pad_bags(batch.sparse, stride).to(self.env.device)
        node_index = {g: i.to(self.env.device) for g, i in batch.node_index.items()}
        # Node keys equal across ranks, users' apart from items'.
        after_users = self.dataset.num_users
        keys = (("user", batch.users), ("pos", batch.pos + after_users), ("neg", batch.neg + after_users))
        ids = {g: k.to(self.env.device) for g, k in keys}
        mask = {}
        ratio = self.aligner.input_mask_ratio
        if ratio:
            salt = step_salt()
            sparse, weight = without_masked_entries(sparse, self.row_key_offsets, salt, ratio)
            per_node = torch.stack(
                [weight[node_feature("user", b)] + weight[node_feature("item", b)] for b in range(self.features.rows.blocks)], dim=1
            )
            mask = {"masked_weight": {g: per_node[node_index[g]] for g in GROUPS},
                    "masked": {g: masked_nodes(ids[g], salt, ratio) for g in GROUPS}}
        pooled = self.tables.lookup(sparse)
        nodes = self.combine_blocks(pooled)
        collab = {g: nodes[node_index[g]] for g in GROUPS}
        if self.features.with_ego:
            ego = {g: pooled[EGO_FEATURES[g]][: sizes[g]] for g in GROUPS}
        else:  # identity rows: the input embeddings are the collaborative ones
            ego = collab
        llm = None
        if self.llm is not None:
            with torch.no_grad():
                looked_up = self.llm.lookup(batch.llm.to(self.env.device))
            llm = {g: looked_up[LLM_FEATURES[EGO_TABLE[g]]][i.to(self.env.device)] for g, i in batch.llm_index.items()}
        return (self.engine or self.dense)(AlignInputs(collab, llm, ego, ids, **mask))

    def train_step(self, batch: BatchFeatures) -> dict[str, torch.Tensor]:
        """One step: forward, one backward through dense and sparse parts, optimizer steps."""
        losses = self.losses(batch)
        if self.engine is not None:
            if not self._stepped:
                # An aligner may initialise parameters in place from its first batch (DaRec's k-means centres).
                # ZeRO stages 1 and 2 step a separate fp32 master copy, which would overwrite that write unless it
                # takes the module's values first (stage 0 has no such copy).
                refresh = getattr(self.engine.optimizer, "refresh_fp32_params", None)
                if refresh is not None:
                    refresh()
                self._stepped = True
            self.engine.backward(losses["total"])
            self.engine.step()
        else:
            losses["total"].backward()
        # Fused tables already stepped inside the backward; dense-kernel tables step now.
        self.tables.step()
        return {name: value.detach() for name, value in losses.items()}

    @torch.no_grad()
    def node_embeddings(self, nodes: np.ndarray, calls: int) -> torch.Tensor:
        """Collaborative embeddings of node ids, in `calls` chunked lookups (equal on all ranks: they are collective)."""
        chunk = self.cfg.eval.node_chunk
        out = []
        with self.tables.optimizer_step_kept():
            for c in range(calls):
                part = nodes[c * chunk : (c + 1) * chunk]
                features, index = self.features.node_features({"user": part})
                pooled = self.tables.lookup(features.to(self.env.device))
                out.append(self.combine_blocks(pooled)[torch.from_numpy(index["user"]).to(self.env.device)])
        return torch.cat(out)[: len(nodes)] if out else torch.zeros(0, self.dim)

    def combine_blocks(self, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        """Node embeddings from the pooled bags: per row block, the user- and item-table sums added; blocks concatenated."""
        blocks = [pooled[node_feature("user", b)] + pooled[node_feature("item", b)] for b in range(self.features.rows.blocks)]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)

    def set_train(self, mode: bool) -> None:
        self.dense.train(mode)
        self.tables.module.train(mode)

