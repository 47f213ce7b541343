"""Feature quality: the whole workflow on a larger generated cohort, probes against baselines.

    python benchmarks/feature_quality.py [--n-subjects 200] [--out /tmp/nidl-dino-fq] [--cores 2]

Generates the synthetic demo cohort (``nidl_dino.demo``) with ``--n-subjects`` scans, runs the
workflow on it with config.yaml as shipped (plus any ``--set key=value`` overrides, as with
snakemake's ``--config``), and prints the probe table (DINO features next to every baseline:
chance, random-weights encoder, intensity PCA, brain volume), the time of each stage and the
machine. Re-running with the same ``--out`` reuses finished steps (Snakemake).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nidl_dino.machine import describe_machine  # noqa: E402


def machine() -> str:
    return describe_machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-subjects", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/nidl-dino-feature-quality")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra snakemake --config overrides (repeatable)",
    )
    args = parser.parse_args()

    from nidl_dino.demo import make_demo_dataset

    out = Path(args.out).resolve()
    bids = out / "bids"
    t0 = time.time()
    if not (bids / "participants.tsv").exists():
        make_demo_dataset(bids, n_subjects=args.n_subjects, seed=args.seed, n_bad=2)
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
        "--config",
        f"bids_dir={bids}",
        f"output_dir={out / 'results'}",
        "demo={'enabled': False}",
        *args.set,
    ]
    t1 = time.time()
    run = subprocess.run(cmd, cwd=out, capture_output=True, text=True)
    t_run = time.time() - t1
    if run.returncode != 0:
        print(run.stderr[-4000:], file=sys.stderr)
        print(f"workflow failed (exit {run.returncode}); logs in {out / 'results/logs'}")
        return run.returncode

    results = out / "results"
    summary = (results / "model/training_summary.json").read_text()
    import pandas as pd

    qc = pd.read_csv(results / "qc/qc.tsv", sep="\t")
    print(f"# Feature quality on {args.n_subjects} generated subjects (seed {args.seed})\n")
    print(f"machine: {machine()}")
    print(
        f"scans: {len(qc)} ({(qc['status'] == 'ok').sum()} ok, "
        f"{(qc['status'] != 'ok').sum()} excluded)"
    )
    print(f"time: data {t_data:.0f} s, workflow {t_run:.0f} s (preprocess+train+extract+probes)")
    print(f"training: {summary.strip()}\n")
    print((results / "probes/probe_table.md").read_text())
    print(
        "\nCeiling: the same probes (same folds) on the generative model's own latents "
        "(demo_manifest.tsv: ventricle, grey-matter, CSF and intracranial volumes, grey-matter "
        "intensity, sex shape-mode amplitude). No image feature can carry more than these; "
        "without head size (intracranial volume), which the affine registration to MNI removes, "
        "they bound what features of the preprocessed volumes can carry.\n"
    )
    print(ceiling_table(bids, results))
    return 0


def ceiling_table(bids: Path, results: Path) -> str:
    """Probe scores of the ground-truth latents that generated the images (an upper bound)."""
    import numpy as np
    import pandas as pd
    import yaml

    from nidl_dino.evaluation import probe_targets
    from nidl_dino.probes import format_probe_table

    probes = yaml.safe_load((REPO / "config.yaml").read_text())["probes"]
    cohort = pd.read_parquet(results / "features/cohort.parquet")
    table = cohort[cohort["status"] == "ok"].reset_index(drop=True)
    ids = ["participant_id", "session_id"]
    manifest = pd.read_csv(bids / "demo_manifest.tsv", sep="\t", dtype={"session_id": str})
    for frame in (table, manifest):
        frame["session_id"] = frame["session_id"].fillna("").astype(str)
        frame["participant_id"] = frame["participant_id"].astype(str)
    latent = table[ids].merge(manifest, on=ids, how="left")
    icv = latent["icv_ml"].to_numpy(float)
    registered = np.column_stack(
        [
            np.log(latent["ventricles_ml"].to_numpy(float) / icv),
            latent["gm_ml"].to_numpy(float) / icv,
            latent["csf_ml"].to_numpy(float) / icv,
            latent["gm_intensity"].to_numpy(float),
            latent["sex_mode_mm"].to_numpy(float),
        ]
    )
    sets = {
        "generative latents": np.column_stack([registered, np.log(icv)]),
        # The affine registration to MNI removes head size: what the preprocessed volumes
        # (and so every image feature set above but brain_volume) can still show.
        "latents without head size": registered,
    }
    scores, _, note = probe_targets(sets, table, probes, include_chance=False)
    if note:
        print(f"ceiling: {note}")
    if not len(scores):
        return ""
    return format_probe_table(scores)


if __name__ == "__main__":
    sys.exit(main())
