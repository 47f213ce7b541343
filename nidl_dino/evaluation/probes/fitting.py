"""Fitting the probes: ridge / logistic pipelines, inner-fold tuning, the outer CV loop."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, clone
from sklearn.compose import ColumnTransformer
from sklearn.dummy import DummyClassifier, DummyRegressor
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import balanced_accuracy_score, mean_absolute_error, r2_score, roc_auc_score
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from nidl_dino.errors import UserError
from nidl_dino.evaluation.probes import tasks
from nidl_dino.evaluation.probes.splits import _check_both_classes, _check_step_sizes, _splits

log = logging.getLogger(__name__)


#: Default regularisation grids, searched in the inner folds.
DEFAULT_ALPHAS = tuple(np.logspace(-2, 5, 8))


DEFAULT_CS = tuple(np.logspace(-4, 2, 7))


def make_probe(
    task: tasks.Task,
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
    feature_sets: Mapping[str, tasks.FeatureSetLike],
    table: pd.DataFrame,
    targets: Sequence[str],
    n_splits: int = 5,
    n_repeats: int = 3,
    seed: int = 0,
    stratify_by: str | None = "site",
    task_types: Mapping[str, tasks.Task] | None = None,
    *,
    group_by: str | None = "participant_id",
    include_chance: bool = True,
    inner_splits: int = 3,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    Cs: Sequence[float] = DEFAULT_CS,
    n_jobs: int | None = None,
    return_predictions: bool = False,
    covariates: Sequence[str] = (),
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

    Regression predictions are clipped to the target's range in the outer training fold (a
    linear probe can extrapolate without bound on an atypical scan).

    Nesting: inside every outer training fold, :func:`make_probe` searches the penalty on
    ``inner_splits`` inner folds with the scaler (and any :class:`FeatureSet` steps) refitted per
    inner split, then refits on the whole outer training fold. Test rows are only ever predicted.
    Cost: per target and feature set, ``n_splits * n_repeats * (len(grid) * inner_splits + 1)``
    linear fits.

    Covariates: with ``covariates`` (cohort columns such as ``site``), every feature set's probe
    also gets the covariates' design columns (:func:`~.tasks.covariate_matrix`: one indicator per
    site, numbers as they are), scaled and penalised like the features, and the covariates alone
    are probed as the feature set :data:`COVARIATES`, so a table shows what the site alone
    predicts. A feature set's own steps (a PCA) see its own columns only.

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
        covariates: Columns of ``table`` added to every feature set's probe (none by default).

    Returns:
        ``scores``: one row per feature set x target x metric with columns ``feature_set``,
        ``target``, ``task``, ``metric`` (``mae``, ``r2``, ``roc_auc``, ``balanced_accuracy``),
        ``mean`` and ``std`` (sample standard deviation, ddof=1, over the ``n_folds`` =
        ``n_splits * n_repeats`` outer test folds; folds overlap in training rows, so this is a
        spread, not a standard error), ``n_folds``, ``n_samples`` (rows with the target) and
        ``n_features`` (columns of the feature set, before any steps and without the
        covariates; 0 for chance).
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
    sets: dict[str, tasks.FeatureSet | None] = {}
    if include_chance and tasks.CHANCE not in feature_sets:
        sets[tasks.CHANCE] = None
    leaked = sorted(set(covariates) & set(targets))
    if leaked:
        raise UserError(
            f"probes.covariates: '{leaked[0]}' is also a probe target; remove it from "
            "probes.covariates or from probes.targets"
        )
    design = tasks.covariate_matrix(table, covariates)
    if design.shape[1] and tasks.COVARIATES not in feature_sets:
        sets[tasks.COVARIATES] = tasks.FeatureSet(design)
    for name, value in feature_sets.items():
        sets[name] = None if value is None else tasks._aligned(name, value, table)
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
        task = task_types.get(target) or tasks.infer_task(y_raw, target)
        y = tasks._encode_target(y_raw, target, task)
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
        if task == "classification":
            _check_both_classes(target, splits, inner_cv, y, groups)
        for name, feature_set in sets.items():
            if feature_set is not None and feature_set.steps:
                _check_step_sizes(name, target, feature_set, splits, inner_cv, y, groups)
            probed = feature_set
            if feature_set is not None and name != tasks.COVARIATES and design.shape[1]:
                probed = _with_covariates(feature_set, design)
            X = None if probed is None else probed.X[keep]
            log.info("probing %s with %s (%s, %d rows)", target, name, task, len(y))
            fold_scores, predictions = _cross_validate(
                probed, X, y, task, splits, inner_cv, groups, alphas, Cs, n_jobs
            )
            n_features = 0 if feature_set is None else feature_set.X.shape[1]
            for metric in tasks.METRICS[task]:
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

    scores = pd.DataFrame(score_rows, columns=tasks.SCORE_COLUMNS)
    order = {name: i for i, name in enumerate(sets)}
    scores = scores.sort_values("feature_set", key=lambda s: s.map(order), kind="stable")
    scores = scores.reset_index(drop=True)
    if not return_predictions:
        return scores
    predictions = pd.concat(prediction_frames, ignore_index=True)
    return scores, predictions[[c for c in tasks.PREDICTION_COLUMNS if c in predictions.columns]]


def _with_covariates(feature_set: tasks.FeatureSet, design: np.ndarray) -> tasks.FeatureSet:
    """The feature set's columns followed by the covariates' design columns.

    Its own steps (a PCA fitted inside every training fold) are applied to its own columns
    only; the covariates pass through to the scaler and the linear model.
    """
    n = feature_set.X.shape[1]
    X = np.hstack([feature_set.X, design])
    if not feature_set.steps:
        return tasks.FeatureSet(X)
    own = ColumnTransformer(
        [
            ("features", Pipeline(list(feature_set.steps)), slice(0, n)),
            ("covariates", "passthrough", slice(n, X.shape[1])),
        ]
    )
    return tasks.FeatureSet(X, (("with_covariates", own),))


def _fold_metric(metric: str, y_true: pd.Series, y_pred: pd.Series) -> float:
    if metric == "mae":
        return float(mean_absolute_error(y_true, y_pred))
    if y_true.nunique() < 2:  # a test fold with one class has no AUC
        return float("nan")
    return float(roc_auc_score(y_true, y_pred))


def _cross_validate(
    feature_set: tasks.FeatureSet | None,
    X: np.ndarray | None,
    y: np.ndarray,
    task: tasks.Task,
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
    task: tasks.Task,
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
            # A linear probe extrapolates without bound on a scan unlike any training scan (one
            # atypical brain histogram gave an age of 362 years): predictions are kept within
            # the training fold's target range, for every feature set alike.
            y_pred = np.clip(estimator.predict(X[test]), y[train].min(), y[train].max())
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
