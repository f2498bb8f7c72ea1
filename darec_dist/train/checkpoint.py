"""Sharded checkpoints: tables and their optimizer state by torch.distributed.checkpoint, the dense
part by DeepSpeed, plus the loop position and every rank's RNG state.

A checkpoint is written under `.tmp-<name>`, marked COMPLETE and renamed only
after every rank has finished writing, so a crash mid-save never leaves a
directory that `latest()` would pick. It lists its files' sizes and sha256 digests, so one damaged
later (a file deleted, truncated or overwritten) is refused by name, and skipped by `latest()`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torchrec.optim.keyed import CombinedOptimizer

from darec_dist.config import ConfigError, differences, listed, to_dict
from darec_dist.data.layout import sha256_of
from darec_dist.distributed import collectives
from darec_dist.files import exclusive_lock, fsync, fsync_tree, reading_lock, replace_dir
from darec_dist.signals import ctrl_c_held

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
STATE = "state.json"
FILES = "files.json"
TABLE_STEPS = "table_optimizer_step"  # the fused optimizer's step count, kept beside the loop state
BEST = "best"
_STEP_NAME = re.compile(r"^step-(\d+)$")


def step_name(global_step: int) -> str:
    return f"step-{global_step:09d}"


def _table_optimizer(trainer) -> CombinedOptimizer:
    parts = [("fused", trainer.tables.module.fused_optimizer)]
    if trainer.tables.dense_optimizer is not None:
        parts.append(("dense", trainer.tables.dense_optimizer))
    return CombinedOptimizer(parts)


def _table_state(trainer, optimizer: CombinedOptimizer) -> dict:
    """The tables' part of a checkpoint: their rows and, where it holds any, their optimizer state.

    A stateless optimizer (SGD) leaves an empty entry per table, which torch.distributed.checkpoint saves as
    nothing and then fails to find on load; it is left out instead.
    """
    state = {"tables": trainer.tables.module.state_dict()}
    optim = optimizer.state_dict()
    optim["state"] = {key: value for key, value in optim["state"].items() if value}
    if optim["state"]:
        state["table_optim"] = optim
    return state


class CheckpointWriteError(RuntimeError):
    """A checkpoint's files could not be written (a full disk, a read-only run_dir)."""

    def __init__(self, message: str, staging: Path | None = None):  # a default: exceptions unpickle from their message
        super().__init__(message)
        self.staging = staging  # the same on every rank, unlike the cause and the free space each rank saw


# What a failed write says inside torch's and DCP's errors (the zip writer's own for a full disk).
WRITE_FAILURES = ("No space left", "Read-only file system", "Permission denied", "Disk quota", "inline_container")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(trainer, run_dir: str | Path, name: str, state: dict, keep: int | None = None) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    # Ctrl-C inside torch.distributed.checkpoint's collectives came out wrapped in a CheckpointException (a traceback,
    # not an interruption); held, it is taken once every rank has finished the save alike.
    with ctrl_c_held():
        return _save(trainer, run_dir, name, state, keep)


def _save(trainer, run_dir: str | Path, name: str, state: dict, keep: int | None) -> Path:
    root = Path(run_dir) / CHECKPOINTS
    final, staging = root / name, root / f".tmp-{name}"
    rank = collectives.rank()
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier()
    try:
        dcp.save(_table_state(trainer, _table_optimizer(trainer)), checkpoint_id=str(staging / "tables"))
        if trainer.engine is not None:
            trainer.engine.save_checkpoint(str(staging / "dense"), tag="engine", save_latest=False)
        torch.save(_rng_state(), staging / f"rng-rank{rank}.pt")
    # torch's writers report a full disk as a RuntimeError of the zip format, wrapped by DCP in a BaseException;
    # anything else (a peer lost in a collective, a bug) keeps its own error and traceback.
    except (OSError, RuntimeError, CheckpointException) as err:
        if isinstance(err, dist.DistError) or not (isinstance(err, OSError) or any(w in str(err) for w in WRITE_FAILURES)):
            raise
        if rank == 0:  # the space its parts hold, which the next attempt needs
            shutil.rmtree(staging, ignore_errors=True)
        free = shutil.disk_usage(root).free / 2**20
        cause = [line for line in str(err).splitlines() if line.strip()][-1:] or [type(err).__name__]
        raise CheckpointWriteError(f"{staging}: writing the checkpoint failed ({cause[0].strip()}); {free:,.0f} MiB free "
                                   "there. The run's last complete checkpoint is kept: free space, then resume with "
                                   "--resume auto", staging) from err
    # Every rank's count: rank 0 may hold no table of its own (a plan that puts them all elsewhere) and count none.
    table_steps = collectives.max_over_ranks(trainer.tables.optimizer_step)[0]
    fsync_tree(staging)  # each rank its own files (on a shared filesystem, another node's are not in its cache)
    _barrier()
    # Every rank's view of the folder, not rank 0's alone: on NFS its cached listing may lack another node's files,
    # which then went unchecked by a load; each rank sees those it wrote, and a file opened by name is read afresh.
    views = collectives.every_rank([str(f.relative_to(staging)) for f in staging.rglob("*") if f.is_file()])
    if rank == 0:
        (staging / STATE).write_text(json.dumps({**state, TABLE_STEPS: table_steps}, indent=2))
        listing = {}
        for name in sorted(set().union(*views, [STATE])):
            digest = sha256_of(staging / name)  # (first: the open refreshes the size a stale cache may hold)
            listing[name] = {"bytes": (staging / name).stat().st_size, "sha256": digest}
        (staging / FILES).write_text(json.dumps(listing, indent=1))
        (staging / COMPLETE).write_text("")
        for written in (staging / STATE, staging / FILES, staging / COMPLETE, staging):  # the rest: every rank, above
            fsync(written)
        replace_dir(staging, final)
        if keep is not None:
            _prune(root, keep)
    _barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    steps = [p for p in step_checkpoints(root.parent) if (p / COMPLETE).exists()]
    for old in steps[:-keep]:
        # One being read (load_weights: launch/evaluate.py on this running run) is left to a later save.
        with exclusive_lock(old) as unread:
            if unread:
                # Renamed first: one half-removed by a kill no longer looks like a step checkpoint, and goes with the
                # other leftovers (recover_interrupted_writes).
                retired = old.with_name(f".{old.name}.old-{uuid.uuid4().hex[:8]}")
                os.replace(old, retired)
                shutil.rmtree(retired, ignore_errors=True)


def belongs_to(path: Path, run_dir: Path) -> bool:
    """Whether a checkpoint directory is one of run_dir's (RUN_DIR/checkpoints/NAME)."""
    resolved = path.resolve()
    return resolved.parent.name == CHECKPOINTS and resolved.parent.parent == run_dir.resolve()


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's step checkpoints, oldest first, complete or not."""
    root = Path(run_dir) / CHECKPOINTS
    return sorted(p for p in root.iterdir() if _STEP_NAME.match(p.name)) if root.is_dir() else []


def recover_interrupted_writes(run_dir: str | Path) -> None:
    """Undo what a job killed while writing checkpoints left behind. The best model that a kill between replace_dir's
    two renames moved aside (`best` is then missing, the one it replaced lies hidden beside it) is put back: what the
    run's step checkpoints say of `best` was written for that one. Then the staging directories and retired copies
    go (the space they hold). Call it where no job writes (a resume, holding the run_dir's lock), from one process."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / BEST
    if not final.exists():
        moved = sorted(root.glob(f".{BEST}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in moved:  # newest first; one half-removed by a killed clean-up is damaged
            if (old / COMPLETE).exists() and damage(old, contents=True) is None:
                os.replace(old, final)
                break
    for leftover in [*root.glob(".tmp-*"), *root.glob(".*.old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def newer_than(run_dir: str | Path, global_step: int) -> list[Path]:
    """A run's step checkpoints written after global_step, complete or not, oldest first."""
    return [p for p in step_checkpoints(run_dir) if int(_STEP_NAME.match(p.name)[1]) > global_step]


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete and undamaged step checkpoint of a run (its contents' digests checked), or None."""
    done = [p for p in step_checkpoints(run_dir) if (p / COMPLETE).exists()]
    for path in reversed(done):
        problem = damage(path, contents=True)
        if problem is None:
            return path
        if collectives.rank() == 0:
            print(f"warning: skipping the damaged checkpoint {path} ({problem})", file=sys.stderr, flush=True)
    return None


def damage(path: Path, contents: bool = False) -> str | None:
    """What is missing from the checkpoint or differs from the file list it was written with (None: nothing).

    Sizes are always compared; contents=True also compares every file's sha256 (reading the whole checkpoint), as
    done before its tensors are loaded and when latest() chooses one: a same-size corruption would load silently.
    """
    if not (path / STATE).is_file():
        return f"{STATE} is missing"
    listing = path / FILES
    if not listing.exists():  # without it nothing else could be checked
        return f"{FILES} is missing (damaged, or written by darec-dist before 2026-12-05)"
    try:
        written = json.loads(listing.read_text())
    except ValueError:
        written = None
    if not isinstance(written, dict):
        return f"{FILES} is unreadable"
    for name, entry in written.items():
        # Lists written by darec-dist before 2026-12-06 hold sizes only.
        entry = entry if isinstance(entry, dict) else {"bytes": entry}
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry.get("bytes"):
            return f"{name} holds {file.stat().st_size} bytes, {entry.get('bytes')} were written"
        if contents and "sha256" in entry and sha256_of(file) != entry["sha256"]:
            return f"{name}'s sha256 differs from the one it was written with"
    return None


def identity(cfg, dataset) -> dict:
    """What a checkpoint's contents depend on: the model and aligner config, and the dataset (node counts, LLM
    width, and its content's fingerprint: a dataset re-prepared with another split or graph has the same shape).

    Saved in every checkpoint's loop state; a checkpoint loads only where it is the same (check_identity),
    so a resume or an evaluation never fills a model of another shape or meaning with its tensors.
    """
    return json.loads(json.dumps({
        "model": to_dict(cfg.model), "align": to_dict(cfg.align),
        "dataset": {"users": dataset.num_users, "items": dataset.num_items, "embedding_dim": dataset.embedding_dim,
                    "fingerprint": dataset.fingerprint},
    }))


# Config keys added since checkpoints were first written, with the value every checkpoint written before them was
# trained under: one that lacks such a key is read as holding that value (any other key it lacks is refused).
IMPLIED_WHEN_ABSENT = {"align.projector_init": "torch"}


def with_implied(saved: dict) -> dict:
    """A copy of a checkpoint's identity or config with IMPLIED_WHEN_ABSENT's keys filled in where absent."""
    filled = json.loads(json.dumps(saved))
    for dotted, value in IMPLIED_WHEN_ABSENT.items():
        *parents, last = dotted.split(".")
        node = filled
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.setdefault(last, value)
    return filled


def check_identity(path: str | Path, current: dict) -> None:
    """Refuse a checkpoint written for another model config or dataset, naming the keys that differ."""
    saved = with_implied(loop_state(path)["identity"])
    lacking = _absent(saved, current)
    if lacking:  # a key identity() has gained since: nothing tells what this checkpoint's value was
        raise ConfigError(f"{path}: written by an earlier darec-dist (its identity lacks {listed(lacking)}), so it cannot be "
                          "checked against this model and dataset; train it again with this release")
    differ = differences(saved, current)
    if differ:
        hint = (" (dataset.fingerprint digests the dataset's checksums: its split, graph, embeddings or shards differ, "
                "the embeddings' last bits already under another spark.shuffle_partitions; give data.path the dataset "
                "this run trained on)") if any(d.startswith("dataset.fingerprint") for d in differ) else ""
        raise ConfigError(f"{path}: written for another model or dataset (checkpoint -> now): {listed(differ)}{hint}")


def _absent(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys of current that saved does not hold."""
    found = []
    for key, value in current.items():
        if key not in saved:
            found.append(prefix + key)
        elif isinstance(value, dict) and isinstance(saved[key], dict):
            found += _absent(saved[key], value, f"{prefix}{key}.")
    return found


def check_complete(path: Path, contents: bool = False) -> None:
    """Refuse a checkpoint that is missing, incomplete or damaged; contents=True: see damage()."""
    if not path.is_dir():
        raise ConfigError(f"{path}: no such checkpoint directory")
    if not (path / COMPLETE).exists():
        raise ConfigError(f"{path}: not a complete checkpoint (no {COMPLETE} marker); refusing to load it")
    problem = damage(path, contents)
    if problem:
        raise ConfigError(f"{path}: damaged since it was written ({problem}); refusing to load it (--resume auto "
                          "takes the newest undamaged checkpoint)")


def loop_state(path: str | Path) -> dict:
    """The loop position saved with a complete checkpoint (epoch, step, best, world size, ...), read without loading it."""
    path = Path(path)
    check_complete(path)
    try:
        return json.loads((path / STATE).read_text())
    except ValueError as err:
        raise ConfigError(f"{path / STATE}: unreadable ({err}); the checkpoint is damaged") from None


def _load_tables(state: dict, path: Path) -> None:
    """Collective: read the tables' part of `state` from the checkpoint (torch.distributed.checkpoint reshards it)."""
    try:
        dcp.load(state, checkpoint_id=str(path / "tables"))
    except CheckpointException as err:  # every rank's error, with its traceback, in a BaseException
        cause = ([line.strip() for line in str(err).splitlines() if line.strip()][-1:] or [type(err).__name__])[0]
        raise ConfigError(f"{path}: its tables could not be loaded into this run's ({cause})") from None


def _load_engine(trainer, path: Path, **options) -> None:
    """The dense part's DeepSpeed state (none without an aligner)."""
    if trainer.engine is not None:
        loaded, _ = trainer.engine.load_checkpoint(str(path / "dense"), tag="engine", **options)
        if loaded is None:
            raise ConfigError(f"{path / 'dense'}: DeepSpeed found no engine state to load; the checkpoint is damaged")


def load_weights(trainer, path: str | Path) -> dict:
    """Collective: restore only the model (table rows and dense module), for evaluation at any world size.

    torch.distributed.checkpoint reshards the tables to this run's plan; the optimizer states, which
    DeepSpeed's ZeRO stages partition by world size, are not read. Returns the checkpoint's loop state.
    """
    path = Path(path)
    check_complete(path)  # a missing or unfinished one named as such, before the lock would wait for it
    with reading_lock(path):  # neither pruned nor replaced (a running run's `best`) while digested and read
        check_complete(path, contents=True)
        state = {"tables": trainer.tables.module.state_dict()}
        _load_tables(state, path)
        trainer.tables.module.load_state_dict(state["tables"])
        _load_engine(trainer, path, load_module_only=True, load_optimizer_states=False, load_lr_scheduler_states=False)
        return loop_state(path)


def load(trainer, path: str | Path) -> dict:
    """Collective: restore tables, table optimizer, dense engine and this rank's RNG; returns the loop state."""
    path = Path(path)
    check_complete(path, contents=True)
    optimizer = _table_optimizer(trainer)
    # Lazily created optimizer state (torch Adam) must exist before it can be loaded into.
    optimizer.init_state()
    state = _table_state(trainer, optimizer)
    _load_tables(state, path)
    trainer.tables.module.load_state_dict(state["tables"])
    if "table_optim" in state:
        optimizer.load_state_dict(state["table_optim"])
    saved = loop_state(path)
    trainer.tables.set_optimizer_step(saved[TABLE_STEPS])
    _load_engine(trainer, path)
    restore_rng(path, collectives.rank())
    return saved


def restore_rng(path: Path, rank: int) -> None:
    """This rank's generators as saved. A rank the saved run did not have (a resume on more processes) takes rank 0's
    torch generator, which every rank shares (RLMRec-Gen's masks are drawn from it: left as seeded, the new ranks
    masked other nodes than the old ones), and keeps numpy's and Python's, which are each rank's own."""
    own = path / f"rng-rank{rank}.pt"
    if own.exists():
        _set_rng_state(torch.load(own, weights_only=False))
    else:
        torch.set_rng_state(torch.load(path / "rng-rank0.pt", weights_only=False)["torch"])
