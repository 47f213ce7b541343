"""Feature quality on several generated cohorts: the whole workflow, probes against baselines.

    python benchmarks/feature_quality.py                       # the tune set, 72 scans each
    python benchmarks/feature_quality.py --split report        # the held-out set
    python benchmarks/feature_quality.py --variants brain_only --scans 60 --configfile mine.yaml

For each cohort variant: generates a synthetic cohort (:mod:`nidl_dino.demo` with that
:class:`~nidl_dino.demo.variant.CohortVariant` and seed, ``--scans`` subjects, one scan each),
runs the workflow on it with config.yaml as shipped, overlaid by every ``--configfile`` (in
order) and ``--set key=value`` (as snakemake's ``--config``), and prints its probe table: age MAE
and sex ROC-AUC, mean +/- spread (standard deviation) over the folds, of DINO and of every
baseline of ``probes/comparison.tsv`` (chance, the site alone (``covariates``), intensity PCA,
random weights, brain volume (eTIV), brain intensity histogram, tissue-class volumes), DINO's
paired gain over each, and a ceiling (the same probes on the generator's own latents). A
summary over the variants, the machine (:func:`nidl_dino.machine.describe_machine`) and the
time of each stage close the output; ``OUT/summary.tsv`` keeps the numbers (of every cohort run with that ``--out``, the latest run of
each). Re-running with the same ``--out`` reuses finished cohorts
and workflow steps (Snakemake): a changed ``--configfile`` only reruns the steps it touches;
``--reuse OUT`` starts a new ``--out`` from a copy of another run's cohorts, so comparing recipes
pays for generation and preprocessing once, with ``--forcerun`` naming the first rule to redo
(``benchmarks/levers.py`` runs the recipe levers that way).

Tune and report sets (``--split``). A default chosen because it scored well on a cohort is fitted
to that cohort: its number there is no longer an estimate of how it does elsewhere. So the
variants are split:

- ``tune`` (:data:`VARIANTS`): the cohorts on which recipes and defaults may be compared and
  chosen, as often as needed;
- ``report``: held out. Run them once the defaults are frozen, and report their numbers next to
  the tune set's. A default is never changed because of a report-set number; if that happens
  anyway, the variant moves to the tune set and a new report variant (another seed and other
  knobs) replaces it.

The report set differs from the tune set in seeds and in knobs the tune set never shows
(skull-stripped scans at other resolutions and orientations; lesions and white-matter ageing),
so a recipe that latches onto the tune cohorts' particulars shows it there.

``--variants`` takes labels of :data:`VARIANTS` (any split) or preset names of
:data:`nidl_dino.demo.variant.PRESETS` (seed 0 unless ``--seeds``); ``--seeds S [S ...]`` runs
each selected variant once per seed instead of its own.

Time, measured on a shared 2-core AMD EPYC VM with config.yaml as shipped (90 epochs, 2 local
crops): ``--split report --scans 72`` took 2577 s for its three cohorts (workflow 761-831 s a
cohort, of which training 508-589 s). Variants with the default sites generate about 6x faster
than ``brain_only`` (0.5 s against 3 s a scan); training time grows with the number of scans.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pandas as pd
import yaml

from nidl_dino.machine import describe_machine


@dataclass(frozen=True)
class BenchVariant:
    """One cohort of the benchmark: a generator preset, its seed, and its split."""

    label: str
    preset: str
    seed: int
    split: str


#: The benchmark's cohorts. Seeds differ from the demo's (0) and from each other.
VARIANTS = (
    BenchVariant("default", "default", 11, "tune"),
    BenchVariant("strong_bias", "strong_bias", 12, "tune"),
    BenchVariant("weak_gm_contrast", "weak_gm_contrast", 13, "tune"),
    BenchVariant("default_heldout", "default", 21, "report"),
    BenchVariant("brain_only", "brain_only", 22, "report"),
    BenchVariant("lesions", "lesions", 23, "report"),
)
SPLITS = ("tune", "report", "all")
TARGET_METRICS = (("age", "mae"), ("sex", "roc_auc"))
#: Baselines a target's bar leaves out. Sex is judged on what the registered images carry: the
#: affine registration removes head size, which returns as the eTIV covariate (brain_volume).
NOT_IN_BAR = {"sex": {"brain_volume"}}


def select(names: list[str] | None, split: str, seeds: list[int] | None) -> list[BenchVariant]:
    """The cohorts to run: ``names`` (labels or presets) or those of ``split``, per seed."""
    from nidl_dino.demo.variant import PRESETS

    by_label = {v.label: v for v in VARIANTS}
    if names:
        chosen = []
        for name in names:
            if name in by_label:
                chosen.append(by_label[name])
            elif name in PRESETS:
                chosen.append(BenchVariant(name, name, 0, "adhoc"))
            else:
                known = ", ".join([*by_label, *(p for p in PRESETS if p not in by_label)])
                raise SystemExit(f"unknown variant {name!r}; choose from {known}")
    else:
        chosen = [v for v in VARIANTS if split == "all" or v.split == split]
    if seeds:
        chosen = [
            BenchVariant(f"{v.label}-s{s}", v.preset, s, v.split) for v in chosen for s in seeds
        ]
    return chosen


def deep_update(base: dict, overlay: dict) -> dict:
    """``base`` with ``overlay`` merged in, key by key (as Snakemake overlays config files)."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _skip_model_work(folder: str, names: list[str]) -> list[str]:
    # checkpoints (a recipe trains from scratch) and Snakemake's locks (of a killed run)
    name = Path(folder).name
    return ["work"] if name == "model" else ["locks"] if name == ".snakemake" else []


def run_variant(variant: BenchVariant, args, configfiles: list[Path]) -> dict:
    """Generate the cohort, run the workflow; return the timings and result folder."""
    from nidl_dino.demo import make_demo_dataset

    out = Path(args.out).resolve() / f"{variant.label}-seed{variant.seed}-n{args.scans}"
    bids = out / "bids"
    if args.reuse and not out.exists():
        seed_from = Path(args.reuse).resolve() / out.name
        if seed_from.is_dir():
            # Another run's cohort, preprocessing and baselines; Snakemake reruns only the steps
            # whose config (rule params) differs. Checkpoints are left behind: a recipe trains
            # from scratch.
            shutil.copytree(seed_from, out, symlinks=True, ignore=_skip_model_work)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not (bids / "participants.tsv").exists():
        make_demo_dataset(
            bids,
            n_subjects=args.scans,
            seed=variant.seed,
            n_bad=args.n_bad,
            variant=variant.preset,
            workers=args.cores,
        )
    t_data = time.time() - t0
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--cores",
        str(args.cores),
        "--rerun-incomplete",
        *(["--configfile", *map(str, configfiles)] if configfiles else []),
        "--config",
        f"bids_dir={bids}",
        f"output_dir={out / 'results'}",
        "demo={'enabled': False}",
        *args.set,
        *(["--forcerun", *args.forcerun] if args.forcerun else []),
    ]
    t1 = time.time()
    log = out / "snakemake.log"
    with log.open("w") as stream:  # written as it runs: a run stopped by a time limit keeps it
        run = subprocess.run(cmd, cwd=out, stdout=stream, stderr=subprocess.STDOUT, text=True)
    t_run = time.time() - t1
    return {
        "out": out,
        "bids": bids,
        "results": out / "results",
        "returncode": run.returncode,
        "stderr": log.read_text(),
        "t_data": t_data,
        "t_run": t_run,
    }


def _cell(mean: float, std: float, metric: str) -> str:
    decimals = 2 if metric == "mae" else 3
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def probe_rows(results: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scores (mean, std per set, target, metric) and DINO's paired comparison, as read back."""
    scores = pd.read_csv(results / "probes/scores.tsv", sep="\t")
    comparison = pd.read_csv(results / "probes/comparison.tsv", sep="\t")
    return scores, comparison


def variant_table(scores: pd.DataFrame, comparison: pd.DataFrame) -> str:
    """One row per feature set: age MAE and sex AUC (mean ± fold spread), DINO's gain over it."""
    header = ["feature set"]
    for target, metric in TARGET_METRICS:
        label = "MAE (years)" if metric == "mae" else "ROC-AUC"
        header += [f"{target} {label}", f"DINO's {target} gain (folds won)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    names = list(dict.fromkeys(scores["feature_set"]))
    names = ["dino", *(n for n in names if n != "dino")]
    for name in names:
        cells = [f"**{name}**" if name == "dino" else name]
        for target, metric in TARGET_METRICS:
            row = scores[
                (scores["feature_set"] == name)
                & (scores["target"] == target)
                & (scores["metric"] == metric)
            ]
            cells.append(_cell(row["mean"].iloc[0], row["std"].iloc[0], metric) if len(row) else "")
            gain = comparison[(comparison["target"] == target) & (comparison["baseline"] == name)]
            if len(gain):
                g = gain.iloc[0]
                mark = " *" if bool(g["beats_by_spread"]) else ""
                decimals = 2 if metric == "mae" else 3
                cells.append(
                    f"{g['gain_mean']:+.{decimals}f} ± {g['gain_std']:.{decimals}f} "
                    f"({int(g['wins'])}/{int(g['n_folds'])}){mark}"
                )
            else:
                cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_row(variant: BenchVariant, scores: pd.DataFrame, comparison: pd.DataFrame) -> dict:
    """DINO against the best baseline per target, for the closing summary."""
    row: dict = {"variant": variant.label, "preset": variant.preset, "seed": variant.seed}
    row["split"] = variant.split
    for target, metric in TARGET_METRICS:
        mine = comparison[comparison["target"] == target]
        dino = scores[
            (scores["feature_set"] == "dino")
            & (scores["target"] == target)
            & (scores["metric"] == metric)
        ]
        if not len(dino) or not len(mine):
            continue
        mine = mine[~mine["baseline"].isin(NOT_IN_BAR.get(target, set()))]
        others = mine[mine["baseline"] != "chance"]
        best = others.loc[
            others["baseline_mean"].idxmin()
            if metric == "mae"
            else others["baseline_mean"].idxmax()
        ]
        row[f"{target}_dino"] = _cell(dino["mean"].iloc[0], dino["std"].iloc[0], metric)
        row[f"{target}_best_baseline"] = (
            f"{best['baseline']} {_cell(best['baseline_mean'], best['baseline_std'], metric)}"
        )
        row[f"{target}_beats_all_by_spread"] = bool(mine["beats_by_spread"].all())
    return row


def ceiling_scores(bids: Path, results: Path, probes: dict) -> pd.DataFrame:
    """Probe scores of the ground-truth latents that generated the images (an upper bound)."""
    import numpy as np

    from nidl_dino.evaluation.probes import COVARIATES
    from nidl_dino.evaluation.probing import probe_targets

    cohort = pd.read_parquet(results / "features/cohort.parquet")
    table = cohort[cohort["status"] == "ok"].reset_index(drop=True)
    ids = ["participant_id", "session_id"]
    manifest = pd.read_csv(bids / "demo_manifest.tsv", sep="\t", dtype={"session_id": str})
    for frame in (table, manifest):
        frame["session_id"] = frame["session_id"].fillna("").astype(str)
        frame["participant_id"] = frame["participant_id"].astype(str)
    latent = table[ids].merge(manifest, on=ids, how="left")
    icv = latent["icv_ml"].to_numpy(float)
    # Intensities as the image shows them: relative to the subject's own white matter. A scan's
    # gain is unknown, so white matter's own fall with age (a function of age alone, lesions
    # variant) is not in the image; only the grey/white ratio is. In the ceiling it read age
    # off exactly (MAE 0.04 y, session 10).
    wm = latent["wm_intensity"].to_numpy(float) if "wm_intensity" in latent else 1.0
    columns = [
        np.log(latent["ventricles_ml"].to_numpy(float) / icv),
        latent["gm_ml"].to_numpy(float) / icv,
        latent["csf_ml"].to_numpy(float) / icv,
        latent["gm_intensity"].to_numpy(float) / wm,
        latent["sex_mode_mm"].to_numpy(float),
    ]
    if "lesion_ml" in latent:
        columns.append(np.log1p(latent["lesion_ml"].to_numpy(float)))
    registered = np.column_stack(columns)
    sets = {
        "ceiling: generative latents": np.column_stack([registered, np.log(icv)]),
        # The affine registration to MNI removes head size: what the preprocessed volumes
        # (and so every image feature set but brain_volume) can still show.
        "ceiling: latents without head size": registered,
    }
    scores, _, note = probe_targets(sets, table, probes, include_chance=False)
    if note:
        print(f"ceiling: {note}")
    # probed with the same covariates as the image features; their own row is the workflow's
    return scores[scores["feature_set"] != COVARIATES].reset_index(drop=True)


def bar_attainable(scores: pd.DataFrame, ceiling: pd.DataFrame) -> dict:
    """Whether even the generator's latents (without head size) pass the bar on this cohort.

    The bar: better than the best non-chance baseline by more than the larger of the two fold
    spreads. When the latents that generated the images do not pass it, features of those
    images are not expected to (the latents are a linear-probe reference, not a proof).
    """
    out = {}
    for target, metric in TARGET_METRICS:
        top = ceiling[
            (ceiling["feature_set"] == "ceiling: latents without head size")
            & (ceiling["target"] == target)
            & (ceiling["metric"] == metric)
        ]
        base = scores[
            ~scores["feature_set"].isin({"dino", "chance", *NOT_IN_BAR.get(target, set())})
            & (scores["target"] == target)
            & (scores["metric"] == metric)
        ]
        if not len(top) or not len(base):
            continue
        sign = -1.0 if metric == "mae" else 1.0
        best = base.loc[(sign * base["mean"]).idxmax()]
        margin = sign * (top["mean"].iloc[0] - best["mean"])
        spread = max(top["std"].iloc[0], best["std"])
        out[f"{target}_ceiling"] = _cell(top["mean"].iloc[0], top["std"].iloc[0], metric)
        out[f"{target}_bar_attainable"] = bool(margin > spread)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        metavar="NAME",
        help="labels of VARIANTS or preset names (default: every variant of --split)",
    )
    parser.add_argument("--split", choices=SPLITS, default="tune", help="set to run (tune)")
    parser.add_argument(
        "--scans", "--n-subjects", type=int, default=72, help="subjects per cohort (72)"
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, help="cohort seeds: each variant once per seed"
    )
    parser.add_argument(
        "--configfile",
        nargs="+",
        default=[],
        metavar="YAML",
        help="config overlays on config.yaml, in order (snakemake --configfile)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra snakemake --config overrides (repeatable)",
    )
    parser.add_argument("--n-bad", type=int, default=0, help="broken scans per cohort (0)")
    parser.add_argument("--out", default="/tmp/nidl-dino-feature-quality")
    parser.add_argument(
        "--forcerun",
        nargs="+",
        metavar="RULE",
        help="rerun these rules and what follows them (snakemake --forcerun); with --reuse, "
        "Snakemake has no record of the copied outputs' config, so name the first rule the "
        "overrides touch (extract, train, or every preprocess_batch_NNNN)",
    )
    parser.add_argument(
        "--reuse",
        metavar="OUT",
        help="start each new cohort folder as a copy of OUT's (another run's --out): its data "
        "and preprocessing are reused, only the steps the config changes rerun",
    )
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args()

    variants = select(args.variants, args.split, args.seeds)
    configfiles = [Path(p).resolve() for p in args.configfile]
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    for path in configfiles:
        config = deep_update(config, yaml.safe_load(path.read_text()) or {})
    overlay = ", ".join(p.name for p in configfiles) or "none"
    print(f"# Feature quality on {len(variants)} generated cohorts of {args.scans} scans\n")
    print(f"machine: {describe_machine()}")
    print(f"config: config.yaml + overlays: {overlay}; --set: {' '.join(args.set) or 'none'}\n")

    start = time.time()
    summary, failed = [], []
    for variant in variants:
        print(
            f"## {variant.label} (preset {variant.preset}, seed {variant.seed}, {variant.split})\n"
        )
        sys.stdout.flush()
        run = run_variant(variant, args, configfiles)
        if run["returncode"] != 0:
            print(run["stderr"][-3000:], file=sys.stderr)
            print(f"workflow failed (exit {run['returncode']}); log: {run['out']}/snakemake.log\n")
            failed.append(variant.label)
            continue
        results = run["results"]
        qc = pd.read_csv(results / "qc/qc.tsv", sep="\t")
        n_ok = int((qc["status"] == "ok").sum())
        print(f"scans: {len(qc)} ({n_ok} ok, {len(qc) - n_ok} excluded)")
        print(f"time: data {run['t_data']:.0f} s, workflow {run['t_run']:.0f} s")
        summary_file = results / "model/training_summary.json"
        if summary_file.exists():
            print(f"training: {summary_file.read_text().strip()}")
        scores, comparison = probe_rows(results)
        print(
            "\nmean ± spread (standard deviation) over the folds; DINO's gain is paired, fold by "
            "fold (positive: DINO better; * better by more than the spread)\n"
        )
        print(variant_table(scores, comparison))
        print()
        from nidl_dino.evaluation.probes import format_probe_table

        ceiling = ceiling_scores(run["bids"], results, config["probes"])
        print(format_probe_table(ceiling) if len(ceiling) else "")
        print()
        row = summary_row(variant, scores, comparison)
        if len(ceiling):
            row.update(bar_attainable(scores, ceiling))
        row.update(scans_ok=n_ok, t_data_s=round(run["t_data"]), t_workflow_s=round(run["t_run"]))
        summary.append(row)
        sys.stdout.flush()

    if summary:
        table = pd.DataFrame(summary)
        out = Path(args.out).resolve()
        if (out / "summary.tsv").exists():  # keep the cohorts of earlier runs in this --out
            earlier = pd.read_csv(out / "summary.tsv", sep="\t")
            earlier = earlier[~earlier["variant"].isin(table["variant"])]
            table = pd.concat([earlier, table], ignore_index=True)
        table.to_csv(out / "summary.tsv", sep="\t", index=False)
        print("## Summary (DINO against the best non-chance baseline)\n")
        shown = [c for c in table.columns if c not in ("preset", "seed")]
        print("| " + " | ".join(shown) + " |")
        print("|" + "---|" * len(shown))
        for row in table[shown].itertuples(index=False):
            print("| " + " | ".join(str(v) for v in row) + " |")
    print(f"\nmachine: {describe_machine()}")
    print(f"wall time: {time.time() - start:.0f} s for {len(variants)} variants")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
