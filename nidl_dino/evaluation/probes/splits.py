"""The cross-validation folds every feature set shares (by target, site, participant)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from sklearn.model_selection import (
    GroupKFold,
    KFold,
    RepeatedStratifiedKFold,
    StratifiedGroupKFold,
    StratifiedKFold,
)

from nidl_dino.errors import UserError
from nidl_dino.evaluation.probes.tasks import FeatureSet, Task

log = logging.getLogger(__name__)


# Regression folds are stratified on quantile bins of the target (times site); at most this many.
_MAX_TARGET_BINS = 4


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


def _check_both_classes(
    target: str,
    splits: list[tuple[int, int, np.ndarray, np.ndarray]],
    inner_cv: object,
    y: np.ndarray,
    groups: np.ndarray | None,
) -> None:
    """Fail early, naming the keys, when a fold of a binary target holds one class only.

    Grouped folds (every scan of a participant on one side) cannot always balance the classes
    of a small cohort; a classifier trained on one class, or an ROC-AUC on one, is undefined.
    """
    for *_, train, test in splits:
        folds = [(train, test)]
        folds += [
            (train[inner_train], train[inner_test])
            for inner_train, inner_test in inner_cv.split(
                np.zeros((len(train), 1)), y[train], None if groups is None else groups[train]
            )
        ]
        for fit_rows, score_rows in folds:
            if len(np.unique(y[fit_rows])) < 2 or len(np.unique(y[score_rows])) < 2:
                raise UserError(
                    f"probe of '{target}': a cross-validation fold holds one class only "
                    f"({len(y)} scans, grouped by participant): too few scans per class for "
                    "probes.n_splits and probes.inner_splits; lower them or add scans"
                )
