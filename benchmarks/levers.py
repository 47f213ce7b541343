"""The recipe levers of issue 18, each measured on the tune cohorts against the shipped defaults.

    python benchmarks/feature_quality.py --split tune --out BASE     # the shipped defaults first
    python benchmarks/levers.py BASE                                 # every lever
    python benchmarks/levers.py BASE koleo sinkhorn                  # some of them
    python benchmarks/levers.py BASE --table                         # the table of finished runs
    python benchmarks/levers.py BASE width_half --variants default   # one cohort only

A lever is a set of ``snakemake --config`` overrides of config.yaml (:data:`LEVERS`). Each runs
``feature_quality.py --split tune`` in ``BASE-levers/<lever>``, started from a copy of BASE's
cohorts (``--reuse``): cohort generation and preprocessing are paid once, unless the lever
changes the preprocessing. Its full output goes to ``BASE-levers/<lever>.log``. The closing
table gives, per lever and cohort, DINO's age MAE and sex ROC-AUC (mean ± fold spread), the
change from the defaults' run on the same cohort, and whether DINO beats every baseline by more
than the spread. One training seed per run: a difference smaller than the spread between seeds
(about 0.5 years of age MAE on 196 scans, benchmarks/README.md) is not a finding.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent

#: Gaussian blur on every view, sigma 0.5-1.5 voxels (the blur_strong levers).
#: a bias field on half the local crops only (the teacher's global views stay clean)
BIAS_LOCAL = "views={'intensity': {'bias_field': {'prob': [0.0, 0.0, 0.5]}}}"
BLUR_STRONG = "views={'intensity': {'smooth': {'prob': [1.0, 1.0, 1.0], 'sigma': [0.5, 1.5]}}}"

#: lever name -> snakemake --config overrides (config.yaml keys), and what it changes.
LEVERS: dict[str, tuple[list[str], str]] = {
    "readout_stages": (["extract={'pooling': 'stages'}"], "spatial means of every stage"),
    "readout_last": (["extract={'pooling': 'last'}"], "the backbone's output only"),
    "readout_quantiles": (
        ["extract={'pooling': 'stages_quantiles'}"],
        "+ 5 spatial quantiles per channel, in the brain",
    ),
    "koleo": (["dino={'koleo_weight': 0.1}"], "DINOv2's KoLeo, weight 0.1"),
    "sinkhorn": (["dino={'teacher_centering': 'sinkhorn_knopp'}"], "Sinkhorn-Knopp teacher"),
    "koleo_sinkhorn": (
        ["dino={'koleo_weight': 0.1, 'teacher_centering': 'sinkhorn_knopp'}"],
        "both DINOv2 regularisers",
    ),
    "recipe_45_6": (
        ["trainer={'max_epochs': 45}", "views={'num_local_crops': 6}"],
        "the recipe shipped until session 8 (45 epochs, 6 local crops)",
    ),
    "epochs_45": (["trainer={'max_epochs': 45}"], "half the epochs"),
    "epochs_180": (["trainer={'max_epochs': 180}"], "twice the epochs"),
    "batch_4": (
        ["data={'batch_size': 4}"],
        "batch 4: twice the optimiser steps for the same epochs (1.44x the training time)",
    ),
    "batch_16": (
        ["data={'batch_size': 16}"],
        "batch 16: batch-norm statistics and the teacher's centre over twice the volumes, half the steps",
    ),
    "local_crops_0": (["views={'num_local_crops': 0}"], "the two global views only"),
    "local_crops_6": (
        ["views={'num_local_crops': 6}"],
        "6 local crops (about 1.15x the training time)",
    ),
    "local_32": (
        ["views={'local_size': [32, 32, 32], 'local_scale': [0.125, 0.125]}"],
        "local crops 32^3 (1/8 of the volume)",
    ),
    "global_64": (
        ["views={'global_size': [64, 64, 64]}"],
        "global views 64^3: the whole volume at its own size, as extraction reads it (3x training)",
    ),
    "global_40": (
        ["views={'global_size': [40, 40, 40]}"],
        "global views 40^3 (the whole volume at 5/8 of its size: coarser than the local crops)",
    ),
    "width_half": (["encoder={'kwargs': {'channels': [8, 16, 32, 64]}}"], "small_cnn halved"),
    "width_double": (["encoder={'kwargs': {'channels': [32, 64, 128, 256]}}"], "doubled"),
    "grid_2mm": (
        [
            "preprocessing={'resample': {'spacing_mm': 2.0}}",
            "views={'local_size': [36, 36, 36]}",
        ],
        "2 mm grid (96^3), same view sizes and scales",
    ),
    "grid_4mm": (
        [
            "preprocessing={'resample': {'spacing_mm': 4.0}}",
            "views={'local_size': [18, 18, 18]}",
        ],
        "4 mm grid (48^3), same view scales",
    ),
    "rerun": ([], "defaults again (same seed): is a rerun on this machine identical?"),
    "seed_1": (["seed=1"], "defaults, training seed 1 (the seed spread)"),
    "seed_2": (["seed=2"], "defaults, training seed 2"),
    "width_double_seed_1": (
        ["encoder={'kwargs': {'channels': [32, 64, 128, 256]}}", "seed=1"],
        "small_cnn doubled, training seed 1 (compare with seed_1)",
    ),
    "teacher_temp_002": (
        ["dino={'teacher_temperature': 0.02, 'warmup_teacher_temp': 0.02}"],
        "teacher temperature 0.02 (twice as soft as the default 0.01)",
    ),
    "momentum_0996": (
        ["dino={'base_lambda': 0.996, 'final_lambda': 1.0}"],
        "teacher momentum 0.996 -> 1 (the DINO paper's) instead of 0.99 -> 0.999",
    ),
    "momentum_095": (
        ["dino={'base_lambda': 0.95, 'final_lambda': 0.99}"],
        "a faster teacher: momentum 0.95 -> 0.99 instead of 0.99 -> 0.999 (0.996 -> 1 was worse)",
    ),
    "student_temp_02": (
        ["dino={'student_temperature': 0.2}"],
        "student temperature 0.2 instead of 0.1 (a softer student against the sharp teacher)",
    ),
    "student_temp_02_seed_1": (
        ["dino={'student_temperature': 0.2}", "seed=1"],
        "student_temp_02 at training seed 1 (compare with seed_1)",
    ),
    "teacher_warmup": (
        ["dino={'warmup_teacher_temp': 0.04, 'warmup_teacher_temp_epochs': 30}"],
        "the teacher's temperature warmed up from 0.04 to 0.01 over 30 epochs (the DINO paper's kind)",
    ),
    "sgd": (
        ["dino={'optimizer': 'sgd', 'learning_rate': 0.03, 'weight_decay': 0.0001}"],
        "SGD (momentum 0.9), lr 0.03, weight decay 1e-4: the DINO repository's ResNet-50 recipe"
        " (its base lr, for batch 256, unscaled) instead of AdamW",
    ),
    "affine_views": (
        ["views={'affine': {'prob': 0.5}}"],
        "random affine on each view, p 0.5 (rotation 10 deg, scale 10 %)",
    ),
    "local_in_brain": (
        ["views={'local_in_brain': True}"],
        "local crops centred on a voxel inside the brain mask",
    ),
    "ibot": (
        ["dino={'patch_loss_weight': 1.0}"],
        "iBOT's masked-token loss, weight 1 (DINOv2's), half the global views masked 10-50 %",
    ),
    "ibot_per_token": (
        ["dino={'patch_loss_weight': 1.0, 'patch_centering': 'per_token'}"],
        "iBOT's masked-token loss with one teacher centre per token position",
    ),
    "ibot_per_token_02": (
        ["dino={'patch_loss_weight': 0.2, 'patch_centering': 'per_token'}"],
        "ibot_per_token at weight 0.2: less pull on the image-level teacher",
    ),
    "global_crops": (
        ["views={'global_scale': [0.6, 1.0]}"],
        "global views cropped at random (60-100 % of the volume) instead of the whole volume",
    ),
    "ibot_global_crops": (
        ["dino={'patch_loss_weight': 1.0}", "views={'global_scale': [0.6, 1.0]}"],
        "iBOT's loss with global views cropped at random (60-100 % of the volume)",
    ),
    "ibot_stage3": (
        ["dino={'patch_loss_weight': 1.0, 'patch_stage': 3}"],
        "iBOT's loss on small_cnn's stage-3 map (6^3 tokens on a 48^3 view, not 3^3)",
    ),
    "ibot_stage3_global_crops": (
        ["dino={'patch_loss_weight': 1.0, 'patch_stage': 3}", "views={'global_scale': [0.6, 1.0]}"],
        "ibot_stage3 with global views cropped at random (60-100 % of the volume)",
    ),
    "ibot_stage3_per_token": (
        ["dino={'patch_loss_weight': 1.0, 'patch_stage': 3, 'patch_centering': 'per_token'}"],
        "ibot_stage3 with one teacher centre per token position",
    ),
    "head_bn_off": (
        ["dino={'proj_batch_norm': False}"],
        "no batch norm in DINO's projection head (the DINO paper's ViT head)",
    ),
    "head_norm_last_off": (
        ["dino={'proj_norm_last_layer': False}"],
        "the head's last layer without weight normalisation (DINO: better, less stable)",
    ),
    "gamma_mild": (
        ["views={'intensity': {'gamma': {'prob': [0.5, 0.5, 0.5], 'range': [0.8, 1.25]}}}"],
        "a mild random contrast (gamma 0.8-1.25) on half the views, against the sites' contrast",
    ),
    "bias_local": (
        [BIAS_LOCAL],
        "a random bias field (coefficient 0.2) on half the local crops only: the teacher's"
        " global views stay clean",
    ),
    "gamma_local": (
        ["views={'intensity': {'gamma': {'prob': [0.0, 0.0, 0.5], 'range': [0.8, 1.25]}}}"],
        "a mild random contrast (gamma 0.8-1.25) on half the local crops only",
    ),
    "bias_local_seed_1": (
        [BIAS_LOCAL, "seed=1"],
        "bias_local, training seed 1 (compare with seed_1)",
    ),
    "bias_local_seed_2": (
        [BIAS_LOCAL, "seed=2"],
        "bias_local, training seed 2 (compare with seed_2)",
    ),
    "k_64": (["dino={'proj_output_dim': 64}"], "64 prototypes instead of 256"),
    "weight_decay_04": (["dino={'weight_decay': 0.4}"], "weight decay 0.4 instead of 0.04"),
    "weight_decay_04_seed_1": (
        ["dino={'weight_decay': 0.4}", "seed=1"],
        "weight decay 0.4, training seed 1 (compare with seed_1)",
    ),
    "weight_decay_04_seed_2": (
        ["dino={'weight_decay': 0.4}", "seed=2"],
        "weight decay 0.4, training seed 2 (compare with seed_2)",
    ),
    "lr_0005": (
        ["dino={'learning_rate': 0.0005}"],
        "learning rate 5e-4 instead of 2e-3 (a quarter)",
    ),
    "lr_004": (
        ["dino={'learning_rate': 0.004}"],
        "learning rate 4e-3 instead of 2e-3 (twice)",
    ),
    "bias_aug": (
        ["views={'intensity': {'bias_field': {'prob': [0.5, 0.5, 0.5]}}}"],
        "a random smooth bias field (coefficient 0.2) on half the views",
    ),
    "k_1024": (["dino={'proj_output_dim': 1024}"], "1024 prototypes instead of 256"),
    "blur_strong": (
        [BLUR_STRONG],
        "Gaussian blur on every view, sigma 0.5-1.5 voxels (was p 0.5, 0.25-1)",
    ),
    "aug_off": (
        [
            "views={'intensity': {'smooth': {'prob': [0.0, 0.0, 0.0]}, 'noise': {'prob': [0.0, 0.0, 0.0]}}}"
        ],
        "no noise and no blur on the views (crops and flips only)",
    ),
    "blur_strong_seed_1": (
        [
            BLUR_STRONG,
            "seed=1",
        ],
        "blur_strong, training seed 1 (compare with seed_1)",
    ),
    "blur_strong_seed_2": (
        [
            BLUR_STRONG,
            "seed=2",
        ],
        "blur_strong, training seed 2 (compare with seed_2)",
    ),
    "local_whole": (
        ["views={'local_scale': [1.0, 1.0]}"],
        "local views = the whole volume at 24^3 (a coarser copy, not a part): resolution, not position",
    ),
    "local_large": (
        ["views={'local_scale': [0.25, 0.6]}"],
        "local crops of 25-60 % of the volume resized to 24^3 (the DINO paper's resized crops)",
    ),
    "local_large_seed_1": (
        ["views={'local_scale': [0.25, 0.6]}", "seed=1"],
        "local_large at training seed 1",
    ),
    "local_large_seed_2": (
        ["views={'local_scale': [0.25, 0.6]}", "seed=2"],
        "local_large at training seed 2",
    ),
    "local_large_6": (
        ["views={'local_scale': [0.25, 0.6], 'num_local_crops': 6}"],
        "local_large with 6 local crops instead of 2",
    ),
    "noise_strong": (
        ["views={'intensity': {'noise': {'prob': [0.8, 0.8, 0.8], 'std': 0.2}}}"],
        "noise on the views up to 0.2 of the view's std (was 0.1): against strong_bias's 2x noise",
    ),
    "norm_group": (
        ["encoder={'kwargs': {'norm': ['group', {'num_groups': 4}]}}"],
        "small_cnn with group norm (4 groups) instead of batch norm: no batch statistics",
    ),
    "norm_instance": (
        ["encoder={'kwargs': {'norm': 'instance'}}"],
        "small_cnn with instance norm instead of batch norm",
    ),
    "intensity_bins_8": (
        ["encoder={'kwargs': {'intensity_bins': 8}}"],
        "small_cnn sees each voxel's soft memberships of 8 intensity bands besides the intensity",
    ),
    "head_stages": (
        ["encoder={'kwargs': {'output': 'stages_mean_std'}}"],
        "DINO's head on every stage's channel means and spreads (the probed readout)",
    ),
    "head_stages_seed_1": (
        ["encoder={'kwargs': {'output': 'stages_mean_std'}}", "seed=1"],
        "head_stages, training seed 1",
    ),
    "head_stages_seed_2": (
        ["encoder={'kwargs': {'output': 'stages_mean_std'}}", "seed=2"],
        "head_stages, training seed 2",
    ),
    "head_stages_local_large": (
        [
            "encoder={'kwargs': {'output': 'stages_mean_std'}}",
            "views={'local_scale': [0.25, 0.6]}",
        ],
        "head_stages with local_large's crops (local views of most of the brain)",
    ),
    "head_stages_global_only": (
        ["encoder={'kwargs': {'output': 'stages_mean_std'}}", "views={'num_local_crops': 0}"],
        "head_stages with the two global views only",
    ),
    "n4_only": (
        ["preprocessing={'bias_correction': {'template_fit': {'enabled': False}}}"],
        "bias: N4 alone (no template fit)",
    ),
}


def first_rules(base: Path, sets: list[str]) -> list[str]:
    """The rules a lever's overrides make stale first (what follows them reruns too).

    The copied cohorts carry no Snakemake record of the config they were made with, so a lever
    names them: ``extract`` for readouts, every preprocessing batch rule for preprocessing (one
    per batch table the cohorts hold: BASE's own Snakemake log does not name them when BASE was
    itself made with ``--reuse``), else ``train``.
    """
    keys = {value.split("=", 1)[0] for value in sets}
    if "preprocessing" in keys:
        from nidl_dino.workflow.setup import preprocess_rule_name

        tables = base.glob("*/results/preproc/batches/batch-*.tsv")
        rules = sorted({preprocess_rule_name(path.stem) for path in tables})
        if not rules:
            raise SystemExit(f"no preprocessing batch tables below {base}/*/results/preproc")
        return rules
    if keys == {"extract"}:
        return ["extract"]
    return ["train"]


def run(base: Path, name: str, extra: list[str]) -> None:
    """One lever's feature_quality.py run on the tune cohorts, in BASE-levers/<name>."""
    sets, _ = LEVERS[name]
    out = base.parent / f"{base.name}-levers" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(HERE / "feature_quality.py"), "--split", "tune"]
    cmd += ["--reuse", str(base), "--out", str(out), *extra]
    cmd += ["--forcerun", *first_rules(base, sets)]
    for value in sets:
        cmd += ["--set", value]
    start = time.time()
    # appended: a lever run again on other cohorts keeps the earlier runs' tables
    with open(out.parent / f"{name}.log", "a") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd[1:])}\n")
        log.flush()
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    print(f"{name}: exit {code}, {time.time() - start:.0f} s", flush=True)


def _mean(cell: str) -> float:
    return float(str(cell).split(" ± ")[0])


def table(base: Path, reference: str | None = None) -> str:
    """Every finished lever run, with its change from BASE's (or the ``reference`` lever's)."""
    rows = [("defaults", "BASE's run", pd.read_csv(base / "summary.tsv", sep="\t"))]
    for name, (_, what) in LEVERS.items():
        path = base.parent / f"{base.name}-levers" / name / "summary.tsv"
        if path.exists():
            rows.append((name, what, pd.read_csv(path, sep="\t")))
    rows = [(name, what, frame.set_index("variant")) for name, what, frame in rows]
    ref = next(frame for name, _, frame in rows if name == (reference or "defaults"))
    variants = list(ref.index)
    head = ["lever", "what"]
    for v in variants:
        head += [f"{v} age", f"{v} sex"]
    head += ["mean age change", "beats all (age)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, what, frame in rows:
        cells, changes, beats = [name, what], [], 0
        for v in variants:
            if v not in frame.index or v not in ref.index:
                cells += ["", ""]
                continue
            r = frame.loc[v]
            change = _mean(r["age_dino"]) - _mean(ref.loc[v, "age_dino"])
            changes.append(change)
            beats += bool(r["age_beats_all_by_spread"])
            cells += [f"{r['age_dino']} ({change:+.2f})", f"{_mean(r['sex_dino']):.3f}"]
        mean = sum(changes) / len(changes) if changes else float("nan")
        cells += [f"{mean:+.2f}", f"{beats}/{len(changes)}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path, help="--out of the defaults' feature_quality.py run")
    parser.add_argument("levers", nargs="*", help=f"levers to run (default: all): {list(LEVERS)}")
    parser.add_argument("--table", action="store_true", help="only print the finished runs")
    parser.add_argument(
        "--reference",
        choices=list(LEVERS),
        help="compare with this lever's run instead of BASE's (a lever adopted as a default)",
    )
    parser.add_argument("--scans", default="72", help="subjects per cohort (as for BASE)")
    parser.add_argument(
        "--variants", nargs="+", help="only these tune cohorts (labels; default: all three)"
    )
    args = parser.parse_args()
    base = args.base.resolve()
    if not (base / "summary.tsv").exists():
        raise SystemExit(f"{base}/summary.tsv missing: run feature_quality.py --out {base} first")
    unknown = [n for n in args.levers if n not in LEVERS]
    if unknown:
        raise SystemExit(f"unknown lever(s) {unknown}; choose from {list(LEVERS)}")
    if not args.table:
        for name in args.levers or list(LEVERS):
            extra = ["--scans", args.scans]
            run(base, name, extra + (["--variants", *args.variants] if args.variants else []))
    from nidl_dino.machine import describe_machine

    print(f"\nmachine: {describe_machine()}")
    against = args.reference or "BASE's defaults"
    print(f"age MAE in years (change from {against} on the same cohort), sex ROC-AUC\n")
    print(table(base, args.reference))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.exit(main())
