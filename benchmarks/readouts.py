"""Readouts of trained teachers, compared without retraining: which stages carry the age signal.

    python benchmarks/readouts.py OUT                    # every cohort of a feature_quality --out
    python benchmarks/readouts.py OUT --cohorts default-seed11-n72

For each cohort folder of a ``benchmarks/feature_quality.py --out`` (its trained
``model/teacher.pt`` and preprocessed volumes), reads the volumes once, runs them through the
trained teacher and through the random-weights encoder the workflow uses as a baseline (same
architecture and seed), and probes several readouts of the same stage maps with the workflow's
own probes (same folds, seed and regularisation search as ``probes/scores.tsv``), beside the
brain intensity histogram. Readouts:

- ``mean_std``: per channel of every stage, spatial standard deviation and mean (the default
  ``extract.pooling: stages_mean_std``; its DINO row reproduces the workflow's);
- ``stageK``: the same for stage K alone; ``stages12`` / ``stages34``: the finer / coarser half;
- ``brain_mean_std``: ``mean_std`` over the brain only (each map cell weighted by its share of
  the input's non-zero voxels, the dilated brain mask, area-resampled): the workflow's readout
  averages over the whole grid, about 70 % of it background on the demo grid;
- ``brainq``: 5 quantiles (10-90 %) per channel of every stage over the brain; ``brainq12``:
  of the first two stages only;
- ``mean_std@G``: ``mean_std`` of the volume resized (trilinear) to ``G``^3 voxels, the size of
  the global views the teacher was trained on (read from the teacher file; ``--global-size``
  overrides it, 0 leaves the row out): the
  workflow reads the teacher out at the volume's own size (64^3 on the demo grid), the scale of
  the local crops, where the brain is 4/3 as large as in the global views.

Nothing is trained: about 3 minutes a 72-scan cohort on a 2-core CPU. Prints, per cohort, age
MAE and sex ROC-AUC (mean +/- spread over the folds) for the trained and the random weights,
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
import torch.nn.functional as F

from nidl_dino.encoders.readout import stage_outputs
from nidl_dino.evaluation.baselines import intensity_histogram_features, read_baseline_table
from nidl_dino.evaluation.probing import probe_targets
from nidl_dino.features.teacher import load_teacher, random_encoder_like
from nidl_dino.machine import describe_machine

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def cohort_volumes(results: Path) -> tuple[pd.DataFrame, torch.Tensor]:
    """The ok rows of the cohort table and their preprocessed volumes, ``(N, 1, D, H, W)``."""
    cohort = pd.read_parquet(results / "features" / "cohort.parquet")
    table = cohort[cohort["status"] == "ok"].reset_index(drop=True)
    volumes = []
    for pid in table["participant_id"]:
        paths = sorted((results / str(pid)).glob("**/*desc-preproc_T1w.nii.gz"))
        if len(paths) != 1:
            raise SystemExit(f"{results / str(pid)}: expected one preprocessed volume, {paths}")
        volumes.append(np.asarray(nib.load(paths[0]).dataobj, dtype=np.float32))
    return table, torch.from_numpy(np.stack(volumes))[:, None]


def stage_maps(encoder: torch.nn.Module, x: torch.Tensor, batch: int = 8) -> list[torch.Tensor]:
    """Every stage's feature maps for all volumes, ``(N, C_k, ...)`` per stage."""
    parts = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            parts.append([t.float() for t in stage_outputs(encoder, x[i : i + batch])])
    return [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))]


def _mean_std(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.flatten(2).std(dim=2, correction=0), t.flatten(2).mean(dim=2)], dim=1)


def _brain_mean_std(t: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    weight = F.interpolate(inside, size=t.shape[2:], mode="area").flatten(2)
    weight = weight / weight.sum(dim=2, keepdim=True).clamp_min(1e-12)
    values = t.flatten(2)
    mean = (values * weight).sum(dim=2)
    std = (((values - mean[..., None]) ** 2) * weight).sum(dim=2).sqrt()
    return torch.cat([std, mean], dim=1)


def _brain_quantiles(t: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    mask = F.interpolate(inside, size=t.shape[2:], mode="area").flatten(1) > 0.5
    values = t.flatten(2)
    q = torch.tensor(QUANTILES)
    rows = [torch.quantile(values[b][:, mask[b]], q, dim=1).T.flatten() for b in range(len(t))]
    return torch.stack(rows)


def readouts(stages: list[torch.Tensor], x: torch.Tensor) -> dict[str, np.ndarray]:
    """Every readout of the module docstring, from one encoder's stage maps."""
    per_stage = [_mean_std(t) for t in stages]
    inside = (x != 0).float()
    quantiles = [_brain_quantiles(t, inside) for t in stages]
    half = len(stages) // 2
    out = {"mean_std": torch.cat(per_stage, dim=1)}
    for k, t in enumerate(per_stage, start=1):
        out[f"stage{k}"] = t
    out["stages12"] = torch.cat(per_stage[:half], dim=1)
    out["stages34"] = torch.cat(per_stage[half:], dim=1)
    out["brain_mean_std"] = torch.cat([_brain_mean_std(t, inside) for t in stages], dim=1)
    out["brainq"] = torch.cat(quantiles, dim=1)
    out["brainq12"] = torch.cat(quantiles[:half], dim=1)
    return {name: t.numpy() for name, t in out.items()}


def mean_std_at_size(encoder: torch.nn.Module, x: torch.Tensor, size: int) -> np.ndarray:
    """``mean_std`` of the volumes resized (trilinear, as the global views) to ``size``^3."""
    small = F.interpolate(x, size=(size,) * 3, mode="trilinear", align_corners=False)
    return torch.cat([_mean_std(t) for t in stage_maps(encoder, small)], dim=1).numpy()


def cohort_scores(results: Path, global_size: int | None = None) -> pd.DataFrame:
    """Probe scores of every readout of the trained and random encoders, and the histogram."""
    table, x = cohort_volumes(results)
    teacher, info = load_teacher(results / "model" / "teacher.pt")
    if global_size is None:  # the teacher's first image size is its global views'
        global_size = int(info["image_size"][0][0])
    sets: dict[str, np.ndarray] = {}
    for tag, encoder in (("dino", teacher), ("random", random_encoder_like(info, seed=0))):
        for name, values in readouts(stage_maps(encoder, x), x).items():
            sets[f"{tag}:{name}"] = values
        if global_size and tuple(x.shape[2:]) != (global_size,) * 3:
            sets[f"{tag}:mean_std@{global_size}"] = mean_std_at_size(encoder, x, global_size)
    scan_ids = [str(s) for s in table["scan_id"]]
    path = results / "features" / "baselines" / "brain_histogram.parquet"
    histograms, _ = read_baseline_table(path, scan_ids)
    sets["histogram"] = intensity_histogram_features(histograms, bins=32)
    scores, _, note = probe_targets(sets, table, {})
    if note:
        print(f"{results}: {note}", flush=True)
    return scores


def table(scores: pd.DataFrame) -> str:
    """Markdown: readout x (age MAE, sex AUC) for trained and random weights."""
    metric = {"age": "mae", "sex": "roc_auc"}
    cells: dict[str, dict[str, str]] = {}
    for row in scores.itertuples():
        if metric.get(row.target) != row.metric or row.feature_set == "chance":
            continue
        tag, _, readout = row.feature_set.partition(":")
        key = readout or tag
        column = f"{row.target} ({'trained' if tag == 'dino' else tag})"
        cells.setdefault(key, {})[column] = f"{row.mean:.3f} ± {row.std:.3f}"
        if readout:
            cells[key]["features"] = str(row.n_features)
    columns = ["features", "age (trained)", "age (random)", "sex (trained)", "sex (random)"]
    columns += ["age (histogram)", "sex (histogram)"]
    columns = [c for c in columns if any(c in v for v in cells.values())]
    lines = ["| readout | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for key, values in cells.items():
        lines.append(f"| {key} | " + " | ".join(values.get(c, "") for c in columns) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="a feature_quality.py --out folder")
    parser.add_argument("--cohorts", nargs="*", help="cohort folder names (default: all)")
    parser.add_argument(
        "--global-size",
        type=int,
        default=None,
        help="side of the global views in training (default: the teacher's; 0: no mean_std@G)",
    )
    args = parser.parse_args()
    names = args.cohorts or sorted(
        p.name for p in args.out.iterdir() if (p / "results" / "model" / "teacher.pt").exists()
    )
    if not names:
        raise SystemExit(f"no cohort with results/model/teacher.pt below {args.out}")
    for name in names:
        scores = cohort_scores(args.out / name / "results", args.global_size)
        print(f"\n### {name}\n\n{table(scores)}", flush=True)
    print(f"\n{describe_machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
