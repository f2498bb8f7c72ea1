"""The trainer's settings (configs/train/*.yaml), as typed dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from darec_dist.data.loader import LoaderConfig
from darec_dist.models.aligners import AlignConfig
from darec_dist.models.backbones import ModelConfig
from darec_dist.models.tables import SparseConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class DataConfig:
    path: str = ""
    # Check every tar's and array's sha256 against the manifest before training.
    verify_checksums: bool = True


@dataclass
class DenseConfig:
    # DeepSpeed JSON (ZeRO stage, optimizer); batch sizes are filled in from loader.batch_size.
    deepspeed_config: str = "configs/deepspeed/zero0.json"
    # Replaces the JSON optimizer's lr when set, so that a sweep over it needs no JSON per value.
    lr: float | None = None

    def __post_init__(self) -> None:
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"dense.lr must be > 0, got {self.lr}")


@dataclass
class LoopConfig:
    epochs: int = 100
    eval_every: int = 1
    # Stop after this many evaluations without a better validation eval.monitor ...
    patience: int = 10
    # ... but never before this many epochs (early epochs can peak on popularity, then dip).
    min_epochs: int = 0
    # Steps between the progress bar's loss readouts (the bar: rank 0, train.progress_bar).
    log_every: int = 20
    # Cap on steps per epoch (smoke tests, benchmarks); null = the full epoch.
    max_steps_per_epoch: int | None = None
    progress_bar: bool = True

    def __post_init__(self) -> None:
        if min(self.epochs, self.eval_every, self.patience, self.log_every) < 1 or self.min_epochs < 0:
            raise ValueError("train.epochs, train.eval_every, train.patience and train.log_every must be >= 1, train.min_epochs >= 0")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(f"train.max_steps_per_epoch must be >= 1 or null, got {self.max_steps_per_epoch}")


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    # The metric that picks the best epoch (validation) and drives early stopping.
    monitor: str = "recall@20"
    # false: no validation (for a refit on all of train, e.g. a dataset prepared with split.val_from_train=0):
    # exactly train.epochs epochs, then the final model is tested; take the epoch count from a validated run.
    validate: bool = True
    # Validate and test on a fixed, seeded sample of this many users (null: all users); for very large user sets.
    # results.json's sampled_users and results.md say so; export/ and launch/recommend.py still cover every user.
    max_users: int | None = None
    user_chunk: int = 1024
    node_chunk: int = 8192
    # Items scored per round (gathered from all ranks): bounds a rank's memory whatever the catalogue.
    item_block: int = 65536

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"eval.ks must be a non-empty list of cut-offs >= 1, got {self.ks}")
        if len(set(self.ks)) < len(self.ks):  # results.md would show a column twice
            raise ValueError(f"eval.ks lists a cut-off twice: {self.ks}")
        if min(self.user_chunk, self.node_chunk, self.item_block) < 1 or (self.max_users is not None and self.max_users < 1):
            raise ValueError("eval.user_chunk, eval.node_chunk, eval.item_block and eval.max_users must be >= 1")


@dataclass
class CheckpointConfig:
    every_epochs: int = 1
    # Also checkpoint inside an epoch every N steps (null = only at epoch ends).
    every_steps: int | None = None
    keep: int = 2

    def __post_init__(self) -> None:
        if self.every_epochs < 1 or self.keep < 1 or (self.every_steps is not None and self.every_steps < 1):
            raise ValueError("checkpoint.every_epochs and checkpoint.keep must be >= 1, checkpoint.every_steps >= 1 or null")


@dataclass
class OutputConfig:
    export_embeddings: bool = True
    plot: bool = True


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    dense: DenseConfig = field(default_factory=DenseConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    seed: int = 2024
    run_dir: str = "runs/default"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        if not self.run_dir.strip():  # an empty path is the working directory: the run would litter it
            raise ValueError("run_dir: required (the directory the run writes its checkpoints and results to)")
        # numpy's generators refuse a negative one, torch's one past 64 bits once the loader scales it (by about 1e6):
        # either in the first epoch, after the whole setup.
        if not 0 <= self.seed < 2**40:
            raise ValueError(f"seed must be in [0, 2**40), got {self.seed}")


def what_a_run_computes(settings: dict) -> dict:
    """A resolved config (to_dict) less where a run writes, how often it checkpoints and how it reports progress;
    loader.num_workers 0 (batches built in the rank's own process) reads the shards as one worker does."""
    kept = {key: value for key, value in settings.items() if key not in ("run_dir", "checkpoint")}
    kept["train"] = {key: value for key, value in settings["train"].items() if key not in ("progress_bar", "log_every")}
    kept["loader"] = {**settings["loader"], "num_workers": max(1, settings["loader"]["num_workers"])}
    kept["data"] = {key: value for key, value in settings["data"].items() if key != "verify_checksums"}
    return kept


def resolve_path(path: str) -> Path:
    """A path as given, else relative to the repository (so configs work from any directory)."""
    candidate = Path(path).expanduser()
    if candidate.exists() or candidate.is_absolute():
        return candidate
    return REPO_ROOT / candidate
