"""Are the features any good? DINO features against baselines, on the same scans and folds.

The ``probe`` rule calls :func:`evaluate_cohort`. Feature sets, all restricted to the scans that
passed QC, aligned row by row with the cohort table:

- ``dino``: the teacher features of the cohort table;
- ``random_encoder``: the same encoder architecture with random (untrained) weights, seeded
  (DINO's initial weights), read out like the DINO features;
- ``intensity_pca``: block-averaged intensities of the preprocessed volumes, PCA fitted inside
  every training fold (no leakage);
- ``intensity_histogram``: the fraction of the registered brain's voxels in 32 intensity bins;
- ``tissue_classes``: CSF, grey and white matter fractions and mean intensities from a 3-class
  intensity mixture inside the brain;

these computed from what the ``extract`` job wrote, on its device, in its one pass over the
volumes (``features/baselines/*.parquet``): the probes read tables only.
- ``brain_volume``: head size (``etiv_ml``) from preprocessing QC, as a one-feature model;
- ``chance``: the training-fold mean (regression) or class prior (classification).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from nidl_dino.errors import UserError
from nidl_dino.evaluation.baselines import (
    brain_volume_feature,
    intensity_histogram_features,
    pca_feature_set,
    read_baseline_table,
    tissue_class_features,
)
from nidl_dino.evaluation.probes import PREDICTION_COLUMNS, SCORE_COLUMNS, run_probes
from nidl_dino.features.cohort import FEATURE_PREFIX
from nidl_dino.features.teacher import load_teacher
from nidl_dino.features.teacher import random_encoder_like as _random_encoder_like
from nidl_dino.settings import with_defaults

log = logging.getLogger(__name__)


def _empty() -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.DataFrame(columns=SCORE_COLUMNS), pd.DataFrame(columns=PREDICTION_COLUMNS)


def random_encoder_like(teacher_path: str | os.PathLike, seed: int = 0) -> torch.nn.Module:
    """The teacher's architecture with freshly initialised weights (seeded), in eval mode."""
    _, info = load_teacher(teacher_path)
    return _random_encoder_like(info, seed=seed)


def feature_sets_for(
    cohort: pd.DataFrame,
    qc: pd.DataFrame,
    baselines: Mapping[str, str | os.PathLike],
    config: Mapping[str, Any],
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The ok rows of the cohort table, and every feature set aligned with them (by position).

    Reads tables only: the volumes were read by the ``extract`` job, which wrote the baselines'
    inputs (:func:`nidl_dino.features.extract.extract_cohort`).

    Args:
        cohort: the cohort table (``features/cohort.parquet``).
        qc: the QC table (for ``scan_id`` and the brain volume).
        baselines: ``random_encoder`` and ``intensities`` -> their Parquet tables
            (``features/baselines/*.parquet``); a missing key skips that baseline.
        config: the ``probes:`` section.

    Raises:
        UserError: a baseline table without a row for an ok scan (rerun extract).
    """
    config = with_defaults(config, "probes")
    table = cohort[cohort["status"] == "ok"].reset_index(drop=True)
    # one key per scan: several runs of one session share participant and session ids
    qc_rows = table[["scan_id"]].merge(qc, on="scan_id", how="left", validate="one_to_one")
    scan_ids = [str(s) for s in qc_rows["scan_id"]]

    feature_columns = [c for c in table.columns if c.startswith(FEATURE_PREFIX)]
    sets: dict[str, Any] = {"dino": table[feature_columns].to_numpy(dtype=np.float32)}
    if "random_encoder" in baselines:
        sets["random_encoder"], _ = read_baseline_table(baselines["random_encoder"], scan_ids)
    if "intensities" in baselines:
        intensities, meta = read_baseline_table(baselines["intensities"], scan_ids)
        pca = config["pca"]
        wanted = int(pca["downsample"])
        if meta.get("downsample") is not None and int(meta["downsample"]) != wanted:
            raise UserError(
                f"{baselines['intensities']}: intensities downsampled by {meta['downsample']}, "
                f"probes.pca.downsample is {wanted}: rerun extract (snakemake -R extract)"
            )
        n_components = int(pca["n_components"])
        largest = _largest_pca(len(table), config)
        if n_components > largest:
            log.info(
                "probes.pca.n_components %d > %d rows of the smallest inner training fold: "
                "using %d",
                n_components,
                largest,
                largest,
            )
            n_components = largest
        sets["intensity_pca"] = pca_feature_set(
            intensities, n_components=n_components, seed=int(config["seed"])
        )
    if "brain_histogram" in baselines:
        histograms, _ = read_baseline_table(baselines["brain_histogram"], scan_ids)
        sets["intensity_histogram"] = intensity_histogram_features(histograms, bins=32)
        sets["tissue_classes"] = tissue_class_features(histograms)
    column = config["brain_volume_column"]
    qc_column = next((c for c in qc_rows.columns if c == column or c.endswith(f".{column}")), None)
    if qc_column is not None:
        sets["brain_volume"] = brain_volume_feature(qc_rows, column=qc_column)
    else:
        log.warning("no %s column in qc.tsv: the brain-volume baseline is skipped", column)
    return table, sets


def _largest_pca(n_rows: int, config: Mapping[str, Any]) -> int:
    """Largest PCA size the smallest inner training fold can fit (rows - 1, at least 1)."""
    outer_train = n_rows - math.ceil(n_rows / int(config["n_splits"]))
    inner_train = outer_train - math.ceil(outer_train / int(config["inner_splits"]))
    return max(1, inner_train - 1)


def evaluate_cohort(
    cohort: pd.DataFrame,
    qc: pd.DataFrame,
    baselines: Mapping[str, str | os.PathLike],
    config: Mapping[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Cross-validated probes of every feature set for the configured targets.

    Targets missing from the cohort table are skipped with a warning (a cohort without age has
    no age probe), and a cohort too small for the folds skips the probes with its reason, so the
    workflow never fails for a missing phenotype or a small cohort.

    Returns:
        ``(scores, predictions, note)``: scores and predictions as
        :func:`nidl_dino.evaluation.probes.run_probes` returns them (empty when nothing could be probed),
        and a one-line note saying why when something was skipped ("" otherwise).
    """
    table, sets = feature_sets_for(cohort, qc, baselines, config)
    return probe_targets(sets, table, config)


def probe_targets(
    feature_sets: Mapping[str, Any],
    table: pd.DataFrame,
    config: Mapping[str, Any],
    include_chance: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Probes of the given feature sets for every configured target, one target at a time.

    Args:
        feature_sets: name -> features aligned with ``table`` (as :func:`run_probes` takes them).
        table: the rows to probe (ok scans), with the target, site and group columns.
        config: the ``probes:`` section (targets, folds, seed, stratification, grouping,
            covariates: a covariate missing from the table is left out with a warning).
        include_chance: add the chance model's row.

    Returns:
        ``(scores, predictions, note)`` as :func:`evaluate_cohort`.
    """
    config = with_defaults(config, "probes")
    targets = [t for t in config["targets"] if t in table.columns]
    missing = sorted(set(config["targets"]) - set(targets))
    for name in missing:
        log.warning("probe target %r is not a column of the cohort table: skipped", name)
    note = f"targets not in the cohort table: {', '.join(missing)}" if missing else ""
    if not targets:
        return (*_empty(), note or "no probe target configured")
    stratify_by = config["stratify_by"]
    if stratify_by not in table.columns:
        stratify_by = None
    group_by = config["group_by"]
    covariates = [c for c in config["covariates"] if c in table.columns]
    for name in sorted(set(config["covariates"]) - set(covariates)):
        log.warning(
            "probe covariate %r is not a column of the cohort table: not adjusted for", name
        )
    notes = [note] if note else []
    all_scores, all_predictions = [], []
    for target in targets:  # one target at a time: a target the folds cannot take skips alone
        try:
            scores, predictions = run_probes(
                feature_sets,
                table,
                [target],
                n_splits=int(config["n_splits"]),
                n_repeats=int(config["n_repeats"]),
                seed=int(config["seed"]),
                stratify_by=stratify_by,
                task_types=config["task_types"] or None,
                group_by=group_by if group_by in table.columns else None,
                include_chance=include_chance,
                inner_splits=int(config["inner_splits"]),
                return_predictions=True,
                covariates=covariates,
            )
        except UserError as err:
            log.warning("probe of %r skipped: %s", target, err)
            notes.append(f"probe of '{target}' skipped: {err}")
            continue
        all_scores.append(scores)
        all_predictions.append(predictions)
    if not all_scores:
        return (*_empty(), "; ".join(notes))
    scores = pd.concat(all_scores, ignore_index=True)
    predictions = pd.concat(all_predictions, ignore_index=True)
    return scores, predictions, "; ".join(notes)
