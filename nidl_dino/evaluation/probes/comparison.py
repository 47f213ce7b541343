"""The paired comparison of DINO against each baseline on the same folds, and when to judge it."""

from __future__ import annotations

import pandas as pd

from nidl_dino.evaluation.probes.fitting import _fold_metric

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
