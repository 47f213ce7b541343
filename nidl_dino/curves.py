"""Training curves (loss, teacher temperature, momentum, learning rate) as one PNG."""

from __future__ import annotations

import os
from collections.abc import Sequence

import pandas as pd

#: (metric column in Lightning's metrics.csv, panel title)
CURVES = [
    ("train/loss_step", "DINO loss (train)"),
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
            ax.plot(data["step"], data[column], marker="." if len(data) < 50 else None)
        if column == "train/loss_step" and "val/loss" in metrics.columns:
            val = metrics[["step", "val/loss"]].dropna()
            ax.plot(val["step"], val["val/loss"], marker="o", label="validation")
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = f"{out_png}.tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out_png)
