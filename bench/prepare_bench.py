"""Benchmark of the Spark prepare job: time per stage, interactions per second, peak memory.

    python bench/prepare_bench.py                       # MovieLens-100K and (if present) Amazon-book
    python bench/prepare_bench.py --datasets ml-100k

Each dataset is prepared from scratch into a temporary directory with its
configs/data/*.yaml (the real encoder, the configured graph); the stage times come
from the manifest, memory from sampling the whole process tree (Python driver,
Spark JVM, Python workers) every 0.2 s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.process_memory import run_measured  # noqa: E402

DATASETS = {
    "ml-100k": ["configs/data/ml-100k.yaml"],
    "amazon-book": ["configs/data/amazon-book.yaml", f"source.path={REPO.parent / 'shared/data/amazon-book-rlmrec'}"],
}


def bench(name: str, args: list[str], extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "spark_jobs.prepare", *args, f"output={tmp}/{name}", *extra]
        code, wall, peaks, output = run_measured(command, cwd=REPO)
        if code != 0:
            raise SystemExit(f"{name}: prepare failed\n{output[-3000:]}")
        manifest = json.loads((Path(tmp) / name / "manifest.json").read_text())
    interactions = sum(manifest["splits"].values())
    return {
        "dataset": name,
        "interactions": interactions,
        "users": manifest["num_users"],
        "items": manifest["num_items"],
        "graph": manifest["graph"],
        "embedding": manifest["embedding"],
        "stage_seconds": manifest["timings_s"],
        "wall_seconds": wall,
        "interactions_per_second": interactions / manifest["timings_s"]["total"],
        "peak_rss_total_mib": peaks.total_bytes / 2**20,
        "peak_rss_jvm_mib": peaks.largest("java") / 2**20,
        "peak_rss_driver_mib": peaks.largest("spark_jobs.prepare") / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS), metavar="NAME",
                        help=f"datasets to prepare, among {', '.join(DATASETS)} (default: all)")
    parser.add_argument("--override", nargs="*", default=[], help="key=value passed to every prepare run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    results = []
    for name in args.datasets:
        if name == "amazon-book" and not (REPO.parent / "shared/data/amazon-book-rlmrec").is_dir():
            print("amazon-book: ../shared/data/amazon-book-rlmrec not present, skipped")
            continue
        result = bench(name, DATASETS[name], args.override)
        results.append(result)
        stages = ", ".join(f"{k} {v:.1f}" for k, v in result["stage_seconds"].items())
        print(f"{name}: {result['interactions']} interactions, {result['interactions_per_second']:.0f} interactions/s, "
              f"peak RSS {result['peak_rss_total_mib']:.0f} MiB (JVM {result['peak_rss_jvm_mib']:.0f}, driver {result['peak_rss_driver_mib']:.0f})")
        print(f"  stage seconds: {stages}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
