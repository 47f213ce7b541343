"""The report's figures: matplotlib drawings and image shrinking, no HTML.

Figures are drawn with :class:`matplotlib.figure.Figure` (no pyplot state): out-of-fold
predictions against the truth, the 2D PCA embedding of the features, and the QC thumbnails
(shrunk by area averaging to :data:`THUMBNAIL_WIDTH` pixels and posterised to
:data:`THUMBNAIL_LEVELS` levels per channel, which roughly halves their PNG size with no visible
loss). :mod:`nidl_dino.evaluation.report` puts them into the page.
"""

from __future__ import annotations

import io
import os
import re
from typing import Any

import numpy as np
import pandas as pd

from nidl_dino.errors import UserError

#: Feature set shown first and highlighted in the probe table and the scatter.
DINO = "dino"
#: Width in pixels of the QC thumbnails in the montage (the QC pictures are 900 pixels wide).
THUMBNAIL_WIDTH = 360
#: Intensity levels per colour channel kept in the thumbnails (fewer levels, smaller PNGs).
THUMBNAIL_LEVELS = 32


_FEATURE_COLUMN = re.compile(r"^feature_\d+$")


def feature_names(table: pd.DataFrame) -> list[str]:
    """The ``feature_NNNN`` columns of a table, in order."""
    return [c for c in table.columns if _FEATURE_COLUMN.match(str(c))]


def png_bytes(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes (no software tag: same figure, same bytes)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def averaged_predictions(predictions: pd.DataFrame, target: str) -> pd.DataFrame:
    """Out-of-fold predictions of one target, averaged over repeats per feature set and scan.

    A scan is identified by ``row`` (the cohort table's index label), else by
    ``participant_id`` and ``session_id``.

    Args:
        predictions: Long-form predictions with ``feature_set``, ``target``, ``y_true``,
            ``y_pred`` and the id columns.
        target: Target to keep.

    Returns:
        One row per feature set and scan with ``feature_set``, the id columns, ``y_true`` and
        ``y_pred`` (mean over repeats), in order of first appearance.
    """
    rows = predictions[predictions["target"] == target]
    # ``row`` is one per scan (two runs of a session share participant and session ids)
    ids = ["row"] if "row" in rows.columns else ["participant_id", "session_id"]
    grouped = rows.groupby(["feature_set", *ids], sort=False, dropna=False)
    return grouped.agg(y_true=("y_true", "first"), y_pred=("y_pred", "mean")).reset_index()


def pca_embedding(cohort: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """2D PCA of the standardised features of the scans that passed QC.

    Args:
        cohort: Cohort table with ``feature_*`` columns and optionally ``status``.

    Returns:
        ``(rows, xy, explained)``: the rows used (``status == "ok"`` when the column exists,
        with finite features), their coordinates of shape (n_rows, 2), and the fraction of
        variance explained by each axis, shape (2,).

    Raises:
        UserError: No ``feature_*`` columns, fewer than 2 feature columns, or fewer than 3 rows.
    """
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    columns = feature_names(cohort)
    if len(columns) < 2:
        raise UserError(
            f"cohort table: {len(columns)} feature_* column(s); an embedding needs at least 2"
        )
    rows = cohort
    if "status" in rows.columns:
        rows = rows[rows["status"] == "ok"]
    X = rows[columns].to_numpy(dtype=float)
    finite = np.isfinite(X).all(axis=1)
    rows, X = rows[finite], X[finite]
    if len(rows) < 3:
        raise UserError(f"cohort table: {len(rows)} scan(s) with features; need at least 3")
    pca = PCA(n_components=2, random_state=0)
    xy = pca.fit_transform(StandardScaler().fit_transform(X))
    return rows, xy, pca.explained_variance_ratio_


def predicted_vs_true(predictions: pd.DataFrame):
    """Out-of-fold predictions against the truth, one panel per regression target.

    DINO's points and those of the baseline with the lowest MAE are drawn, with the identity.

    Returns:
        ``(figure, targets, legends)`` (a legend line per target with every feature set's MAE of
        the averaged predictions), or None when no regression target was probed.
    """
    regression = predictions[predictions["task"] == "regression"]
    targets = list(dict.fromkeys(regression["target"]))
    if not targets:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(targets), 5.0), dpi=100)
    axes = fig.subplots(1, len(targets), squeeze=False)[0]
    legends = []
    for ax, target in zip(axes, targets, strict=True):
        averaged = averaged_predictions(regression, target).dropna(subset=["y_true", "y_pred"])
        mae = {
            name: float(np.mean(np.abs(group["y_pred"] - group["y_true"])))
            for name, group in averaged.groupby("feature_set", sort=False)
        }
        baselines = {name: value for name, value in mae.items() if name != DINO}
        shown = [DINO] if DINO in mae else []
        if baselines:
            shown.append(min(baselines, key=baselines.get))
        true_values = averaged["y_true"]
        low, high = float(true_values.min()), float(true_values.max())
        for name, color, marker in zip(shown, ("#1f5fae", "#e07b00"), ("o", "s"), strict=False):
            group = averaged[averaged["feature_set"] == name]
            label = f"{name} (MAE {mae[name]:.2f})"
            if name != DINO:
                label = f"best baseline: {label}"
            ax.scatter(
                group["y_true"],
                group["y_pred"],
                s=22,
                alpha=0.75,
                c=color,
                marker=marker,
                edgecolors="none",
                label=label,
            )
            low = min(low, float(group["y_pred"].min()))
            high = max(high, float(group["y_pred"].max()))
        pad = 0.04 * (high - low or 1.0)
        ax.plot(
            [low - pad, high + pad],
            [low - pad, high + pad],
            ls="--",
            c="0.5",
            lw=1,
            label="identity",
        )
        ax.set_xlim(low - pad, high + pad)
        ax.set_ylim(low - pad, high + pad)
        ax.set_aspect("equal")
        ax.set_xlabel(f"true {target}")
        ax.set_ylabel(f"predicted {target}")
        ax.set_title(f"{target}: out-of-fold predictions")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=9)
        legends.append(
            f"{target}: " + ", ".join(f"{name} MAE {value:.2f}" for name, value in mae.items())
        )
    fig.tight_layout()
    return fig, targets, legends


def embedding_figure(rows: pd.DataFrame, xy: np.ndarray, explained: np.ndarray):
    """The 2D PCA embedding (:func:`pca_embedding`) coloured by age and by site.

    Returns:
        ``(figure, notes)``: notes say which panel is missing and why (no age, no site).
    """
    from matplotlib.figure import Figure

    notes = []
    panels = []
    if "age" in rows.columns and pd.to_numeric(rows["age"], errors="coerce").notna().any():
        panels.append("age")
    else:
        notes.append("No age panel: the cohort table has no 'age' values.")
    if "site" in rows.columns and rows["site"].notna().any():
        panels.append("site")
    else:
        notes.append("No site panel: the cohort table has no 'site' values.")
    shown = panels or [None]
    fig = Figure(figsize=(6.2 * len(shown), 5.0), dpi=100)
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    for ax, panel in zip(axes, shown, strict=True):
        if panel == "age":
            age = pd.to_numeric(rows["age"], errors="coerce").to_numpy(dtype=float)
            known = np.isfinite(age)
            if (~known).any():
                ax.scatter(*xy[~known].T, s=20, c="0.7", label="no age")
                ax.legend(loc="best", fontsize=9)
            points = ax.scatter(*xy[known].T, s=24, c=age[known], cmap="viridis", edgecolors="none")
            fig.colorbar(points, ax=ax, label="age")
            ax.set_title("coloured by age")
        elif panel == "site":
            site = rows["site"].astype("string").fillna("n/a").to_numpy()
            names = sorted(set(site))
            cmap = categorical_colors(len(names))
            for i, name in enumerate(names):
                ax.scatter(*xy[site == name].T, s=24, color=cmap[i], edgecolors="none", label=name)
            ax.legend(
                title="site",
                loc="center left",
                bbox_to_anchor=(1.01, 0.5),
                fontsize=9,
                ncols=1 if len(names) <= 16 else 2,
            )
            ax.set_title("coloured by site")
        else:
            ax.scatter(*xy.T, s=24, c="#1f5fae", edgecolors="none")
            ax.set_title("scans")
        ax.set_xlabel(f"PC1 ({100 * explained[0]:.1f}% of variance)")
        ax.set_ylabel(f"PC2 ({100 * explained[1]:.1f}% of variance)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig, notes


def thumbnail(path: str | os.PathLike) -> bytes:
    """A QC picture shrunk to at most :data:`THUMBNAIL_WIDTH` pixels wide, as PNG bytes."""
    import matplotlib.image

    image = np.asarray(matplotlib.image.imread(path), dtype=np.float32)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    image = image[..., :3]
    height, width = image.shape[:2]
    if width > THUMBNAIL_WIDTH:
        new_width = THUMBNAIL_WIDTH
        new_height = max(1, round(height * new_width / width))
        image = _area_average(image, new_height, new_width)
    levels = THUMBNAIL_LEVELS - 1
    image = np.round(np.clip(image, 0.0, 1.0) * levels) / levels
    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, image, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _area_average(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Shrink (H, W, C) to (height, width, C) by averaging the source pixels of each output pixel.

    Averaging over the covered block, unlike sampling, does not alias the thin template outline.
    """
    rows = np.floor(np.arange(height) * image.shape[0] / height).astype(int)
    cols = np.floor(np.arange(width) * image.shape[1] / width).astype(int)
    summed = np.add.reduceat(np.add.reduceat(image, rows, axis=0), cols, axis=1)
    counts = np.outer(np.diff([*rows, image.shape[0]]), np.diff([*cols, image.shape[1]]))
    return summed / counts[..., None]


def categorical_colors(n: int) -> list[tuple[float, ...]]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]
