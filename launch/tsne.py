"""t-SNE picture of DaRec's shared and specific representations, from a finished run.

    python launch/tsne.py runs/ml-100k-darec --nodes 800 --out docs/figures/tsne.png [key=value ...]

Rebuilds the run's model in one process, loads its best checkpoint (resharded from however
many ranks wrote it), takes a seeded sample of users and items, and embeds c_sp, c_sh, l_sp
and l_sh of those nodes together with t-SNE. If the disentangling works, the two shared
parts overlap while the two specific parts stay apart from them and from each other. Also
prints each part's mean pairwise cosine over the sampled nodes (near 1: collapsed) and the mean
entropy of the shared parts' soft assignments to the centres (log K: uniform, the local term idle).
Overrides of the run's config are those of launch/evaluate.py, e.g. `data.path=DIR` for a dataset that moved.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from darec_dist.config import ConfigError
from darec_dist.data.dataset import DatasetError
from darec_dist.distributed.env import distributed
from darec_dist.files import atomic_path
from darec_dist.models.aligners.coupled_losses import soft_assignments
from launch.evaluate import checkpoint_path, load_run_model, run_config


def representations(
    run_dir: Path, nodes: int, seed: int, overrides: tuple[str, ...] = ()
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    cfg = run_config(run_dir, (*overrides, "device=cpu"))
    if cfg.align.method != "darec":
        raise ConfigError(f"{run_dir}: align.method is {cfg.align.method}; only a darec run has shared and specific parts")
    checkpoint_path(run_dir, "best")  # refused before the dataset and model are built
    with distributed("cpu") as env:
        trainer, _, _ = load_run_model(cfg, env, run_dir, "best", verify_checksums=False)
        dataset = trainer.dataset
        rng = np.random.default_rng(seed)
        users = np.sort(rng.choice(dataset.num_users, size=min(nodes // 2, dataset.num_users), replace=False))
        items = np.sort(rng.choice(dataset.num_items, size=min(nodes // 2, dataset.num_items), replace=False))
        ids = np.concatenate([users, items + dataset.num_users])
        collab = trainer.node_embeddings(ids, calls=math.ceil(len(ids) / trainer.cfg.eval.node_chunk))
        llm = torch.from_numpy(np.concatenate([dataset.embeddings("user")[users], dataset.embeddings("item")[items]]).astype(np.float32))
        darec = trainer.aligner
        with torch.no_grad():
            parts = {
                "c_sp": darec.collab_specific(collab),
                "c_sh": darec.collab_shared(collab),
                "l_sp": darec.llm_specific(llm),
                "l_sh": darec.llm_shared(llm),
            }
        return {name: z.numpy() for name, z in parts.items()}, assignment_entropy(darec, parts)


@torch.no_grad()
def assignment_entropy(darec, parts: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean entropy of the shared parts' soft assignments to their centres, and log K ("uniform"): at log K every
    node is assigned uniformly, and the local term holds without aligning anything. Matched centres are per side."""
    centres = {"c_sh": darec.collab_centres if darec.cfg.centres == "matched" else darec.centres, "l_sh": darec.centres}
    entropy = {}
    for name in ("c_sh", "l_sh"):
        q = soft_assignments(parts[name], centres[name], darec.cfg.cluster_temperature)
        entropy[name] = -(q * q.clamp_min(1e-12).log()).sum(-1).mean().item()
    entropy["uniform"] = float(np.log(darec.cfg.clusters))
    return entropy


def image_formats() -> list[str]:
    """The file suffixes savefig writes (png, pdf, svg ...)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return sorted(FigureCanvasAgg.get_supported_filetypes())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a DaRec run directory written by launch/train.py")
    parser.add_argument("overrides", nargs="*", default=[], help="key=value overrides of the run's config, e.g. data.path=DIR")
    parser.add_argument("--nodes", type=int, default=800, help="nodes sampled, each giving its four parts (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample and of the t-SNE (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="the picture: a file name whose suffix names its format (.png, .pdf, .svg ...)")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)  # overrides may follow the options
    if args.nodes < 8:  # t-SNE's perplexity (30) needs more than 30 points; each node gives four (its parts)
        parser.error(f"--nodes must be >= 8, got {args.nodes}")
    # Checked before the t-SNE, which takes minutes: savefig reads the format from the suffix.
    if args.out.is_dir():
        parser.error(f"--out {args.out} is a directory; give a file name such as {args.out / 'tsne.png'}")
    if not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: {args.out.parent} is not a directory")
    if args.out.suffix[1:].lower() not in image_formats():
        parser.error(f"--out {args.out}: expected a file name ending in an image format's suffix, one of {', '.join(image_formats())}")
    try:
        parts, entropy = representations(args.run_dir, args.nodes, args.seed, tuple(args.overrides))
    except (ConfigError, DatasetError) as err:  # (exit status 2, as evaluate.py and recommend.py give it)
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    from sklearn.manifold import TSNE

    names = list(parts)
    unit = {n: parts[n] / np.linalg.norm(parts[n], axis=1, keepdims=True) for n in names}
    for name in names:
        # Near 1: the part points the same way for every node (collapsed), so the structure losses hold trivially.
        cosines = unit[name] @ unit[name].T
        print(f"{name}: mean pairwise cosine {cosines[~np.eye(len(cosines), dtype=bool)].mean():.3f}")
    uniform = entropy.pop("uniform")
    for name, value in entropy.items():
        print(f"{name}: mean entropy of the soft assignments to the centres {value:.3f} (uniform: log K = {uniform:.3f})")
    stacked = np.concatenate([unit[n] for n in names])
    points = TSNE(n_components=2, init="pca", random_state=args.seed, perplexity=30).fit_transform(stacked)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    start = 0
    labels = {"c_sp": "collaborative specific", "c_sh": "collaborative shared", "l_sp": "LLM specific", "l_sh": "LLM shared"}
    for name in names:
        count = len(parts[name])
        ax.scatter(points[start : start + count, 0], points[start : start + count, 1], s=4, alpha=0.6, label=labels[name])
        start += count
    ax.set_title(f"t-SNE of DaRec representations ({args.run_dir.name})")
    ax.legend(markerscale=3)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    with atomic_path(args.out) as tmp:
        fig.savefig(tmp, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
