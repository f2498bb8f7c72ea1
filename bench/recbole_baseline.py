"""RecBole 1.2.1 LightGCN on darec-dist's prepared split, as an external baseline.

This script runs in its own virtualenv (RecBole 1.2.1 needs numpy<2, scipy<1.13
and setuptools<81, which clash with the project's environment), and it does not
import darec_dist: it reads only the prepared CSR arrays
``<data>/interactions/{train,val,test}_{indptr,items}.npy``.

What it does:

1. Exports the prepared train / val / test CSRs as RecBole atomic benchmark files
   ``<workdir>/<name>/<name>.{train,valid,test}.inter`` (header
   ``user_id:token<TAB>item_id:token``; tokens are our contiguous ids).
2. Trains RecBole's LightGCN with ``benchmark_filename: [train, valid, test]``,
   full-sort evaluation, Recall/NDCG@5/10/20, ``valid_metric: recall@20`` and
   RecBole's own early stopping (``stopping_step``), then evaluates the best-valid
   checkpoint on the test split with RecBole's evaluator.
3. Re-scores the test split itself from the best model's propagated LightGCN
   embeddings (``model.forward()``) under two masking rules:

   * ``ours`` (RLMRec / darec-dist): only the user's *train* items are masked;
   * ``recbole``: train + validation items are masked, which is what RecBole
     1.2.1 does at test time (``Sampler.get_used_ids`` in
     ``recbole/sampler/sampler.py`` accumulates used ids over the phases
     train -> valid -> test, and ``FullSortEvalDataLoader._set_user_property`` in
     ``recbole/data/dataloader/general_dataloader.py`` masks
     ``used_item - positive_item``). This recomputation must equal RecBole's
     own test numbers and is reported as a check.

   Both use the same metric definitions as RecBole and darec-dist:
   Recall@K = hits / |held-out items| (not capped at K); NDCG@K with binary gains
   and an ideal DCG over min(K, |held-out items|) positions.
4. Prints and writes a JSON with all of the above, the best epoch, the number of
   epochs run and the mean seconds per training epoch.

RecBole writes ``log/``, ``log_tensorboard/`` and ``saved/`` under ``--workdir``
(the script changes into it before RecBole starts).

Setup (once; the pins are what recbole 1.2.1 needs, see docs/training.md)::

    python3 -m venv /work/recbole-venv
    /work/recbole-venv/bin/pip install torch==2.13.0 recbole==1.2.1
    /work/recbole-venv/bin/pip install numpy==1.26.4 scipy==1.12.0 pandas==2.1.4 "setuptools<81"

The runs recorded in docs/training.md (RecBole's LightGCN defaults: d=64, lr 1e-3, reg 1e-5, batch 2048,
one uniform negative; 2 layers, stopping_step 20, seeds 2020 1 2 3 4) come from the loop there::

    for s in 2020 1 2 3 4; do
      /work/recbole-venv/bin/python -W ignore bench/recbole_baseline.py --data data/ml-100k \\
          --workdir /tmp/recbole-ml100k --out /tmp/recbole-ml100k/lightgcn_l2_seed$s.json \\
          --embedding-size 64 --n-layers 2 --learning-rate 1e-3 --reg-weight 1e-5 \\
          --train-batch-size 2048 --epochs 400 --stopping-step 20 --seed $s --threads 1
    done
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

SPLITS = (("train", "train"), ("val", "valid"), ("test", "test"))  # (our file prefix, RecBole suffix)
KS = (5, 10, 20)


def load_csr(data: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.load(data / "interactions" / f"{split}_indptr.npy")
    items = np.load(data / "interactions" / f"{split}_items.npy")
    return indptr, items


def input_digest(data: Path) -> str:
    """sha256 over the six CSR files, so a result can be tied to the exact prepared split."""
    h = hashlib.sha256()
    for ours, _ in SPLITS:
        for part in ("indptr", "items"):
            h.update((data / "interactions" / f"{ours}_{part}.npy").read_bytes())
    return h.hexdigest()


def export_atomic(data: Path, workdir: Path, name: str) -> dict[str, int]:
    """Write <workdir>/<name>/<name>.<suffix>.inter for each split; return interaction counts."""
    out = workdir / name
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for ours, suffix in SPLITS:
        indptr, items = load_csr(data, ours)
        users = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        with open(out / f"{name}.{suffix}.inter", "w") as f:
            f.write("user_id:token\titem_id:token\n")
            f.writelines(f"{u}\t{i}\n" for u, i in zip(users.tolist(), items.tolist()))
        counts[suffix] = int(len(items))
    return counts


def ranking_metrics(scores, truth: list[np.ndarray], ks=KS) -> dict[str, float]:
    """Mean Recall@K / NDCG@K over users with held-out items; `scores` is a torch tensor, masked already."""
    import torch

    sizes = np.array([len(t) for t in truth])
    keep = np.flatnonzero(sizes > 0)
    top = torch.topk(scores[torch.from_numpy(keep)], k=max(ks), dim=1).indices.numpy()
    hit = np.stack([np.isin(top[r], truth[u]) for r, u in enumerate(keep)]).astype(np.float64)
    sizes = sizes[keep]
    discount = 1.0 / np.log2(np.arange(2, max(ks) + 2))
    ideal_cum = np.cumsum(discount)
    out = {}
    for k in ks:
        out[f"recall@{k}"] = float((hit[:, :k].sum(1) / sizes).mean())
    for k in ks:
        dcg = (hit[:, :k] * discount[:k]).sum(1)
        out[f"ndcg@{k}"] = float((dcg / ideal_cum[np.minimum(sizes, k) - 1]).mean())
    out["users"] = int(len(keep))
    return out


def rows(indptr: np.ndarray, items: np.ndarray) -> list[np.ndarray]:
    return [items[indptr[u] : indptr[u + 1]] for u in range(len(indptr) - 1)]


def masked_scores(user_e, item_e, masks: list[list[np.ndarray]]):
    """Scores of every user (our ids) against every item (our ids), with each mask's items set to -inf."""
    import torch

    scores = user_e @ item_e.T
    for mask in masks:
        r = np.repeat(np.arange(len(mask)), [len(m) for m in mask])
        c = np.concatenate(mask)
        scores[torch.from_numpy(r), torch.from_numpy(c)] = float("-inf")
    return scores


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/ml-100k"), help="prepared dataset directory (read only)")
    p.add_argument("--workdir", type=Path, required=True, help="where the atomic files, logs and checkpoints go")
    p.add_argument("--name", default="darec_ml100k", help="RecBole dataset name (atomic file prefix)")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default <workdir>/<run-name>.json)")
    p.add_argument("--embedding-size", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--reg-weight", type=float, default=1e-5)
    p.add_argument("--train-batch-size", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=300, help="epoch cap")
    p.add_argument("--stopping-step", type=int, default=10, help="RecBole stopping_step (evaluations without gain)")
    p.add_argument("--eval-step", type=int, default=1, help="evaluate on valid every N epochs")
    p.add_argument("--eval-batch-size", type=int, default=409_600, help="RecBole eval_batch_size (speed only)")
    p.add_argument("--seed", type=int, default=2020)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    data = args.data.resolve()
    workdir = args.workdir.resolve()
    run_name = f"lightgcn_d{args.embedding_size}_l{args.n_layers}_seed{args.seed}"
    out_path = (args.out.resolve() if args.out else workdir / f"{run_name}.json")
    try:  # before anything is written: RecBole lives in its own virtualenv (docs/training.md)
        import recbole
    except ImportError:
        raise SystemExit("error: recbole is not importable here; run this script with the RecBole virtualenv's python "
                         "(docs/training.md, 'How RecBole was run')") from None
    counts = export_atomic(data, workdir, args.name)

    # RecBole's Config also reads `--key=value` from sys.argv, and its logger / tensorboard /
    # checkpoints write relative to the working directory: hide our argv and work in workdir.
    sys.argv = sys.argv[:1]
    os.chdir(workdir)

    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    torch.set_num_threads(args.threads)
    config_dict = {
        "data_path": str(workdir),
        "checkpoint_dir": str(workdir / "saved"),
        "benchmark_filename": ["train", "valid", "test"],
        "load_col": {"inter": ["user_id", "item_id"]},
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "eval_args": {"group_by": "user", "order": "RO", "mode": "full"},
        "metrics": ["Recall", "NDCG"],
        "topk": list(KS),
        "valid_metric": "recall@20",
        "metric_decimal_place": 6,
        "embedding_size": args.embedding_size,
        "n_layers": args.n_layers,
        "learning_rate": args.learning_rate,
        "reg_weight": args.reg_weight,
        "train_batch_size": args.train_batch_size,
        "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1},
        "epochs": args.epochs,
        "stopping_step": args.stopping_step,
        "eval_step": args.eval_step,
        "eval_batch_size": args.eval_batch_size,
        "seed": args.seed,
        "reproducibility": True,
        "use_gpu": False,
        "show_progress": False,
    }
    config = Config(model="LightGCN", dataset=args.name, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    torch.set_num_threads(args.threads)

    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])

    epoch_seconds: list[float] = []
    eval_seconds: list[float] = []

    class TimedTrainer(get_trainer(config["MODEL_TYPE"], config["model"])):
        def _train_epoch(self, *a, **kw):
            t0 = time.perf_counter()
            loss = super()._train_epoch(*a, **kw)
            epoch_seconds.append(time.perf_counter() - t0)
            return loss

        def _valid_epoch(self, *a, **kw):
            t0 = time.perf_counter()
            result = super()._valid_epoch(*a, **kw)
            eval_seconds.append(time.perf_counter() - t0)
            return result

    trainer = TimedTrainer(config, model)
    t_fit = time.perf_counter()
    best_valid_score, best_valid_result = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    fit_seconds = time.perf_counter() - t_fit

    # Load the best-valid checkpoint ourselves: torch>=2.6 defaults torch.load to weights_only=True,
    # which cannot unpickle RecBole's checkpoint (it stores the Config object).
    checkpoint = torch.load(trainer.saved_model_file, map_location=config["device"], weights_only=False)
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    best_epoch = int(checkpoint["epoch"])
    recbole_test = dict(trainer.evaluate(test_data, load_best_model=False, show_progress=False))

    # Our-protocol evaluation from the best model's propagated embeddings, in our id space.
    model.eval()
    with torch.no_grad():
        user_all, item_all = model.forward()
    uid = dataset.field2token_id["user_id"]
    iid = dataset.field2token_id["item_id"]
    train, val, test = (rows(*load_csr(data, s)) for s, _ in SPLITS)
    n_users, n_items = len(train), int(np.concatenate(train + val + test).max()) + 1
    missing = [i for i in range(n_items) if str(i) not in iid]
    if missing:  # RecBole only knows items that occur in some split; ours ranks all of 0..n_items-1
        raise SystemExit(f"{len(missing)} item ids occur in no split; the two item sets would differ")
    user_e = user_all[torch.tensor([uid[str(u)] for u in range(n_users)])]
    item_e = item_all[torch.tensor([iid[str(i)] for i in range(n_items)])]
    with torch.no_grad():
        ours_test = ranking_metrics(masked_scores(user_e, item_e, [train]), test)
        recbole_rule_test = ranking_metrics(masked_scores(user_e, item_e, [train, val]), test)
        ours_valid = ranking_metrics(masked_scores(user_e, item_e, [train]), val)

    result = {
        "run": run_name,
        "params": {k: v for k, v in vars(args).items() if k not in ("data", "workdir", "out")},
        "interactions": counts,
        "input_sha256": input_digest(data),
        "n_users": n_users,
        "n_items": n_items,
        "best_epoch": best_epoch + 1,  # 1-based; RecBole logs it 0-based
        "epochs_run": len(epoch_seconds),
        "stopped_early": len(epoch_seconds) < args.epochs,
        "mean_train_seconds_per_epoch": float(np.mean(epoch_seconds)),
        "mean_valid_eval_seconds": float(np.mean(eval_seconds)) if eval_seconds else None,
        "fit_seconds": fit_seconds,
        "best_valid_recall@20": float(best_valid_score),
        "recbole_best_valid": {k: float(v) for k, v in best_valid_result.items()},
        "recbole_test": {k: float(v) for k, v in recbole_test.items()},
        "test_mask_train_only": ours_test,
        "test_mask_train_valid_recomputed": recbole_rule_test,
        "valid_mask_train_only_recomputed": ours_valid,
        "versions": {
            "recbole": recbole.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "torch_threads": torch.get_num_threads(),
        "checkpoint": str(trainer.saved_model_file),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out_path}")
    return result


if __name__ == "__main__":
    main()
