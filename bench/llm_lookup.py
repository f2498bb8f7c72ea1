"""Time of one lookup on the trainer's frozen LLM tables, by storage type and sharding.

    python bench/llm_lookup.py --rows 200000 --dim 384 --ids 1024 --dtypes fp32 fp16 --nproc 2

For each storage type this starts `torchrun --nproc_per_node=NPROC bench/llm_lookup.py --worker ...`,
which builds the user and item LLM tables exactly as the trainer does (`llm_tables`: a DMP-sharded
unpooled EmbeddingCollection, filled with random rows), and times `--steps` lookups of `--ids`
random ids per table per rank (the distinct sample nodes of a DaRec step) after 3 warm-up lookups.
Printed: the slowest rank's mean ms per lookup.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.cli import at_least  # noqa: E402  (needs the path above)
from bench.torchrun_worker import add_worker_arguments, run_worker, slowest_rank_seconds  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from darec_dist.distributed.env import distributed
    from darec_dist.models.tables import SparseConfig, llm_tables

    with distributed("cpu") as env:
        rng = np.random.default_rng(env.rank)
        embeddings = {kind: rng.standard_normal((args.rows, args.dim), dtype=np.float32) for kind in ("user", "item")}
        cfg = SparseConfig(llm_sharding=args.sharding, llm_dtype=args.dtype)
        tables = llm_tables(embeddings, {"user": ["llm_user"], "item": ["llm_item"]}, cfg, env)
        ids = torch.from_numpy(rng.integers(0, args.rows, size=2 * args.ids))
        features = KeyedJaggedTensor(keys=["llm_user", "llm_item"], values=ids, lengths=torch.ones(2 * args.ids, dtype=torch.long))
        with torch.no_grad():
            for _ in range(3):
                tables.lookup(features)
            dist.barrier()
            started = time.perf_counter()
            for _ in range(args.steps):
                tables.lookup(features)
            elapsed = slowest_rank_seconds(started, env.device)
        if env.is_main:
            Path(args.result).write_text(json.dumps({"ms": 1000 * elapsed / args.steps}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=at_least(1), default=200000, help="rows of each of the user and item tables")
    parser.add_argument("--dim", type=at_least(1), default=384)
    parser.add_argument("--ids", type=at_least(1), default=1024, help="ids looked up per table per rank")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "fp16"], choices=["fp32", "fp16"])
    parser.add_argument("--sharding", default="row_wise", choices=["row_wise", "table_wise", "column_wise"])
    parser.add_argument("--steps", type=at_least(1), default=20)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    add_worker_arguments(parser)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"{args.nproc} ranks, 2 tables of {args.rows:,} x {args.dim}, {args.sharding}, {args.ids} ids per table per rank")
    for dtype in args.dtypes:
        worker_args = [
            "--rows", str(args.rows), "--dim", str(args.dim), "--ids", str(args.ids), "--sharding", args.sharding,
            "--steps", str(args.steps), "--dtype", dtype,
        ]
        print(f"{dtype}: {run_worker(__file__, args.nproc, worker_args, dtype)['ms']:.2f} ms per lookup")


if __name__ == "__main__":
    main()
