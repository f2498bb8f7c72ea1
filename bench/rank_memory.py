"""Memory of each training process against dataset size: does a rank grow beyond its table share?

    python bench/rank_memory.py data/synthetic-1000000-100000 data/synthetic-12000000-1000000

For each prepared dataset this runs bench/scale_bench.py's 2-process LightGCN epoch (cut to
--steps steps: memory is flat after the first steps) and its validation, and prints per rank:
the share of the sharded tables, private memory (RSS minus shared and file-backed pages) after
setup, training and evaluation, and the peak private memory sampled every 0.2 s, all in MiB. The last
column is what is left once the table share is taken away: it should not grow with the data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli import at_least  # noqa: E402
from scale_bench import full_epoch  # noqa: E402


def fmt(values) -> str:
    return ", ".join(f"{v:.0f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="+")
    parser.add_argument("--steps", type=at_least(1), default=200)
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    for data in args.datasets:
        if not (Path(data) / "manifest.json").is_file():
            parser.error(f"{data}: no manifest.json; not a dataset written by spark_jobs.prepare")
    rows = []
    print("MiB per rank, in rank order (rank 0, rank 1)")
    print("| dataset | nodes | interactions | rank's table share | private after setup | after training | after evaluation | sampled peak private | peak minus table share |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for data in args.datasets:
        manifest = json.loads((Path(data) / "manifest.json").read_text())
        nodes = manifest["num_users"] + manifest["num_items"]
        epoch = full_epoch(data, (f"train.max_steps_per_epoch={args.steps}",))
        memory = epoch["rank_memory_mib"]
        private = {stage: [m["private"] for m in memory[stage]] for stage in ("after_setup", "after_train", "after_eval")}
        tables = memory["tables"]
        ranks = epoch["peak_private_per_rank_mib"]
        interactions = sum(manifest["splits"].values())
        rows.append({"dataset": data, "nodes": nodes, "interactions": interactions, **epoch})
        print(
            f"| {data} | {nodes:,} | {interactions:,} | {fmt(tables)} | {fmt(private['after_setup'])} | "
            f"{fmt(private['after_train'])} | {fmt(private['after_eval'])} | {fmt(ranks)} | "
            f"{fmt(p - t for p, t in zip(ranks, tables))} |",
            flush=True,
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
