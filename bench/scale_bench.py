"""Cost against data size on synthetic data of industrial shape: Spark, loader, trainer, memory.

    python bench/scale_bench.py --sizes 100000 1000000 5000000 10000000 --out docs/scaling_results.json

For each size (interactions drawn; users = items = size / 10, or --nodes) this
1. prepares a synthetic dataset with configs/data/synthetic.yaml (time per stage, peak memory of
   the Spark process tree),
2. measures the loader alone (bench/loader_throughput.py, one rank of two, one worker),
3. measures training steps with the loader excluded (bench/step_time.py) for MF and LightGCN,
   with and without DaRec, on 1 and 2 processes,
4. trains one full epoch of LightGCN on 2 processes (loader included) and records the epoch time
   and the peak memory of each training process,
5. times a plain full-graph LightGCN step for contrast (bench/full_graph_lightgcn.py),
then writes everything to --out and plots cost against size (--plot, by default the figure
docs/scaling.md shows) from --out and --plot-also (by default both committed results files).
Sizes already in --out are reused, not measured again, unless --remeasure is given.
Datasets are kept under --data-root (delete them afterwards; they are large).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.process_memory import run_measured  # noqa: E402

PY = sys.executable
TRAIN_CONFIG = "configs/train/scale.yaml"


def prepare(size: int, root: Path, nodes: int | None = None) -> dict:
    nodes = nodes or max(100, size // 10)
    out = root / f"synthetic-{size}-{nodes}"
    if not (out / "manifest.json").exists():
        command = [
            PY, "-m", "spark_jobs.prepare", "configs/data/synthetic.yaml", f"output={out}", "overwrite=true",
            f"source.synthetic.users={nodes}", f"source.synthetic.items={nodes}", f"source.synthetic.interactions={size}",
        ]
        code, wall, peaks, output = run_measured(command, cwd=REPO)
        if code != 0:
            raise SystemExit(f"prepare {size} failed:\n{output[-3000:]}")
        (out / "bench_prepare.json").write_text(json.dumps({"wall_seconds": wall, "peak_rss_total_mib": peaks.total_bytes / 2**20}))
    manifest = json.loads((out / "manifest.json").read_text())
    measured = json.loads((out / "bench_prepare.json").read_text())
    return {"path": str(out), "manifest": manifest, **measured}


def child(command: list[str]) -> subprocess.CompletedProcess:
    """A benchmark run as a child; its own error, not only its exit status, when it fails."""
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(command[1:3])} failed (exit status {done.returncode}):\n{done.stderr[-3000:]}")
    return done


def loader_rate(data: str) -> float:
    done = child([PY, "bench/loader_throughput.py", "--data", data, "--train-config", TRAIN_CONFIG, "--workers", "1", "--steps", "30"])
    return float(done.stdout.strip().splitlines()[-1].split()[1])


def step_rates(data: str, backbone: str, nproc: int) -> dict[str, float]:
    done = child([PY, "bench/step_time.py", "--data", data, "--train-config", TRAIN_CONFIG, "--methods", "none", "darec",
                  "--nproc", str(nproc), "--steps", "15", "--override", f"model.backbone={backbone}"])
    rates = {}
    for line in done.stdout.splitlines()[1:]:
        method, ms, per_s, _ = line.split()
        rates[method] = {"ms_per_step": float(ms), "interactions_per_s": float(per_s)}
    return rates


def full_epoch(data: str, overrides: tuple[str, ...] = ()) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        command = [
            PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "launch/train.py", TRAIN_CONFIG, f"data.path={data}",
            f"run_dir={run_dir}", "train.epochs=1", "train.progress_bar=false", *overrides,
        ]
        code, wall, peaks, output = run_measured(command, cwd=REPO)
        if code != 0:
            raise SystemExit(f"epoch on {data} failed:\n{output[-3000:]}")
        record = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    trainers = [pid for pid, (cmd, _) in peaks.per_process.items() if "launch/train.py" in cmd and "torch.distributed.run" not in cmd]
    train = next(r for r in record if r["kind"] == "train")
    evaluated = next(r for r in record if r["kind"] == "val")
    return {
        "epoch_seconds": train["seconds"],
        # Each rank's share of the sharded tables (with optimizer state); its private memory and peak RSS
        # so far after setup, training and evaluation.
        "rank_memory_mib": {**train["memory_mib"], "after_eval": evaluated["memory_mib"]},
        "wall_seconds": wall,
        # Ranks and their loader workers (forked, same command line).
        "peak_rss_per_process_mib": sorted(peaks.per_process[pid][1] / 2**20 for pid in trainers),
        "peak_private_per_process_mib": sorted(peaks.private[pid] / 2**20 for pid in trainers),
        # The ranks' own (not their workers'), in rank order: beside each rank's table share.
        "peak_private_per_rank_mib": [peaks.private[pid] / 2**20 for pid in ranks_in_order(peaks, trainers)],
    }


def ranks_in_order(peaks, trainers: list[int]) -> list[int]:
    """The trainer processes torchrun started, by their RANK; loader workers (forked by a rank: same command line
    and RANK) are left out by their parent."""
    ranks = {int(peaks.origin[pid][1]): pid for pid in trainers
             if pid in peaks.origin and peaks.origin[pid][1] is not None and peaks.origin[pid][0] not in trainers}
    return [ranks[r] for r in sorted(ranks)]


def full_graph(data: str) -> dict:
    done = child([PY, "bench/full_graph_lightgcn.py", "--data", data, "--steps", "3"])
    line = done.stdout.strip().splitlines()[-1]
    ms, epoch, peak = re.search(r"([\d.]+) ms/step x \d+ steps = ([\d.]+) s/epoch; peak RSS (\d+) MiB", line).groups()
    return {"ms_per_step": float(ms), "epoch_seconds": float(epoch), "peak_rss_mib": float(peak)}


def plot_points(results: list[dict], also: list[Path]) -> list[dict]:
    """This run's results and those of the --plot-also files, one point per size (this run's wins)."""
    points = {r["size"]: r for path in also if path.exists() for r in json.loads(path.read_text())}
    points.update({r["size"]: r for r in results})
    return [points[size] for size in sorted(points)]


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["size"] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.loglog(sizes, [r["epoch"]["epoch_seconds"] for r in results], "o-", label="darec-dist LightGCN, 2 processes")
    graph_sizes = [r["size"] for r in results if r.get("full_graph")]
    left.loglog(graph_sizes, [r["full_graph"]["epoch_seconds"] for r in results if r.get("full_graph")], "s--", label="plain full-graph LightGCN (implied)")
    left.loglog(sizes, [sum(r["prepare"]["manifest"]["timings_s"][k] for k in r["prepare"]["manifest"]["timings_s"] if k != "total") for r in results], "^-", label="Spark prepare")
    left.set(xlabel="interactions drawn", ylabel="seconds", title="cost against data size")
    left.legend(fontsize=8)
    right.semilogx(sizes, [max(r["epoch"]["peak_rss_per_process_mib"]) / 1024 for r in results], "o-", label="training process (max)")
    right.semilogx(sizes, [r["prepare"]["peak_rss_total_mib"] / 1024 for r in results], "^-", label="Spark tree (total)")
    right.set(xlabel="interactions drawn", ylabel="peak RSS (GiB)", title="memory")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 5_000_000, 10_000_000])
    parser.add_argument("--data-root", type=Path, default=REPO / "data")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "scaling_results.json")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "figures" / "scaling.png")
    # The committed figure shows both results files (--nodes 1000000 went to a file of its own): drawn
    # from --out alone, a run of one size would leave a plot of only that size.
    parser.add_argument("--plot-also", type=Path, nargs="*", metavar="JSON",
                        default=[REPO / "docs" / "scaling_results.json", REPO / "docs" / "scaling_results_1m_nodes.json"],
                        help="other results files whose sizes are drawn in the same plot (default: the two committed ones; "
                             "give none to plot --out alone)")
    parser.add_argument("--remeasure", action="store_true",
                        help="measure sizes already in --out again and replace their entries (a dataset already prepared "
                             "under --data-root is reused with its Spark figures; delete it to time Spark again)")
    parser.add_argument("--full-graph-max", type=int, default=5_000_000, help="largest size for the full-graph contrast")
    parser.add_argument("--nodes", type=int, help="users = items = this for every size (default: size / 10)")
    parser.add_argument("--steps-max", type=int, default=10_000_000, help="largest size for the per-step benchmarks (8 launches)")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else []
    measured = {r["size"] for r in results}
    reused = [] if args.remeasure else [size for size in args.sizes if size in measured]
    if reused:
        # Say so: otherwise a run of sizes already measured ends at once with nothing printed.
        print(f"[scale] {' '.join(map(str, reused))}: already in {args.out}, reused (--remeasure to measure again)", flush=True)
    for size in args.sizes:
        if size in reused:
            continue
        print(f"[scale] {size} interactions: prepare", flush=True)
        entry = {"size": size, "prepare": prepare(size, args.data_root, args.nodes)}
        data = entry["prepare"]["path"]
        print(f"[scale] {size}: loader, steps, epoch", flush=True)
        entry["loader_interactions_per_s"] = loader_rate(data)
        if size <= args.steps_max:
            entry["steps"] = {f"{b}-{n}proc": step_rates(data, b, n) for b in ("mf", "lightgcn") for n in (1, 2)}
        entry["epoch"] = full_epoch(data)
        if size <= args.full_graph_max:
            entry["full_graph"] = full_graph(data)
        results = [r for r in results if r["size"] != size] + [entry]
        args.out.write_text(json.dumps(results, indent=2))
        print(json.dumps({k: v for k, v in entry.items() if k != "prepare"}, indent=1), flush=True)
    results.sort(key=lambda r: r["size"])
    plot(plot_points(results, args.plot_also), args.plot)
    print(f"[scale] plot: {args.plot}", flush=True)


if __name__ == "__main__":
    main()
