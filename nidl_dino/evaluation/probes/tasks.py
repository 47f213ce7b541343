"""What a probe predicts and from what: task inference, feature sets, targets, column names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator

from nidl_dino.errors import UserError

Task = Literal["regression", "classification"]


#: Name of the built-in "predict the training mean / majority class" feature set.
CHANCE = "chance"


#: Name of the feature set of the probe covariates alone (``run_probes(covariates=...)``).
COVARIATES = "covariates"


#: Metrics reported per task, in table order.
METRICS: dict[str, tuple[str, ...]] = {
    "regression": ("mae", "r2"),
    "classification": ("roc_auc", "balanced_accuracy"),
}


#: Column labels used by :func:`format_probe_table`.
METRIC_LABELS = {"mae": "MAE", "r2": "R²", "roc_auc": "ROC-AUC", "balanced_accuracy": "bal. acc."}


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


def covariate_matrix(table: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """The design columns of the probe covariates: one-hot categories, numbers as they are.

    A column of labels (a site) is one indicator per value seen in ``table`` (a missing label is
    a value of its own, ``n/a``); so is a column of whole numbers, as sites are often coded
    (1, 2, 3; UK Biobank's 11025...). A column with fractional values (a head size in ml) is one
    covariate, as it is. The categories come from the cohort's labels only, never from a
    target. A column with a single value carries nothing and gives no design column.

    Args:
        table: the rows to probe.
        columns: cohort columns to adjust every probe for (``probes.covariates``).

    Returns:
        ``(len(table), n_design)`` floats; ``n_design`` may be 0.

    Raises:
        UserError: a column missing from the table, or a numeric column with missing values.
    """
    blocks = [np.zeros((len(table), 0))]
    for column in columns:
        if column not in table.columns:
            raise UserError(
                f"probes.covariates: column '{column}' is not in the cohort table; "
                f"use one of {list(table.columns)} or remove it"
            )
        values = table[column]
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        if numeric and not (values.dropna() % 1 == 0).all():
            if values.isna().any():
                raise UserError(
                    f"probes.covariates: column '{column}' has {int(values.isna().sum())} missing "
                    "value(s) among the probed scans; fill them (participants.tsv) or remove it from "
                    "probes.covariates"
                )
            if values.nunique() > 1:
                blocks.append(values.to_numpy(dtype=float).reshape(-1, 1))
            continue
        if numeric:  # whole numbers: codes, 2 not 2.0
            values = values.astype("Int64")
        indicators = pd.get_dummies(values.astype("string").fillna("n/a"), dtype=float)
        if indicators.shape[1] > 1:
            blocks.append(indicators.to_numpy())
    return np.hstack(blocks)
