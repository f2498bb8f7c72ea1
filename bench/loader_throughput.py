"""Loader throughput: interactions per second the training loader delivers, ready as KeyedJaggedTensors.

    python bench/loader_throughput.py --data data/amazon-book --train-config configs/train/amazon-book.yaml \
        --workers 1 2 --steps 60

Runs the trainer's own loader (WebDataset shards, shuffle buffer, negative sampling with
rejection, propagation rows of every batch node, KJT building) for one rank of a world of
`--world-size` ranks, with no training, and prints interactions per second per rank and for
all ranks together. Compare with what a training step consumes (bench/step_time.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.cli import at_least  # noqa: E402  (needs the path above)


def measure(args: argparse.Namespace, workers: int) -> float:
    from darec_dist.config import load_config
    from darec_dist.data.dataset import PreparedDataset
    from darec_dist.data.loader import check_world_fits, epoch_batches
    from darec_dist.models.aligners import build_aligner
    from darec_dist.train.config import TrainConfig, resolve_path
    from darec_dist.train.trainer import feature_builder

    cfg = load_config(TrainConfig, args.train_config, [f"data.path={args.data}", f"loader.num_workers={workers}", *args.override])
    dataset = PreparedDataset.open(resolve_path(cfg.data.path), verify_checksums=False)
    check_world_fits(dataset, args.world_size, workers)  # as training does: too many ranks for the shards, by name
    aligner = build_aligner(cfg.align, cfg.model.dim, dataset.embedding_dim)
    features = feature_builder(cfg, dataset, aligner, args.world_size)
    # This process plays rank 0 of the world: split_by_node reads these.
    os.environ.update(RANK="0", WORLD_SIZE=str(args.world_size))
    count, started = 0, None
    for step, batch in enumerate(epoch_batches(dataset, cfg.loader, features, cfg.seed, 0, args.world_size)):
        if step == args.warmup:
            started, count = time.perf_counter(), 0
        count += len(batch)
        if step + 1 >= args.warmup + args.steps:
            break
    measured = step + 1 - args.warmup
    if started is None or count == 0 or measured < args.steps:  # a rate over fewer batches than asked, unsaid, misleads
        raise SystemExit(f"an epoch holds {step + 1} batches here, fewer than --warmup {args.warmup} + --steps "
                         f"{args.steps}; lower --steps or --warmup")
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--train-config", default="configs/train/default.yaml")
    parser.add_argument("--workers", type=at_least(0), nargs="+", default=[0, 1, 2])
    parser.add_argument("--world-size", type=at_least(1), default=2)
    parser.add_argument("--steps", type=at_least(1), default=40)
    parser.add_argument("--warmup", type=at_least(0), default=3)
    parser.add_argument("--override", nargs="*", default=[])
    args = parser.parse_args()
    from darec_dist.config import ConfigError
    from darec_dist.data.dataset import DatasetError

    print(f"{'workers':>8} {'interactions/s (this rank)':>28} {'x world size':>14}")
    try:
        for workers in args.workers:
            rate = measure(args, workers)
            print(f"{workers:>8} {rate:>28.0f} {rate * args.world_size:>14.0f}")
    except (ConfigError, DatasetError) as err:
        # A bad config or a dataset that does not fit it (e.g. too small for one batch): the message
        # says what to change, a traceback would only hide it.
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
