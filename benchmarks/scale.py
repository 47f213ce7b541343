"""Large cohorts: dry-run cost of the DAG, cluster submissions, and the aggregates at 10k scans.

    python benchmarks/scale.py                 # everything (about 6 min on a 2-core CPU)
    python benchmarks/scale.py --parts cohort  # some parts: dag, cohort, report

dag: fake BIDS trees of 1,000 and 10,000 scans (every T1w a link to one small valid NIfTI);
``snakemake -n`` CPU time and peak memory with the local and the SLURM profile, the number of
jobs (= sbatch submissions with profiles/slurm), of which preprocessing (bar: <= 300 at 10k), and
the 1k -> 10k ratio.
cohort: the cohort rule's streaming join on a synthetic 10,000 x 480 feature cohort: time and
peak memory of a fresh process.
report: the report rule on a synthetic 10,000-scan run (QC table with 2 % excluded, one QC
picture per scan (the template with noise, drawn as preprocessing draws it), 10,000 x 480 cohort, probe predictions of 5 feature sets x 2 targets x 3
repeats): time, peak memory, and the size of report.html (bar: < 10 MB) and of its montage pages.
Prints one table per part and the machine.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nidl_dino.machine import describe_machine

WRAPPER = r"""
import os, resource, subprocess, sys, json
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
u = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": p.returncode, "cpu": u.ru_utime + u.ru_stime, "rss_mib": u.ru_maxrss / 1024,
                  "out": p.stdout[-20000:] + p.stderr[-5000:]}))
"""


def measured(cmd: list[str], cwd: Path | None = None) -> dict:
    import json

    start = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-c", WRAPPER, *cmd], cwd=cwd, capture_output=True, text=True
    )
    info = json.loads(res.stdout.strip().splitlines()[-1])
    info["wall"] = time.perf_counter() - start
    return info


def fake_bids(root: Path, n: int) -> Path:
    """n subjects, each T1w a symbolic link to one small valid NIfTI; participants.tsv."""
    import nibabel as nib
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    source = root / "source_T1w.nii.gz"
    data = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([6.0, 6.0, 6.0, 1.0])), str(source))
    (root / "dataset_description.json").write_text('{"Name": "fake", "BIDSVersion": "1.9.0"}')
    rows = ["participant_id\tage\tsex"]
    for i in range(n):
        sub = f"sub-{i:05d}"
        anat = root / sub / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        link = anat / f"{sub}_T1w.nii.gz"
        if not link.exists():
            link.symlink_to(source)
        rows.append(f"{sub}\t{20 + i % 60}\t{'FM'[i % 2]}")
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    (root / ".bidsignore").write_text("source_T1w.nii.gz\n")
    return root


def _jobs(text: str, rule: str = "total") -> int:
    """Jobs of one rule (or the total) in the job-count table of ``snakemake -n``; ``preprocess``
    counts the jobs of every batch's rule (``preprocess_batch_NNNN``)."""
    if rule == "preprocess":
        return sum(int(n) for n in re.findall(r"\npreprocess_batch_\d+\s+(\d+)", text)) or -1
    match = re.search(rf"\n{rule}\s+(\d+)", text)
    return int(match.group(1)) if match else -1


def part_dag(work: Path, sizes: list[int]) -> None:
    rows = []
    for n in sizes:
        bids = fake_bids(work / f"bids{n}", n)
        for profile in ("local", "slurm"):
            args = (
                ["--profile", str(REPO / "profiles" / profile)]
                if profile == "slurm"
                else ["--cores", "8"]
            )
            cmd = [
                sys.executable,
                "-m",
                "snakemake",
                "-n",
                "--snakefile",
                str(REPO / "Snakefile"),
                *args,
                "--config",
                f"bids_dir={bids}",
                f"output_dir={work}/out{n}",
            ]
            info = measured(cmd, cwd=work)
            if info["rc"] != 0:
                print(info["out"][-3000:])
                raise SystemExit(f"dry run failed at {n} scans ({profile})")
            rows.append(
                (n, profile, _jobs(info["out"]), info["cpu"], info["rss_mib"], info["wall"])
            )
            if profile == "slurm":
                submissions = (n, _jobs(info["out"]), _jobs(info["out"], "preprocess"))
    print("\n## dag: snakemake -n on fake BIDS trees\n")
    print("| scans | profile | jobs (submissions) | CPU s | peak MiB | wall s |")
    print("|---|---|---|---|---|---|")
    for n, profile, jobs, cpu, rss, wall in rows:
        print(f"| {n:,} | {profile} | {jobs:,} | {cpu:.1f} | {rss:.0f} | {wall:.1f} |")
    n, total, preprocess = submissions
    print(
        f"\nsubmissions with profiles/slurm at {n:,} scans: {total:,} sbatch jobs, of which "
        f"{preprocess:,} preprocessing ({'within' if preprocess <= 300 else 'OVER'} the bar of 300)"
    )
    if len(sizes) >= 2:
        for profile in ("local", "slurm"):
            small = next(r for r in rows if r[0] == sizes[0] and r[1] == profile)
            large = next(r for r in rows if r[0] == sizes[-1] and r[1] == profile)
            print(
                f"\n{profile}: {sizes[0]:,} -> {sizes[-1]:,} scans: CPU x{large[3] / small[3]:.1f} "
                f"for x{sizes[-1] / sizes[0]:.0f} scans"
            )


COHORT_CHILD = r"""
import sys, time, resource
sys.path.insert(0, sys.argv[1])
from nidl_dino.features.cohort import build_cohort
start = time.perf_counter()
n = build_cohort(sys.argv[2], sys.argv[3], {"bids_dir": sys.argv[4], "inputs": {}}, sys.argv[5], sys.argv[6])
print(n, time.perf_counter() - start)
"""


def part_cohort(work: Path, n: int = 10_000, dim: int = 480) -> None:
    import numpy as np
    import pandas as pd

    from nidl_dino.features.cohort import feature_columns

    feats = work / "features"
    feats.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    header = "\t".join(
        ["participant_id", "session_id", "model_id", "scan_id", *feature_columns(dim)]
    )
    qc_rows, manifest = [], []
    for i in range(n):
        scan = f"sub-{i:05d}"
        ok = i % 50 != 7
        qc_rows.append(
            {
                "participant_id": scan,
                "session_id": "",
                "scan_id": scan,
                "status": "ok" if ok else "excluded",
                "reason": "" if ok else "bad",
                "etiv_ml": 1500.0,
            }
        )
        if ok:
            values = "\t".join(f"{v:.8g}" for v in rng.standard_normal(dim))
            (feats / f"{scan}.tsv").write_text(f"{header}\n{scan}\t\tdino-x\t{scan}\t{values}\n")
            manifest.append({"scan_id": scan, "table": f"{scan}.tsv"})
    pd.DataFrame(qc_rows).to_csv(work / "qc.tsv", sep="\t", index=False)
    pd.DataFrame(manifest).to_csv(feats / "manifest.tsv", sep="\t", index=False)
    bids = work / "bids_cohort"
    bids.mkdir(exist_ok=True)
    pd.DataFrame(
        {
            "participant_id": [r["participant_id"] for r in qc_rows],
            "age": rng.uniform(20, 80, n).round(1),
        }
    ).to_csv(bids / "participants.tsv", sep="\t", index=False)
    info = measured(
        [
            sys.executable,
            "-c",
            COHORT_CHILD,
            str(REPO),
            str(feats / "manifest.tsv"),
            str(work / "qc.tsv"),
            str(bids),
            str(work / "cohort.tsv"),
            str(work / "cohort.parquet"),
        ]
    )
    if info["rc"] != 0:
        raise SystemExit(info["out"][-3000:])
    print(f"\n## cohort: {n:,} scans x {dim} features (streamed join)\n")
    print("| scans | features | wall s | CPU s | peak MiB | cohort.tsv MB | cohort.parquet MB |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {n:,} | {dim} | {info['wall']:.1f} | {info['cpu']:.1f} | {info['rss_mib']:.0f} | "
        f"{(work / 'cohort.tsv').stat().st_size / 1e6:.0f} | {(work / 'cohort.parquet').stat().st_size / 1e6:.0f} |"
    )


REPORT_CHILD = r"""
import sys, time, json
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from nidl_dino.evaluation.report import write_report
work = Path(sys.argv[2])
n = int(sys.argv[3])
pngs = {f"sub-{i:05d}": work / "qc.png" for i in range(n)}
start = time.perf_counter()
write_report(work / "report" / "report.html", qc_tsv=work / "qc.tsv", qc_pngs=pngs,
             probe_scores_tsv=work / "scores.tsv", predictions_tsv=work / "predictions.tsv",
             cohort_parquet=work / "cohort.parquet", config={"output_dir": str(work)},
             montage_dir=work / "report" / "montage")
print(time.perf_counter() - start)
"""


def part_report(work: Path, n: int = 10_000, dim: int = 480) -> None:
    import numpy as np
    import pandas as pd

    from nidl_dino.features.cohort import feature_columns

    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    # a QC picture as preprocessing draws it: the MNI template on a 1.5 mm 128^3 grid, with
    # scanner-like noise (a noise-only picture would be a worst case PNG compression never meets)
    from nidl_dino.preprocessing.qc import save_qc_png, template_on_grid

    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = np.array([0.0, -17.0, 5.0]) - 1.5 * 63.5
    volume = template_on_grid((128, 128, 128), affine).astype(np.float32)
    volume += 0.05 * volume.max() * rng.standard_normal(volume.shape).astype(np.float32)
    save_qc_png(work / "qc.png", volume, affine, "sub-00000: excluded", "qc.min_similarity")
    scans = [f"sub-{i:05d}" for i in range(n)]
    ok = np.array([i % 50 != 7 for i in range(n)])
    pd.DataFrame(
        {
            "participant_id": scans,
            "session_id": "",
            "scan_id": scans,
            "status": np.where(ok, "ok", "excluded"),
            "reason": np.where(ok, "", "qc.min_similarity: 0.31 < 0.5"),
            "metrics.similarity": rng.uniform(0.3, 0.95, n).round(3),
            "metrics.etiv_ml": rng.normal(1500, 150, n).round(1),
        }
    ).to_csv(work / "qc.tsv", sep="\t", index=False)
    features = rng.standard_normal((n, dim)).astype(np.float32)
    features[~ok] = np.nan
    cohort = pd.DataFrame(features, columns=feature_columns(dim))
    age = rng.uniform(20, 80, n).round(1)
    ids = pd.DataFrame(
        {
            "participant_id": scans,
            "session_id": "",
            "status": np.where(ok, "ok", "excluded"),
            "age": age,
            "sex": rng.choice(["F", "M"], n),
            "site": rng.choice(["A", "B", "C"], n),
            "model_id": "dino-x",
        }
    )
    pd.concat([ids, cohort], axis=1).to_parquet(work / "cohort.parquet")
    sets = ["dino", "random_encoder", "intensity_pca", "brain_volume", "chance"]
    rows, scores = [], []
    index = np.flatnonzero(ok)
    for feature_set in sets:
        for target, task in (("age", "regression"), ("sex", "classification")):
            for repeat in range(3):
                true = age[index] if target == "age" else rng.integers(0, 2, len(index))
                pred = (
                    true + rng.normal(0, 8, len(index))
                    if target == "age"
                    else rng.random(len(index))
                )
                rows.append(
                    pd.DataFrame(
                        {
                            "feature_set": feature_set,
                            "target": target,
                            "task": task,
                            "row": np.arange(len(index)),
                            "participant_id": [scans[i] for i in index],
                            "session_id": "",
                            "repeat": repeat,
                            "fold": np.arange(len(index)) % 5,
                            "y_true": true,
                            "y_pred": pred,
                        }
                    )
                )
            metric = "mae" if target == "age" else "roc_auc"
            scores.append(
                {
                    "feature_set": feature_set,
                    "target": target,
                    "task": task,
                    "metric": metric,
                    "mean": 8.0 if target == "age" else 0.6,
                    "std": 0.2,
                    "n_folds": 15,
                    "n_samples": len(index),
                    "n_features": dim,
                }
            )
    pd.concat(rows).to_csv(work / "predictions.tsv", sep="\t", index=False)
    pd.DataFrame(scores).to_csv(work / "scores.tsv", sep="\t", index=False)
    info = measured([sys.executable, "-c", REPORT_CHILD, str(REPO), str(work), str(n)])
    if info["rc"] != 0:
        raise SystemExit(info["out"][-3000:])
    html_mb = (work / "report" / "report.html").stat().st_size / 1e6
    pages = sorted((work / "report" / "montage").glob("*.html"))
    pages_mb = sum(p.stat().st_size for p in pages) / 1e6
    print(f"\n## report: {n:,} scans ({(~ok).sum()} excluded), one QC picture each\n")
    print("| scans | wall s | CPU s | peak MiB | report.html MB | montage pages | pages MB |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {n:,} | {info['wall']:.1f} | {info['cpu']:.1f} | {info['rss_mib']:.0f} | "
        f"{html_mb:.2f} | {len(pages)} | {pages_mb:.1f} |"
    )
    print(
        f"\nreport.html {html_mb:.2f} MB: {'within' if html_mb < 10 else 'OVER'} the bar of 10 MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = ["dag", "cohort", "report"]
    parser.add_argument("--parts", nargs="+", default=parts, choices=parts)
    parser.add_argument("--sizes", nargs="+", type=int, default=[1000, 10000])
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp)")
    args = parser.parse_args()
    print(f"machine: {describe_machine()}")
    with tempfile.TemporaryDirectory(prefix="nidl-scale-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "dag" in args.parts:
            part_dag(work, args.sizes)
        if "cohort" in args.parts:
            part_cohort(work / "cohort")
        if "report" in args.parts:
            part_report(work / "report")


if __name__ == "__main__":
    main()
