"""A run's curves.png: the validation panel only where there was validation."""

from matplotlib.image import imread

from darec_dist.train import report


def _curves_width(run_dir, records) -> int:
    for record in records:
        report.append_metrics(run_dir, record)
    report.plot_curves(run_dir, "recall@20")
    return imread(run_dir / "curves.png").shape[1]


def test_curves_without_validation_have_no_empty_panel(tmp_path):
    train = [{"kind": "train", "epoch": e, "loss": 0.7 - 0.1 * e} for e in range(3)]
    with_val = tmp_path / "with_val"
    without_val = tmp_path / "without_val"
    with_val.mkdir()
    without_val.mkdir()
    val = [{"kind": "val", "epoch": e, "recall@20": 0.1 * e} for e in range(3)]
    # Two panels side by side with validation, one (half as wide) without it (eval.validate=false).
    assert _curves_width(with_val, train + val) == 2 * _curves_width(without_val, train)
