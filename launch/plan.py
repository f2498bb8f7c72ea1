"""Sharding plan for a hypothetical cluster: which device holds which table shard, and memory per device.

    python launch/plan.py --nodes 16 --gpus-per-node 8 --hbm-gb 80 --ddr-gb 256 --users 1e9 --items 1e8 --dim 128 --llm-dim 4096 --llm-dtype fp16

Builds the trainer's four tables (user_id, item_id trainable; user_llm, item_llm frozen) with the
trainer's own table modules on the meta device, asks TorchRec's EmbeddingShardingPlanner for a
plan on the given topology, and prints each table's sharding and the bytes each device holds
(weights plus optimizer state).
A scale that cannot fit exits with an error saying by how much it is short.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.types import ShardingPlan

from darec_dist.models.tables import (
    RowModule,
    SparseConfig,
    TableModule,
    llm_table_configs,
    optimizer_state_planned,
    trainable_table_configs,
)

GIB = 1024**3
# Optimizer state of a table: (a multiple of its weights, bytes per row). Adagrad keeps one value per
# weight, Adam two moments, row-wise Adagrad one float per row; SGD and the frozen LLM tables keep none.
OPTIMIZER_STATE = {"rowwise_adagrad": (0.0, 4), "adagrad": (1.0, 0), "adam": (2.0, 0), "sgd": (0.0, 0)}
NO_STATE = (0.0, 0)
# Kernels that keep a table's rows in host memory (UVM), the device holding at most a cache of them.
HOST_KERNELS = ("fused_uvm", "fused_uvm_caching")


class ClusterTables(nn.Module):
    """The trainer's two sharded modules side by side, so that one planner call places all four tables."""

    def __init__(self, users: int, items: int, dim: int, llm_dim: int, llm_dtype: str):
        super().__init__()
        features = {"user": ["user_f"], "item": ["item_f"]}
        self.trainable = TableModule(trainable_table_configs({"user": users, "item": items}, dim, features))
        if llm_dim > 0:
            llm_features = {"user": ["user_llm_f"], "item": ["item_llm_f"]}
            self.llm = RowModule(llm_table_configs({"user": (users, llm_dim), "item": (items, llm_dim)}, llm_features, llm_dtype))


def table_bytes(rows: int, cols: int, bytes_per_value: int, state: tuple[float, int]) -> float:
    per_weight, per_row = state
    return rows * cols * bytes_per_value * (1.0 + per_weight) + rows * per_row


def per_device_bytes(plan: ShardingPlan, widths: dict, optimizer: str, llm_bytes: int) -> dict[str, dict[int, float]]:
    """Bytes each rank holds, from the plan's shard placements: {"device": ..., "host": ...} (tables under a UVM kernel
    live in host memory)."""
    totals: dict[str, dict[int, float]] = {"device": defaultdict(float), "host": defaultdict(float)}
    for name, sharding in table_plans(plan):
        frozen = name.endswith("_llm")
        state = NO_STATE if frozen else OPTIMIZER_STATE[optimizer]
        value_bytes = llm_bytes if frozen else 4
        where = totals["host" if sharding.compute_kernel in HOST_KERNELS else "device"]
        spec = sharding.sharding_spec
        if spec is None:  # data parallel: every rank holds the whole table
            rows, cols = widths[name]
            for rank in sharding.ranks or []:
                where[rank] += table_bytes(rows, cols, value_bytes, state)
            continue
        for shard in spec.shards:
            rank = shard.placement.rank()
            rows, cols = shard.shard_sizes
            where[rank] += table_bytes(rows, cols, value_bytes, state)
    return totals


def table_plans(plan: ShardingPlan):
    """(table name, its parameter sharding) over every sharded module of the plan."""
    for module_plan in plan.plan.values():
        yield from module_plan.items()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1, help="hosts (default: %(default)s)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="devices per host (default: %(default)s)")
    parser.add_argument("--hbm-gb", type=float, default=80.0, help="memory per device for tables (GiB)")
    parser.add_argument("--ddr-gb", type=float, default=0.0, help="host memory per device the planner may use through UVM (GiB)")
    parser.add_argument("--users", type=float, required=True, help="rows of the user tables, e.g. 1e9")
    parser.add_argument("--items", type=float, required=True, help="rows of the item tables, e.g. 1e8")
    parser.add_argument("--dim", type=int, default=64, help="width of the trainable tables (default: %(default)s)")
    parser.add_argument("--llm-dim", type=int, default=0, help="width of the frozen LLM tables (0: none)")
    parser.add_argument("--llm-dtype", choices=["fp32", "fp16"], default=SparseConfig.llm_dtype,
                        help="the trainer's sparse.llm_dtype (fp16 halves the largest tables at scale)")
    parser.add_argument("--llm-sharding", choices=["row_wise", "table_wise", "column_wise", "auto"], default=SparseConfig.llm_sharding,
                        help="the trainer's sparse.llm_sharding, which fixes the LLM tables' sharding (auto: the planner's choice)")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZER_STATE), default="rowwise_adagrad", help="the tables' fused optimizer, whose state counts (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4096, help="local batch per device")
    args = parser.parse_args(argv)
    positive = {"--nodes": args.nodes, "--gpus-per-node": args.gpus_per_node, "--hbm-gb": args.hbm_gb, "--users": args.users,
                "--items": args.items, "--dim": args.dim, "--batch-size": args.batch_size}
    for flag, value in positive.items():
        if not (math.isfinite(value) and value > 0):
            parser.error(f"{flag} must be a finite number > 0, got {value:g}")
    for flag, value in {"--users": args.users, "--items": args.items}.items():
        if value < 1 or value != int(value) or value >= 2**63:  # 100.7 rows was planned as 100; 1e30 overflowed torch
            parser.error(f"{flag} counts rows: a whole number from 1 to 2^63 - 1, got {value:g}")
    if args.llm_dim < 0 or not (math.isfinite(args.ddr_gb) and args.ddr_gb >= 0):
        parser.error("--llm-dim and --ddr-gb must be >= 0")

    world = args.nodes * args.gpus_per_node
    users, items = int(args.users), int(args.items)
    llm_bytes = 2 if args.llm_dtype == "fp16" else 4
    widths = {"user_id": (users, args.dim), "item_id": (items, args.dim), "user_llm": (users, args.llm_dim), "item_llm": (items, args.llm_dim)}
    needed = sum(
        table_bytes(rows, cols, llm_bytes if name.endswith("_llm") else 4, NO_STATE if name.endswith("_llm") else OPTIMIZER_STATE[args.optimizer])
        for name, (rows, cols) in widths.items()
        if cols > 0
    )
    available = world * (args.hbm_gb + args.ddr_gb) * GIB
    print(f"cluster: {args.nodes} nodes x {args.gpus_per_node} devices = {world} devices, {args.hbm_gb:g} GiB HBM each"
          + (f" + {args.ddr_gb:g} GiB host through UVM" if args.ddr_gb else ""))
    print(f"tables: {users:,} users, {items:,} items, dim {args.dim}, LLM dim {args.llm_dim} ({args.llm_dtype}), "
          f"optimizer {args.optimizer}: {needed / GIB:,.1f} GiB in total")
    if needed > available:
        print(f"error: does not fit: the tables need {needed / GIB:,.1f} GiB but the cluster has {available / GIB:,.1f} GiB; "
              f"short by {(needed - available) / GIB:,.1f} GiB ({needed / available:.2f}x); add at least "
              f"{int(-(-(needed - available) // ((args.hbm_gb + args.ddr_gb) * GIB)))} devices or shrink the tables", file=sys.stderr)
        return 2
    module = ClusterTables(users, items, args.dim, args.llm_dim, args.llm_dtype)
    topology = Topology(
        world_size=world, local_world_size=args.gpus_per_node, compute_device="cuda",
        hbm_cap=int(args.hbm_gb * GIB), ddr_cap=int(args.ddr_gb * GIB),
    )
    # The trainer shards the frozen LLM tables as sparse.llm_sharding says, not as a planner would.
    fixed = {} if args.llm_sharding == "auto" or args.llm_dim == 0 else {
        table: ParameterConstraints(sharding_types=[args.llm_sharding]) for table in ("user_llm", "item_llm")}
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=args.batch_size, constraints=fixed)
    try:
        with optimizer_state_planned(module.trainable, args.optimizer):
            plan = planner.plan(module, [TableModule.sharder(), RowModule.sharder()])
    except PlannerError as err:
        first = str(err).splitlines()[0][:500]
        print(f"error: does not fit: TorchRec's planner found no placement ({first}); the tables need "
              f"{needed / GIB:,.1f} GiB of {available / GIB:,.1f} GiB, leaving too little headroom per device", file=sys.stderr)
        return 2
    print(f"\n{'table':<10} {'rows':>15} {'dim':>6} {'sharding':<18} {'kernel':<22} devices")
    for name, sharding in table_plans(plan):
        rows, cols = widths[name]
        ranks = sharding.ranks or []
        shown = f"{len(ranks)} ({ranks[0]}..{ranks[-1]})" if len(ranks) > 4 else str(ranks)
        print(f"{name:<10} {rows:>15,} {cols:>6} {sharding.sharding_type:<18} {sharding.compute_kernel:<22} {shown}")
    offloaded = sorted(name for name, sharding in table_plans(plan) if sharding.compute_kernel in HOST_KERNELS)
    if offloaded:  # printed, not refused: --ddr-gb asks what host memory would buy
        print(f"note: {', '.join(offloaded)} under a UVM kernel: the trainer does not run those yet (it keeps every "
              "table on the device, fused kernel); this plan is a projection")
    totals = per_device_bytes(plan, widths, args.optimizer, llm_bytes)
    print()
    over = []
    shown = (("device", args.hbm_gb, "HBM", "the tables on the device"),
             ("host", args.ddr_gb, "host memory", "the tables under UVM; the device caches some of their rows besides"))
    for where, capacity, label, what in shown:
        values = [totals[where].get(rank, 0.0) for rank in range(world)]
        if where == "host" and not any(values):
            continue
        print(f"{label} per device (weights + optimizer state of {what}): min {min(values) / GIB:.2f} GiB, "
              f"mean {sum(values) / world / GIB:.2f} GiB, max {max(values) / GIB:.2f} GiB of {capacity:g} GiB")
        if max(values) > capacity * GIB:
            over.append(f"{label}: {max(values) / GIB:.2f} GiB on one device, {capacity:g} GiB there")
    if over:  # the planner's own estimate missed: never print such a plan as one that runs
        print(f"error: does not fit: the plan places more than a device holds ({'; '.join(over)}); add devices or shrink "
              "the tables", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
