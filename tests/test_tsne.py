"""launch/tsne.py: its --out is checked before any work, and a run whose dataset moved is pointed at it with data.path=."""

import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO


def tsne(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/tsne.py", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("out, message", [
    ("picture", "expected a file name ending in an image format's suffix, one of"),  # savefig failed on '.picture.tmp'
    ("picture.txt", "expected a file name ending in an image format's suffix, one of"),
    (".", "is a directory; give a file name such as"),
    ("folder.png", "is a directory; give a file name such as"),
    ("missing/picture.png", "missing is not a directory"),
])
def test_out_that_savefig_cannot_write_is_refused_before_the_run_is_read(tmp_path, out, message):
    (tmp_path / "folder.png").mkdir()
    done = tsne(str(tmp_path / "no-run"), "--out", str(tmp_path / out))
    assert done.returncode == 2 and f"--out {tmp_path / out}" in done.stderr and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_run_whose_dataset_moved_is_pointed_at_it_with_data_path(small_dataset, tmp_path):
    root, _ = small_dataset
    dataset = tmp_path / "dataset"
    shutil.copytree(root, dataset)
    run_dir = tmp_path / "run"
    train = [sys.executable, "launch/train.py", "configs/train/default.yaml", f"data.path={dataset}", f"run_dir={run_dir}", "device=cpu",
             "model.dim=8", "loader.batch_size=64", "train.epochs=1", "train.progress_bar=false", "output.plot=false", "align.method=darec"]
    trained = subprocess.run(train, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    moved = dataset.rename(tmp_path / "moved")
    picture = tmp_path / "tsne.png"

    # Where it was: the error says how to point at where it went, as launch/evaluate.py's does.
    done = tsne(str(run_dir), "--nodes", "8", "--out", str(picture))
    assert done.returncode == 2 and f"{dataset}: no manifest.json; not a finished dataset" in done.stderr and "data.path=DIR" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not picture.exists()
    evaluated = subprocess.run([sys.executable, "launch/evaluate.py", str(run_dir)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 2 and "data.path=DIR" in evaluated.stderr, evaluated.stderr

    # The overrides of evaluate.py, model keys refused alike (the checkpoint holds the run's model).
    done = tsne(str(run_dir), "--nodes", "8", "--out", str(picture), "model.dim=16")
    assert done.returncode == 2 and "['model.dim=16']: these keys shape the model" in done.stderr, done.stderr
    done = tsne(str(run_dir), f"data.path={moved}", "--nodes", "8", "--out", str(picture))
    assert done.returncode == 0 and "c_sh: mean pairwise cosine" in done.stdout, done.stderr[-2000:]
    assert picture.stat().st_size > 0

    # Without its best checkpoint the run is refused as such before the dataset is opened (it is not where the run says).
    (run_dir / "checkpoints" / "best").rename(tmp_path / "best-elsewhere")
    done = tsne(str(run_dir), "--nodes", "8", "--out", str(tmp_path / "again.png"))
    assert done.returncode == 2 and "checkpoints/best" in done.stderr and "manifest.json" not in done.stderr, done.stderr


def test_matched_centres_assign_each_side_to_its_own():
    """c_sh was assigned to the LLM side's centres under align.darec.centres=matched, where each side has its own."""
    import torch

    from darec_dist.models.aligners.darec import DaRec, DaRecConfig
    from launch.tsne import assignment_entropy

    darec = DaRec(DaRecConfig(centres="matched", clusters=4, cluster_temperature=0.05), collab_dim=8, llm_dim=16)
    llm_centres, collab_centres = torch.eye(8)[:4], torch.eye(8)[4:]
    darec.centres.copy_(llm_centres)
    darec.collab_centres.copy_(collab_centres)
    # Each side's rows lie on its own centres: both assignments are sharp (entropy near 0, far below log 4).
    entropy = assignment_entropy(darec, {"c_sh": collab_centres.repeat(5, 1), "l_sh": llm_centres.repeat(5, 1)})
    assert entropy["c_sh"] < 0.01 and entropy["l_sh"] < 0.01 and entropy["uniform"] == pytest.approx(np.log(4))
