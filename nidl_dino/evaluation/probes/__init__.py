"""Cross-validated linear probes: how much of a cohort variable a linear model reads off features.

Continuous targets (age) get a ridge regression scored by MAE and R^2; binary targets (sex) get a
logistic regression scored by ROC-AUC and balanced accuracy. Every feature set, baselines included,
is scored on exactly the same outer folds, so their rows in the probe table can be compared fold for
fold.

Nothing leaks from a test fold: each outer training fold fits its own pipeline
``[*steps, StandardScaler, Ridge | LogisticRegression]`` inside a ``GridSearchCV`` whose inner folds
pick the regularisation strength, so the scaler (and any PCA in ``steps``) is refitted on every inner
and outer training split and never sees the rows it is scored on.

The subpackage: :mod:`.tasks` (targets, feature sets), :mod:`.splits` (folds), :mod:`.fitting`
(pipelines, CV loop), :mod:`.comparison` (paired comparison), :mod:`.formatting` (tables).

Example:
    >>> scores = run_probes({"dino": features}, cohort, targets=["age", "sex"])
    >>> print(format_probe_table(scores))
"""

from __future__ import annotations

from nidl_dino.evaluation.probes.comparison import (
    COMPARISON_COLUMNS,
    MIN_SCANS_TO_JUDGE,
    PRIMARY_METRIC,
    compare_to_baselines,
    judgement_caveat,
)
from nidl_dino.evaluation.probes.fitting import DEFAULT_ALPHAS, DEFAULT_CS, make_probe, run_probes
from nidl_dino.evaluation.probes.formatting import (
    format_comparison_table,
    format_gain,
    format_probe_table,
    write_probe_table,
)
from nidl_dino.evaluation.probes.tasks import (
    CHANCE,
    COVARIATES,
    METRIC_LABELS,
    METRICS,
    PREDICTION_COLUMNS,
    SCORE_COLUMNS,
    FeatureSet,
    FeatureSetLike,
    Task,
    covariate_matrix,
    infer_task,
)

__all__ = [
    "CHANCE",
    "COMPARISON_COLUMNS",
    "COVARIATES",
    "DEFAULT_ALPHAS",
    "DEFAULT_CS",
    "FeatureSet",
    "FeatureSetLike",
    "METRICS",
    "METRIC_LABELS",
    "MIN_SCANS_TO_JUDGE",
    "PREDICTION_COLUMNS",
    "PRIMARY_METRIC",
    "SCORE_COLUMNS",
    "Task",
    "compare_to_baselines",
    "covariate_matrix",
    "format_comparison_table",
    "format_gain",
    "format_probe_table",
    "infer_task",
    "judgement_caveat",
    "make_probe",
    "run_probes",
    "write_probe_table",
]
