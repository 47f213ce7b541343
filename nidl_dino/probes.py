"""Cross-validated linear probes: how much of a cohort variable can a linear model read off features.

Continuous targets (age) get a ridge regression scored by MAE and R^2; binary targets (sex) get a
logistic regression scored by ROC-AUC and balanced accuracy. Every feature set, baselines included,
is scored on exactly the same outer folds, so their rows in the probe table can be compared fold for
fold.

Nothing leaks from a test fold: each outer training fold fits its own pipeline
``[*steps, StandardScaler, Ridge | LogisticRegression]`` inside a ``GridSearchCV`` whose inner folds
pick the regularisation strength, so the scaler (and any PCA in ``steps``) is refitted on every inner
and outer training split and never sees the rows it is scored on.

Example:
    >>> scores = run_probes({"dino": features}, cohort, targets=["age", "sex"])
    >>> print(format_probe_table(scores))
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, clone
from sklearn.dummy import DummyClassifier, DummyRegressor
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import balanced_accuracy_score, mean_absolute_error, r2_score, roc_auc_score
from sklearn.model_selection import (
    GridSearchCV,
    GroupKFold,
    KFold,
    RepeatedStratifiedKFold,
    StratifiedGroupKFold,
    StratifiedKFold,
)
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from nidl_dino.errors import UserError

log = logging.getLogger(__name__)

Task = Literal["regression", "classification"]

#: Name of the built-in "predict the training mean / majority class" feature set.
CHANCE = "chance"
#: Metrics reported per task, in table order.
METRICS: dict[str, tuple[str, ...]] = {
    "regression": ("mae", "r2"),
    "classification": ("roc_auc", "balanced_accuracy"),
}
#: Column labels used by :func:`format_probe_table`.
METRIC_LABELS = {"mae": "MAE", "r2": "R²", "roc_auc": "ROC-AUC", "balanced_accuracy": "bal. acc."}
#: Default regularisation grids, searched in the inner folds.
DEFAULT_ALPHAS = tuple(np.logspace(-2, 5, 8))
DEFAULT_CS = tuple(np.logspace(-4, 2, 7))
# Regression folds are stratified on quantile bins of the target (times site); at most this many.
_MAX_TARGET_BINS = 4


#: Columns of the scores table returned by :func:`run_probes`.
SCORE_COLUMNS = [
    "feature_set",
    "target",
    "task",
    "metric",
    "mean",
    "std",
    "n_folds",
    "n_samples",
    "n_features",
]
#: Columns of the predictions table (the id columns only when the table has them).
PREDICTION_COLUMNS = [
    "feature_set",
    "target",
    "task",
    "row",
    "participant_id",
    "session_id",
    "repeat",
    "fold",
    "y_true",
    "y_pred",
]


@dataclass(frozen=True)
class FeatureSet:
    """A feature matrix plus transformers that must be fitted inside each training fold.

    Use this instead of a bare matrix when part of the feature computation learns from data, such as
    the PCA of the intensity baseline: fitting it on all subjects first would leak the test rows.

    Args:
        X: Features, shape (n_rows, n_features), aligned with the cohort table like any feature set
            (see :func:`run_probes`).
        steps: ``(name, transformer)`` pairs placed before the scaler in the probe pipeline; they are
            cloned and refitted on every inner and outer training split.

    Example:
        >>> FeatureSet(intensities, steps=(("pca", PCA(n_components=32)),))
    """

    X: pd.DataFrame | np.ndarray
    steps: tuple[tuple[str, BaseEstimator], ...] = ()


FeatureSetLike = FeatureSet | pd.DataFrame | np.ndarray | None


def infer_task(values: pd.Series, name: str) -> Task:
    """Decide whether a target column is probed by regression or by classification.

    Args:
        values: The column; missing values are ignored.
        name: Column name, used in the error message.

    Returns:
        ``"classification"`` for exactly two distinct values (any dtype, e.g. ``M``/``F``),
        ``"regression"`` for a numeric column with more than two.

    Raises:
        UserError: Any other column (one value, or a non-numeric column with more than two).
    """
    present = values.dropna()
    n_unique = present.nunique()
    if n_unique == 2:
        return "classification"
    if (
        n_unique > 2
        and pd.api.types.is_numeric_dtype(present)
        and not pd.api.types.is_bool_dtype(present)
    ):
        return "regression"
    raise UserError(
        f"probes.targets: column '{name}' has {n_unique} distinct non-missing value(s) "
        f"(dtype {values.dtype}); a target needs exactly 2 values (classification) or numbers with "
        "more than 2 values (regression): fix the column or remove it from probes.targets"
    )


def make_probe(
    task: Task,
    steps: Sequence[tuple[str, BaseEstimator]] = (),
    *,
    inner_cv: object = 3,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    Cs: Sequence[float] = DEFAULT_CS,
    n_jobs: int | None = None,
    memory: str | None = None,
) -> GridSearchCV:
    """Build the nested probe for one task: a regularisation search over a scaled linear model.

    Args:
        task: ``"regression"`` (ridge, inner score: MAE) or ``"classification"`` (logistic
            regression with balanced class weights, inner score: ROC-AUC).
        steps: Transformers fitted before the scaler (see :class:`FeatureSet`).
        inner_cv: Inner splitter or number of folds for ``GridSearchCV``.
        alphas: Ridge penalties searched.
        Cs: Inverse logistic penalties searched.
        n_jobs: Parallel jobs of the search.
        memory: Cache folder for the pipeline's fitted transformers (``Pipeline(memory=...)``), so
            that ``steps`` such as a PCA are fitted once per inner split rather than once per
            penalty candidate.

    Returns:
        An unfitted ``GridSearchCV`` whose ``fit`` refits the best pipeline on all rows it is given.
    """
    if task == "regression":
        model, grid, scoring = Ridge(), {"model__alpha": list(alphas)}, "neg_mean_absolute_error"
    else:
        # Balanced weights keep the thresholded prediction (balanced accuracy) meaningful when the
        # classes are unequal. liblinear is several times faster than lbfgs at probe sizes; it also
        # penalises the intercept, which is harmless here: with balanced weights the intercept of
        # an uninformative model is 0, and ROC-AUC does not depend on it.
        model = LogisticRegression(
            class_weight="balanced", solver="liblinear", max_iter=1000, random_state=0
        )
        grid, scoring = {"model__C": list(Cs)}, "roc_auc"
    pipeline = Pipeline([*steps, ("scale", StandardScaler()), ("model", model)], memory=memory)
    return GridSearchCV(
        pipeline, grid, scoring=scoring, cv=inner_cv, n_jobs=n_jobs, error_score="raise"
    )


def run_probes(
    feature_sets: Mapping[str, FeatureSetLike],
    table: pd.DataFrame,
    targets: Sequence[str],
    n_splits: int = 5,
    n_repeats: int = 3,
    seed: int = 0,
    stratify_by: str | None = "site",
    task_types: Mapping[str, Task] | None = None,
    *,
    group_by: str | None = "participant_id",
    include_chance: bool = True,
    inner_splits: int = 3,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    Cs: Sequence[float] = DEFAULT_CS,
    n_jobs: int | None = None,
    return_predictions: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Score linear probes of every feature set on every target, on shared repeated K-fold splits.

    Alignment: row ``i`` of a feature set describes row ``i`` of ``table``. A DataFrame feature set
    is matched by index label (it is reindexed to ``table.index``, so it may hold extra rows or
    another order); a NumPy array is matched by position and must have ``len(table)`` rows. Feature
    sets must be numeric and finite on every table row: drop excluded scans before probing.

    Folds: per target, rows whose target is missing are dropped (for every feature set alike), then
    the splits are drawn once and reused for all feature sets. Classification folds are stratified
    on class x ``stratify_by``; regression folds on target-quantile bin (up to 4) x
    ``stratify_by``. A class x site cell with fewer than ``n_splits`` rows is pooled with the other
    small cells of its class (or, if still too small, with the largest cell of its class), so a
    small site never breaks the split. Without a ``stratify_by`` column, strata are the class / bin
    alone. When ``group_by`` names a column with repeated values (several sessions of one
    participant), outer and inner folds keep each group on one side (``StratifiedGroupKFold``).

    Nesting: inside every outer training fold, :func:`make_probe` searches the penalty on
    ``inner_splits`` inner folds with the scaler (and any :class:`FeatureSet` steps) refitted per
    inner split, then refits on the whole outer training fold. Test rows are only ever predicted.
    Cost: per target and feature set, ``n_splits * n_repeats * (len(grid) * inner_splits + 1)``
    linear fits.

    Chance: the feature set :data:`CHANCE` (added first when ``include_chance``, or any key mapped
    to ``None``) is a ``DummyRegressor`` (training mean) or ``DummyClassifier`` (class prior:
    majority class, constant score) scored on the same folds.

    Args:
        feature_sets: Name -> features: DataFrame, array (n_rows, n_features), :class:`FeatureSet`,
            or ``None`` for the chance model. Score rows follow this order, chance first.
        table: Cohort table, one row per scan, with a unique index.
        targets: Columns of ``table`` to predict.
        n_splits: Outer folds per repeat.
        n_repeats: Repeats of the outer K-fold, each with a different shuffle.
        seed: Seed of the outer and inner shuffles.
        stratify_by: Site column to stratify on; ignored (with a log message) when absent.
        task_types: Optional overrides, target -> ``"regression"`` | ``"classification"``.
        group_by: Column whose equal values must stay in one fold; ignored when absent or unique.
        include_chance: Add the :data:`CHANCE` feature set.
        inner_splits: Inner folds of the regularisation search (lowered to the smallest class count
            of a training fold when needed).
        alphas: Ridge penalties searched.
        Cs: Logistic inverse penalties searched.
        n_jobs: Parallel jobs of each search.
        return_predictions: Also return the out-of-fold predictions.

    Returns:
        ``scores``: one row per feature set x target x metric with columns ``feature_set``,
        ``target``, ``task``, ``metric`` (``mae``, ``r2``, ``roc_auc``, ``balanced_accuracy``),
        ``mean`` and ``std`` (sample standard deviation, ddof=1, over the ``n_folds`` =
        ``n_splits * n_repeats`` outer test folds; folds overlap in training rows, so this is a
        spread, not a standard error), ``n_folds``, ``n_samples`` (rows with the target) and
        ``n_features`` (columns of the feature set, before any steps; 0 for chance).
        With ``return_predictions``, also ``predictions``: one row per feature set x target x repeat
        x test row with ``feature_set``, ``target``, ``task``, ``row`` (the table index label),
        ``participant_id`` / ``session_id`` when the table has them, ``repeat``, ``fold``,
        ``y_true`` and ``y_pred``. For classification ``y_true`` is 1.0 for the positive class (the
        larger of the two sorted values, e.g. ``M`` over ``F``) and ``y_pred`` its predicted
        probability.

    Raises:
        UserError: A missing or unusable target column, misaligned or non-numeric features, too few
            rows or classes for ``n_splits``, or a PCA step larger than an inner training fold.
    """
    if table.index.has_duplicates:
        raise UserError(
            "cohort table: the index has duplicate labels; give each row a unique index"
        )
    if n_splits < 2 or n_repeats < 1:
        raise UserError(
            f"probes: n_splits={n_splits}, n_repeats={n_repeats}; use n_splits >= 2, n_repeats >= 1"
        )
    sets: dict[str, FeatureSet | None] = {}
    if include_chance and CHANCE not in feature_sets:
        sets[CHANCE] = None
    for name, value in feature_sets.items():
        sets[name] = None if value is None else _aligned(name, value, table)
    task_types = dict(task_types or {})
    unknown = set(task_types) - set(targets)
    if unknown:
        raise UserError(
            f"probes.task_types: {sorted(unknown)} are not in probes.targets; remove them"
        )

    score_rows, prediction_frames = [], []
    for target in targets:
        if target not in table.columns:
            raise UserError(
                f"probes.targets: column '{target}' is not in the cohort table; "
                f"use one of {list(table.columns)}"
            )
        keep = table[target].notna().to_numpy()
        y_raw = table.loc[keep, target]
        task = task_types.get(target) or infer_task(y_raw, target)
        y = _encode_target(y_raw, target, task)
        splits, inner_cv, groups = _splits(
            table.loc[keep],
            y,
            task,
            target,
            n_splits=n_splits,
            n_repeats=n_repeats,
            seed=seed,
            stratify_by=stratify_by,
            group_by=group_by,
            inner_splits=inner_splits,
        )
        for name, feature_set in sets.items():
            X = None if feature_set is None else feature_set.X[keep]
            if feature_set is not None and feature_set.steps:
                _check_step_sizes(name, target, feature_set, splits, inner_cv, y, groups)
            log.info("probing %s with %s (%s, %d rows)", target, name, task, len(y))
            fold_scores, predictions = _cross_validate(
                feature_set, X, y, task, splits, inner_cv, groups, alphas, Cs, n_jobs
            )
            n_features = 0 if X is None else X.shape[1]
            for metric in METRICS[task]:
                values = np.array([scores[metric] for scores in fold_scores])
                score_rows.append(
                    {
                        "feature_set": name,
                        "target": target,
                        "task": task,
                        "metric": metric,
                        "mean": values.mean(),
                        "std": values.std(ddof=1) if len(values) > 1 else 0.0,
                        "n_folds": len(values),
                        "n_samples": len(y),
                        "n_features": n_features,
                    }
                )
            if return_predictions:
                predictions = predictions.assign(feature_set=name, target=target, task=task)
                predictions["row"] = table.index[keep][predictions.pop("position")]
                for column in ("participant_id", "session_id"):
                    if column in table.columns:
                        predictions[column] = table.loc[predictions["row"], column].to_numpy()
                prediction_frames.append(predictions)

    scores = pd.DataFrame(score_rows, columns=SCORE_COLUMNS)
    order = {name: i for i, name in enumerate(sets)}
    scores = scores.sort_values("feature_set", key=lambda s: s.map(order), kind="stable")
    scores = scores.reset_index(drop=True)
    if not return_predictions:
        return scores
    predictions = pd.concat(prediction_frames, ignore_index=True)
    return scores, predictions[[c for c in PREDICTION_COLUMNS if c in predictions.columns]]


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


#: The metric each task is judged on in :func:`compare_to_baselines`.
PRIMARY_METRIC: dict[str, str] = {"regression": "mae", "classification": "roc_auc"}
#: Columns of the table returned by :func:`compare_to_baselines`.
COMPARISON_COLUMNS = [
    "target",
    "metric",
    "reference",
    "baseline",
    "reference_mean",
    "reference_std",
    "baseline_mean",
    "baseline_std",
    "gain_mean",
    "gain_std",
    "wins",
    "n_folds",
    "beats_by_spread",
]


def compare_to_baselines(predictions: pd.DataFrame, reference: str = "dino") -> pd.DataFrame:
    """The reference feature set against every other one, fold by fold, on the primary metrics.

    Every feature set is scored on the same test folds, so the folds pair up: per target, the
    primary metric (MAE for regression, ROC-AUC for classification) is recomputed on each
    (repeat, fold) test fold from the out-of-fold predictions, and the reference's gain over a
    baseline is taken fold by fold (positive: the reference is better, in the metric's units).

    Args:
        predictions: Out-of-fold predictions of :func:`run_probes` (``feature_set``, ``target``,
            ``task``, ``repeat``, ``fold``, ``y_true``, ``y_pred``).
        reference: The feature set compared with all others.

    Returns:
        One row per target x baseline (columns :data:`COMPARISON_COLUMNS`): the means and sample
        standard deviations (ddof=1) of both sets over the folds, ``gain_mean`` / ``gain_std``
        of the paired gain, ``wins`` (folds where the reference is strictly better),
        ``n_folds``, and ``beats_by_spread``: the reference's mean is better by more than the
        larger of the two fold spreads. Empty when the reference was not probed.
    """
    rows = []
    for (target, task), frame in predictions.groupby(["target", "task"], sort=False):
        metric = PRIMARY_METRIC[task]
        per_fold = pd.Series(
            {
                key: _fold_metric(metric, fold["y_true"], fold["y_pred"])
                for key, fold in frame.groupby(["feature_set", "repeat", "fold"], sort=False)
            }
        ).unstack(0)
        per_fold = per_fold[list(dict.fromkeys(frame["feature_set"]))]  # probing order
        if reference not in per_fold.columns:
            continue
        sign = -1.0 if metric == "mae" else 1.0  # gain > 0: the reference is better
        ref = per_fold[reference]
        for baseline in per_fold.columns.drop(reference):
            base = per_fold[baseline]
            gain = sign * (ref - base)
            spread = max(ref.std(ddof=1), base.std(ddof=1))
            rows.append(
                {
                    "target": target,
                    "metric": metric,
                    "reference": reference,
                    "baseline": baseline,
                    "reference_mean": ref.mean(),
                    "reference_std": ref.std(ddof=1),
                    "baseline_mean": base.mean(),
                    "baseline_std": base.std(ddof=1),
                    "gain_mean": gain.mean(),
                    "gain_std": gain.std(ddof=1),
                    "wins": int((gain > 0).sum()),
                    "n_folds": int(gain.notna().sum()),
                    "beats_by_spread": bool(sign * (ref.mean() - base.mean()) > spread),
                }
            )
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


#: Fewer usable scans than this and the probe table cannot judge features (see
#: :func:`judgement_caveat`): 5 test folds of under 10 scans each give fold-to-fold spreads
#: (age MAE +/- 2-3 years on the demo) larger than the differences between feature sets.
MIN_SCANS_TO_JUDGE = 50


def judgement_caveat(
    comparison: pd.DataFrame, n_scans: int, min_scans: int = MIN_SCANS_TO_JUDGE
) -> str | None:
    """A plain warning when the probes cannot say whether the features are any good, else None.

    Args:
        comparison: Output of :func:`compare_to_baselines` (may be empty).
        n_scans: Number of scans the probes ran on (usable scans with features).
        min_scans: Below this, any comparison is called too small to judge.

    Returns:
        A sentence for the probe table and the report: the cohort is too small (``n_scans <
        min_scans``), or no difference to a baseline exceeds the fold spread; None when at least
        one comparison is larger than the spread on a cohort of at least ``min_scans``.
    """
    if n_scans < min_scans:
        return (
            f"This cohort is too small to judge the features: {n_scans} usable scans (fewer than "
            f"{min_scans}). Differences between feature sets here are mostly fold-to-fold noise; "
            "the run shows that every step works, not how good the features are."
        )
    if len(comparison) and not comparison["beats_by_spread"].astype(bool).any():
        if (comparison["gain_mean"].abs() <= comparison["baseline_std"]).all():
            return (
                f"No difference between DINO and a baseline is larger than the spread across "
                f"folds ({n_scans} scans): these probes cannot tell the feature sets apart."
            )
    return None


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


def _fold_metric(metric: str, y_true: pd.Series, y_pred: pd.Series) -> float:
    if metric == "mae":
        return float(mean_absolute_error(y_true, y_pred))
    if y_true.nunique() < 2:  # a test fold with one class has no AUC
        return float("nan")
    return float(roc_auc_score(y_true, y_pred))


def write_probe_table(scores: pd.DataFrame, path: str | Path) -> None:
    """Write probe scores as a tab-separated table (parent folders are created).

    Args:
        scores: Output of :func:`run_probes`.
        path: Destination ``.tsv`` file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scores.to_csv(path, sep="\t", index=False, float_format="%.6g")


def _format_cell(metric: str, mean: float, std: float) -> str:
    decimals = 2 if metric == "mae" else 3
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def _aligned(name: str, value: FeatureSetLike, table: pd.DataFrame) -> FeatureSet:
    """Return ``value`` as a FeatureSet whose float array rows follow ``table``'s rows."""
    feature_set = value if isinstance(value, FeatureSet) else FeatureSet(value)
    X = feature_set.X
    if isinstance(X, pd.DataFrame):
        if X.index.has_duplicates:
            raise UserError(f"feature set '{name}': the index has duplicate labels; make it unique")
        missing = table.index.difference(X.index)
        if len(missing):
            raise UserError(
                f"feature set '{name}': {len(missing)} cohort table row(s) (e.g. {missing[0]!r}) "
                "have no features; index the features by the same labels as the table"
            )
        text = X.columns[[not pd.api.types.is_numeric_dtype(d) for d in X.dtypes]]
        if len(text):
            raise UserError(
                f"feature set '{name}': column '{text[0]}' is not numeric; "
                "move identifiers to the index or drop them"
            )
        X = X.loc[table.index].to_numpy(dtype=float)
    else:
        try:
            X = np.asarray(X, dtype=float)
        except (TypeError, ValueError) as err:
            raise UserError(
                f"feature set '{name}': not a numeric array ({err}); pass numbers"
            ) from err
        X = X.reshape(-1, 1) if X.ndim == 1 else X
        if X.ndim != 2 or len(X) != len(table):
            raise UserError(
                f"feature set '{name}': array of shape {X.shape} for a cohort table of "
                f"{len(table)} rows; pass one row per table row, in table order"
            )
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        raise UserError(
            f"feature set '{name}': {bad.sum()} row(s) with missing or non-finite values "
            f"(e.g. row {table.index[bad.argmax()]!r}); drop excluded scans (status != 'ok') "
            "from the table before probing"
        )
    return FeatureSet(X, tuple(feature_set.steps))


def _encode_target(values: pd.Series, name: str, task: Task) -> np.ndarray:
    """Regression: float values. Classification: 0/1, 1 for the larger of the two sorted values."""
    if task == "regression":
        if not pd.api.types.is_numeric_dtype(values) or values.nunique() < 2:
            raise UserError(
                f"probes.task_types: column '{name}' is not numeric with varying values; "
                "it cannot be a regression target"
            )
        return values.to_numpy(dtype=float)
    if task != "classification":
        raise UserError(
            f"probes.task_types: '{task}' for column '{name}'; use 'regression' or 'classification'"
        )
    classes = sorted(values.unique(), key=str)
    if len(classes) != 2:
        raise UserError(
            f"probes.task_types: column '{name}' has {len(classes)} classes; classification "
            "probes are binary: recode the column or make it a regression target"
        )
    return (values == classes[1]).to_numpy(dtype=float)


def _strata(primary: np.ndarray, site: pd.Series | None, n_splits: int) -> np.ndarray:
    """Stratum labels primary x site, pooling cells too small to appear in every fold."""
    primary = pd.Series(primary.astype(str))
    if site is None:
        return primary.to_numpy()
    cell = primary + "|" + site.astype(str).to_numpy()
    small = cell.map(cell.value_counts()) < n_splits
    cell[small] = primary[small] + "|pooled"
    counts = cell.value_counts()
    for label in counts.index[(counts < n_splits) & counts.index.str.endswith("|pooled")]:
        pooled = cell == label
        siblings = cell[(primary == primary[pooled].iloc[0]) & ~pooled]
        if len(siblings):
            cell[pooled] = siblings.value_counts().idxmax()
    return cell.to_numpy()


def _splits(
    rows: pd.DataFrame,
    y: np.ndarray,
    task: Task,
    target: str,
    *,
    n_splits: int,
    n_repeats: int,
    seed: int,
    stratify_by: str | None,
    group_by: str | None,
    inner_splits: int,
) -> tuple[list[tuple[int, int, np.ndarray, np.ndarray]], object, np.ndarray | None]:
    """Outer splits ``(repeat, fold, train, test)``, the inner splitter, and the groups (or None)."""
    n = len(y)
    if task == "classification":
        smallest = int(min(y.sum(), n - y.sum()))
        if smallest < n_splits:
            raise UserError(
                f"probes.targets: column '{target}' has only {smallest} row(s) in its smaller "
                f"class, fewer than probes.n_splits={n_splits}; lower n_splits or drop the target"
            )
        primary = y.astype(int)
    else:
        if n < 2 * n_splits:
            raise UserError(
                f"probes.targets: column '{target}' has {n} non-missing rows, fewer than "
                f"2 x probes.n_splits={n_splits}; lower n_splits or drop the target"
            )
        n_bins = max(1, min(_MAX_TARGET_BINS, n // n_splits))
        primary = pd.qcut(pd.Series(y).rank(method="first"), n_bins, labels=False).to_numpy()
    site = None
    if stratify_by is not None:
        if stratify_by in rows.columns:
            site = rows[stratify_by]
        else:
            log.info(
                "no column '%s' in the cohort table: folds not stratified by site", stratify_by
            )
    strata = _strata(primary, site, n_splits)

    groups = None
    if group_by is not None and group_by in rows.columns and rows[group_by].duplicated().any():
        groups = rows[group_by].astype(str).to_numpy()
        if len(np.unique(groups)) < n_splits:
            raise UserError(
                f"probes.n_splits={n_splits} exceeds the number of distinct '{group_by}' values "
                f"with a '{target}'; lower n_splits"
            )
    placeholder = np.zeros((n, 1))
    if groups is None:
        outer = RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=n_repeats, random_state=seed)
        folds = outer.split(placeholder, strata)
    else:
        # scikit-learn has no repeated variant of StratifiedGroupKFold: one shuffle seed per repeat.
        seeds = np.random.default_rng(seed).integers(2**31 - 1, size=n_repeats)
        folds = (
            fold
            for repeat_seed in seeds
            for fold in StratifiedGroupKFold(
                n_splits=n_splits, shuffle=True, random_state=int(repeat_seed)
            ).split(placeholder, strata, groups)
        )
    splits = [(i // n_splits, i % n_splits, train, test) for i, (train, test) in enumerate(folds)]

    n_inner = inner_splits
    if task == "classification":
        n_inner = min(
            n_inner, *(int(min(y[tr].sum(), len(tr) - y[tr].sum())) for *_, tr, _ in splits)
        )
    if groups is not None:
        n_inner = min(n_inner, *(len(np.unique(groups[tr])) for *_, tr, _ in splits))
    if n_inner < 2:
        raise UserError(
            f"probes.targets: column '{target}' leaves too few rows per class in a training fold "
            "for the inner regularisation search; lower probes.n_splits or drop the target"
        )
    if groups is not None and task == "classification":
        inner = StratifiedGroupKFold(n_inner, shuffle=True, random_state=seed)
    elif groups is not None:
        inner = GroupKFold(n_inner)
    elif task == "classification":
        inner = StratifiedKFold(n_inner, shuffle=True, random_state=seed)
    else:
        inner = KFold(n_inner, shuffle=True, random_state=seed)
    return splits, inner, groups


def _check_step_sizes(
    name: str,
    target: str,
    feature_set: FeatureSet,
    splits: list[tuple[int, int, np.ndarray, np.ndarray]],
    inner_cv: object,
    y: np.ndarray,
    groups: np.ndarray | None,
) -> None:
    """Fail early, with the config key, when a PCA-like step has more components than rows."""
    sizes = [
        len(inner_train)
        for *_, train, _ in splits
        for inner_train, _ in inner_cv.split(
            np.zeros((len(train), 1)), y[train], None if groups is None else groups[train]
        )
    ]
    limit = min(min(sizes), feature_set.X.shape[1])
    for step_name, step in feature_set.steps:
        n_components = getattr(step, "n_components", None)
        if isinstance(n_components, (int, np.integer)) and n_components > limit:
            raise UserError(
                f"feature set '{name}': step '{step_name}' asks for n_components={n_components} but "
                f"target '{target}' leaves only {limit} rows or features in the smallest inner "
                "training fold; lower probes.pca.n_components"
            )


def _cross_validate(
    feature_set: FeatureSet | None,
    X: np.ndarray | None,
    y: np.ndarray,
    task: Task,
    splits: list[tuple[int, int, np.ndarray, np.ndarray]],
    inner_cv: object,
    groups: np.ndarray | None,
    alphas: Sequence[float],
    Cs: Sequence[float],
    n_jobs: int | None,
) -> tuple[list[dict[str, float]], pd.DataFrame]:
    """Fit on every outer training fold, score on its test fold; return scores and predictions."""
    if feature_set is None:
        chance = DummyRegressor() if task == "regression" else DummyClassifier(strategy="prior")
        return _fit_and_score(chance, np.zeros((len(y), 1)), y, task, splits, None)
    # Learned steps (a PCA) do not depend on the penalty: cache their fits across candidates.
    cache = tempfile.TemporaryDirectory(prefix="nidl_dino_probe_") if feature_set.steps else None
    with cache or contextlib.nullcontext():
        probe = make_probe(
            task,
            feature_set.steps,
            inner_cv=inner_cv,
            alphas=alphas,
            Cs=Cs,
            n_jobs=n_jobs,
            memory=cache.name if cache else None,
        )
        return _fit_and_score(probe, X, y, task, splits, groups)


def _fit_and_score(
    template: BaseEstimator,
    X: np.ndarray,
    y: np.ndarray,
    task: Task,
    splits: list[tuple[int, int, np.ndarray, np.ndarray]],
    groups: np.ndarray | None,
) -> tuple[list[dict[str, float]], pd.DataFrame]:
    """Fit a clone of ``template`` per outer training fold and score it on the test fold."""
    fold_scores, frames = [], []
    for repeat, fold, train, test in splits:
        estimator = clone(template)
        fit_params = {} if groups is None else {"groups": groups[train]}
        estimator.fit(X[train], y[train], **fit_params)
        if task == "regression":
            y_pred = estimator.predict(X[test])
            scores = {
                "mae": mean_absolute_error(y[test], y_pred),
                "r2": r2_score(y[test], y_pred),
            }
        else:
            y_pred = estimator.predict_proba(X[test])[:, 1]
            scores = {
                "roc_auc": roc_auc_score(y[test], y_pred),
                "balanced_accuracy": balanced_accuracy_score(y[test], estimator.predict(X[test])),
            }
        fold_scores.append(scores)
        frames.append(
            pd.DataFrame(
                {
                    "position": test,
                    "repeat": repeat,
                    "fold": fold,
                    "y_true": y[test],
                    "y_pred": y_pred,
                }
            )
        )
    return fold_scores, pd.concat(frames, ignore_index=True)
