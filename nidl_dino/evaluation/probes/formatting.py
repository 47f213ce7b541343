"""The probe and comparison tables as Markdown and TSV."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from nidl_dino.atomic import atomic_path
from nidl_dino.evaluation.probes.tasks import METRIC_LABELS


def format_probe_table(scores: pd.DataFrame) -> str:
    """Render probe scores as a compact markdown table.

    Args:
        scores: Output of :func:`run_probes` (or the TSV of :func:`write_probe_table` read back).

    Returns:
        A markdown table with one row per feature set (in the order of ``scores``) and one column
        per target and metric, each cell ``mean ± std`` (2 decimals for MAE, in the target's units;
        3 for the bounded metrics).
    """
    # Hand-written because pandas' to_markdown needs the optional `tabulate` package.
    columns = list(dict.fromkeys(zip(scores["target"], scores["metric"], strict=True)))
    names = list(dict.fromkeys(scores["feature_set"]))
    cells = {
        (row.feature_set, row.target, row.metric): _format_cell(row.metric, row.mean, row.std)
        for row in scores.itertuples(index=False)
    }
    header = ["feature set", *(f"{t} {METRIC_LABELS.get(m, m)}" for t, m in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for name in names:
        row = [name, *(cells.get((name, t, m), "") for t, m in columns)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def format_comparison_table(comparison: pd.DataFrame) -> str:
    """Render :func:`compare_to_baselines` as a markdown table, one row per target x baseline."""
    lines = [
        "| target | metric | baseline | gain of the reference (paired) | folds won | "
        "better by more than the spread |",
        "|---|---|---|---|---|---|",
    ]
    for row in comparison.itertuples(index=False):
        gain = format_gain(row.metric, row.gain_mean, row.gain_std)
        lines.append(
            f"| {row.target} | {METRIC_LABELS.get(row.metric, row.metric)} | {row.baseline} | "
            f"{gain} | {row.wins}/{row.n_folds} | {'yes' if row.beats_by_spread else 'no'} |"
        )
    return "\n".join(lines)


def format_gain(metric: str, mean: float, std: float) -> str:
    """A paired gain as ``+mean ± std`` (2 decimals for MAE, 3 for the bounded metrics)."""
    decimals = 2 if metric == "mae" else 3
    return f"{mean:+.{decimals}f} ± {std:.{decimals}f}"


def write_probe_table(scores: pd.DataFrame, path: str | Path) -> None:
    """Write probe scores as a tab-separated table (parent folders are created).

    Args:
        scores: Output of :func:`run_probes`.
        path: Destination ``.tsv`` file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # a killed job leaves no truncated table
        scores.to_csv(tmp, sep="\t", index=False, float_format="%.6g")


def _format_cell(metric: str, mean: float, std: float) -> str:
    decimals = 2 if metric == "mae" else 3
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"
