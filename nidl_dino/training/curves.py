"""Training curves (loss, teacher entropy, temperature, momentum, learning rate) as one PNG."""

from __future__ import annotations

import os
from collections.abc import Sequence

import pandas as pd

from nidl_dino.atomic import atomic_path

#: (metric column in Lightning's metrics.csv, panel title)
CURVES = [
    ("train/loss_step", "DINO loss (train)"),
    ("train/teacher_entropy", "teacher entropy (nats)"),
    ("train/teacher_temp", "teacher temperature"),
    ("train/momentum", "teacher momentum"),
    ("train/lr", "learning rate"),
]


def read_metrics(metrics_csvs: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Lightning CSV metrics of one run, possibly split over several (re)starts.

    Later files win for a step logged twice (a resumed run repeats nothing it had
    checkpointed, but may repeat steps logged after the last checkpoint).
    """
    frames = [pd.read_csv(p) for p in metrics_csvs if os.path.getsize(p) > 0]
    if not frames:
        return pd.DataFrame({"step": []})
    for order, frame in enumerate(frames):
        frame["_start"] = order
    metrics = pd.concat(frames, ignore_index=True)
    return metrics.sort_values(["step", "_start"]).reset_index(drop=True)


def plot_training_curves(
    metrics_csvs: Sequence[str | os.PathLike], out_png: str | os.PathLike
) -> None:
    """Plot the curves logged by :class:`nidl_dino.DINO` against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = read_metrics(metrics_csvs)
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for ax, (column, title) in zip(axes, CURVES, strict=True):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        if column in metrics.columns:
            data = metrics[["step", column, "_start"]].dropna()
            data = data.drop_duplicates("step", keep="last")
            label = "per view" if column == "train/teacher_entropy" else None
            ax.plot(data["step"], data[column], marker="." if len(data) < 50 else None, label=label)
        if column == "train/teacher_entropy" and "train/teacher_batch_entropy" in metrics.columns:
            # Collapse shows here: per-view entropy rising to ln K (uniform outputs), or the
            # batch-mean entropy falling towards 0 (one prototype for every volume).
            data = metrics[["step", "train/teacher_batch_entropy"]].dropna()
            data = data.drop_duplicates("step", keep="last")
            ax.plot(data["step"], data["train/teacher_batch_entropy"], label="batch mean")
            ax.legend()
        if column == "train/loss_step" and "val/loss" in metrics.columns:
            val = metrics[["step", "val/loss"]].dropna()
            ax.plot(val["step"], val["val/loss"], marker="o", label="validation")
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
