"""Trained teachers read on cohorts they were not trained on: does DINO need its own cohort?

    python benchmarks/teacher_transfer.py /tmp/fq/base13/default-seed11-n72 /tmp/fq/n200/default-seed11-n200
    python benchmarks/teacher_transfer.py /tmp/fq/base13/*-n72        # across cohort variants
    python benchmarks/teacher_transfer.py COHORT ... --teacher pooled=/path/to/teacher.pt

Each argument is a cohort folder of a ``benchmarks/feature_quality.py --out`` run (its
``results/model/teacher.pt``, preprocessed volumes, cohort table and baselines). Every teacher
is read, with the workflow's readout (``extract.pooling: stages_mean_std``), on every cohort,
and each cohort's probes (config.yaml's ``probes:`` section, so the site covariates and folds of
``probes/scores.tsv``) score them beside the cohort's own intensity histogram and random-weights
encoder. A cohort's own teacher reproduces its ``dino`` row of the probe table. ``--teacher
NAME=PATH`` adds a teacher trained elsewhere (e.g. on several cohorts pooled), read on every
cohort.

Two questions it answers: with a second cohort of the same generator and knobs but more scans,
does a teacher trained on more scans give better features on the same probe set (is the recipe
limited by its pretraining data)? And across cohort variants: how much does a teacher lose on a
cohort unlike the one it was trained on (what a user gets from a model trained elsewhere)?

Nothing is trained: six teachers on six cohorts (816 scans) took 209 s on a 2-core CPU, probes
included.
Prints age MAE and sex ROC-AUC (mean +/- spread over the folds) per cohort and feature set,
then the machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import yaml

from nidl_dino.encoders.readout import StagePooling
from nidl_dino.evaluation.probing import feature_sets_for, probe_targets
from nidl_dino.features.teacher import load_teacher
from nidl_dino.machine import describe_machine

ROOT = Path(__file__).resolve().parent.parent
BASELINES = ("random_encoder", "intensities", "brain_histogram")
SHOWN = ("intensity_histogram", "random_encoder")


def probe_config() -> dict:
    """config.yaml's ``probes:`` section, targets age and sex."""
    config = yaml.safe_load((ROOT / "config.yaml").read_text())["probes"]
    return {**config, "targets": ["age", "sex"]}


def volumes(results: Path, scan_ids: list[str]) -> torch.Tensor:
    """The preprocessed volumes of ``scan_ids``, ``(N, 1, D, H, W)``."""
    out = []
    for scan in scan_ids:
        subject = scan.split("_")[0]
        paths = sorted((results / subject).glob(f"**/{scan}_space-*desc-preproc_T1w.nii.gz"))
        if len(paths) != 1:
            raise SystemExit(f"{results / subject}: expected one preprocessed volume, {paths}")
        out.append(np.asarray(nib.load(paths[0]).dataobj, dtype=np.float32))
    return torch.from_numpy(np.stack(out))[:, None]


def features(encoder: torch.nn.Module, x: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """The workflow's readout of ``encoder`` (every stage's spatial std and mean)."""
    readout = StagePooling(encoder, std=True).eval()
    with torch.inference_mode():
        return torch.cat([readout(x[i : i + batch]).float() for i in range(0, len(x), batch)])


def cohort_scores(cohort: Path, teachers: dict[str, torch.nn.Module], config: dict) -> pd.DataFrame:
    """Probe scores of every teacher's features and of the cohort's own baselines."""
    results = cohort / "results"
    table = pd.read_parquet(results / "features" / "cohort.parquet")
    qc = pd.read_csv(results / "qc" / "qc.tsv", sep="\t")
    paths = {k: results / "features" / "baselines" / f"{k}.parquet" for k in BASELINES}
    rows, sets = feature_sets_for(table, qc, paths, config)
    x = volumes(results, [str(s) for s in rows["scan_id"]])
    probed = {f"teacher of {name}": features(t, x).numpy() for name, t in teachers.items()}
    probed.update({k: sets[k] for k in SHOWN})
    scores, _, note = probe_targets(probed, rows, config, include_chance=False)
    if note:
        print(f"{cohort}: {note}", flush=True)
    return scores


def markdown(scores: dict[str, pd.DataFrame], target: str, metric: str) -> str:
    """Cohort (rows) x feature set (columns): mean +/- spread of ``metric``."""
    chosen = {
        cohort: frame[(frame["target"] == target) & (frame["metric"] == metric)]
        for cohort, frame in scores.items()
    }
    columns: list[str] = []
    for rows in chosen.values():
        columns += [c for c in rows["feature_set"].unique() if c not in columns]
    lines = ["| probed on | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for cohort, rows in chosen.items():
        cells = {r.feature_set: f"{r.mean:.2f} ± {r.std:.2f}" for r in rows.itertuples()}
        lines.append(f"| {cohort} | " + " | ".join(cells.get(c, "") for c in columns) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cohorts", type=Path, nargs="+", help="feature_quality.py cohort folders")
    parser.add_argument(
        "--teacher",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="another teacher.pt read on every cohort (repeatable)",
    )
    args = parser.parse_args()
    for cohort in args.cohorts:
        if not (cohort / "results" / "model" / "teacher.pt").exists():
            raise SystemExit(
                f"{cohort}: no results/model/teacher.pt; give feature_quality.py cohort folders"
            )
    teachers = {
        c.name: load_teacher(c / "results" / "model" / "teacher.pt")[0] for c in args.cohorts
    }
    for spec in args.teacher:
        name, sep, path = spec.partition("=")
        if not sep or not Path(path).is_file():
            raise SystemExit(f"--teacher {spec}: give NAME=PATH to an existing teacher.pt")
        teachers[name] = load_teacher(path)[0]
    config = probe_config()
    scores = {c.name: cohort_scores(c, teachers, config) for c in args.cohorts}
    print(f"\nage MAE (years)\n\n{markdown(scores, 'age', 'mae')}")
    print(f"\nsex ROC-AUC\n\n{markdown(scores, 'sex', 'roc_auc')}")
    print(f"\n{describe_machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
