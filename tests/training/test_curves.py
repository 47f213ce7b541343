"""Training curves (nidl_dino.training.curves): metrics of several (re)starts joined by step."""

from __future__ import annotations

import pandas as pd

from nidl_dino.training.curves import plot_training_curves, read_metrics


def _csv(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_later_restart_wins_for_a_step_logged_twice(tmp_path):
    first = _csv(tmp_path / "v0.csv", [{"step": 0, "train/loss_step": 5.0},
                                        {"step": 1, "train/loss_step": 4.0}])  # fmt: skip
    second = _csv(tmp_path / "v1.csv", [{"step": 1, "train/loss_step": 3.9},
                                         {"step": 2, "train/loss_step": 3.0}])  # fmt: skip
    (tmp_path / "empty.csv").write_text("")
    metrics = read_metrics([first, second, tmp_path / "empty.csv"])
    last = metrics.drop_duplicates("step", keep="last").set_index("step")["train/loss_step"]
    assert last.to_dict() == {0: 5.0, 1: 3.9, 2: 3.0}
    assert read_metrics([]).empty


def test_plot_writes_a_png_even_without_some_metrics(tmp_path):
    csv = _csv(tmp_path / "m.csv", [{"step": s, "train/loss_step": 5.0 - s,
                                      "train/teacher_entropy": 1.0,
                                      "train/teacher_batch_entropy": 2.0} for s in range(5)])  # fmt: skip
    out = tmp_path / "curves.png"
    plot_training_curves([csv], out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp.png"))
