"""QC calibrated by ROC: good registrations against the same registrations deliberately wrong.

One command, prints the machine, the labelled set, the ROC summary per candidate measure and the
false-exclusion / false-acceptance rates at the chosen thresholds::

    python benchmarks/qc_calibration.py                 # demo seeds 0-1 (48 scans) + real head
    python benchmarks/qc_calibration.py --seeds 0 1 2 3 --n-subjects 50 --table qc.csv  # 200 + 11
    python benchmarks/qc_calibration.py --seeds --table real.csv        # the real head only
    python benchmarks/qc_calibration.py --from-table qc.csv real.csv    # summarise saved rows

(about 5 s per scan on our loaded 2-core VM: 200 generated scans plus the real head take 20 min;
``--table`` writes the rows as it goes, ``--from-table`` re-applies the thresholds of the
current config to saved rows without registering again.)

Good registrations: every valid scan of demo cohorts (``make_demo_dataset``, several seeds) and
the real-head acquisitions of ``tests/preprocessing/test_real_head.py`` (where mricron-data can be had), each
registered as :func:`~nidl_dino.preprocessing.preprocess_scan` does (same steps, same config).
Wrong ones, without re-registering: the found transform ``T`` (template -> subject) composed
with a perturbation ``P`` in template space, ``T @ P``: a rotation by 3, 5, 7 or 10 degrees
about a random axis through the brain centre, a shift of 3, 5, 7 or 10 mm in a random
direction, a scaling by 5, 10 or 15 % (up or down), the y (anterior-posterior) or z axis
flipped, x and y swapped. A flip of x (left-right) is not in the set: a brain is nearly
symmetric, no image measure can see it (and the storage orientation is read from the header,
which the validation checks). "Large" perturbations are those the QC must catch: above
5 degrees, 5 mm or 10 %, and every flip or swap.

Candidate measures, each computed at working resolution inside the template brain mask (as
:func:`~nidl_dino.preprocessing.qc.similarity_to_template`):

- ``pearson``: correlation of subject and template intensities (the measure shipped before);
- ``robust``: the same after a robust standardisation of the subject (clipped to its in-mask
  2nd-98th percentiles), so that bright vessels, fat or a residual bias weigh less;
- ``nmi``: normalised mutual information (H(X) + H(Y)) / H(X, Y), 32 bins;
- ``overlap``: fraction of the template brain that lands inside the subject's head foreground;

and the relative check the pipeline ships (:func:`~nidl_dino.preprocessing.qc.local_optimum`):
``similarity`` (``robust`` without the field-of-view clipping difference), ``gain`` (best
similarity of a 3 deg / 3 mm / 5 % step, an axis flip or swap, minus the found one's),
``mirror_gain`` (flips and swaps only) and ``offset_deg`` / ``offset_mm`` / ``offset_pct`` (the
estimated distance to the similarity maximum). The summary applies the ``qc`` section of the
default config (:func:`~nidl_dino.preprocessing.qc.qc_flags`) to every row.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's nidl_dino
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "preprocessing"))

import numpy as np
import pandas as pd

from nidl_dino.errors import ScanRejected
from nidl_dino.machine import describe_machine
from nidl_dino.preprocessing.config import merge_config
from nidl_dino.preprocessing.io import read_nifti
from nidl_dino.preprocessing.mask import foreground_mask
from nidl_dino.preprocessing.orientation import reorient_to_ras
from nidl_dino.preprocessing.pipeline import correct_and_register
from nidl_dino.preprocessing.qc import local_optimum, qc_flags, qc_measures
from nidl_dino.preprocessing.resample import block_average, block_factors
from nidl_dino.preprocessing.validate import validate_image

CENTRE_MM = np.array([0.0, -18.0, 10.0])  # template brain centre, pivot of the perturbations
MEASURES = ("pearson", "robust", "nmi", "overlap")
#: Local-optimum measures (:func:`~nidl_dino.preprocessing.qc.local_optimum`); lower is better.
OPTIMUM = ("gain", "offset_deg", "offset_mm", "offset_pct")
# (``mirror_gain`` too, in tables written after the flip and swap probes were added)


def working_image(path, cfg):
    """The bias-corrected working image, its affine, head mask and registration (as the pipeline)."""
    img = read_nifti(path)
    data, affine = validate_image(img, cfg["validation"], str(path))
    data, affine = reorient_to_ras(data, affine)
    working = float(cfg["working_spacing_mm"])
    work, work_affine = block_average(data, affine, block_factors(affine, working))
    head = foreground_mask(work)
    aligned = correct_and_register(work, work_affine, head, cfg, str(path))
    return aligned.work, work_affine, head, aligned.transform


def about_centre(linear: np.ndarray, shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    p = np.eye(4)
    p[:3, :3] = linear
    p[:3, 3] = CENTRE_MM - linear @ CENTRE_MM + np.asarray(shift)
    return p


def axis_angle(axis: np.ndarray, degrees: float) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_rotvec(np.deg2rad(degrees) * axis / np.linalg.norm(axis)).as_matrix()


def perturbations(rng: np.random.Generator):
    """(kind, size, large, P) for one scan; random axes and directions from ``rng``."""
    out = []
    for deg in (3, 5, 7, 10):
        out.append(
            ("rotation_deg", deg, deg > 5, about_centre(axis_angle(rng.normal(size=3), deg)))
        )
    for mm in (3, 5, 7, 10):
        d = rng.normal(size=3)
        out.append(("shift_mm", mm, mm > 5, about_centre(np.eye(3), mm * d / np.linalg.norm(d))))
    for pct in (5, 10, 15):
        s = 1 + pct / 100 * rng.choice([-1, 1])
        out.append(("scale_pct", pct, pct > 10, about_centre(np.eye(3) * s)))
    out.append(("flip", "y", True, about_centre(np.diag([1.0, -1.0, 1.0]))))
    out.append(("flip", "z", True, about_centre(np.diag([1.0, 1.0, -1.0]))))
    out.append(("swap", "xy", True, about_centre(np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]]))))
    return out


def good_scans(seeds, n_subjects, folder: Path, real_head: bool = True):
    from nidl_dino.demo import make_demo_dataset

    scans = []
    for seed in seeds:
        bids = folder / f"demo{seed}"
        make_demo_dataset(bids, n_subjects=n_subjects, seed=seed, n_bad=0)
        for path in sorted(bids.glob("sub-*/anat/*_T1w.nii.gz")):
            scans.append((f"demo seed {seed}", path))
    if not real_head:
        return scans
    try:
        import nibabel as nib
        from real_head import Unavailable, mricron_files
        from test_real_head import acquire

        files = mricron_files()
        head = nib.load(files["ch2.nii.gz"])
        brain = np.asarray(nib.load(files["ch2bet.nii.gz"]).dataobj) > 0
        kinds = ["moved", "LPS", "PIL", "aniso_1x1x3", "int16_scaled", "bias_noise"]
        kinds += ["defaced", "cropped"]
        for kind in kinds:
            path, _ = acquire(kind, head, brain, folder)
            scans.append(("real head", path))
        for name in ("ch2.nii.gz", "ch2bet.nii.gz", "ch2better.nii.gz"):
            scans.append(("real head", files[name]))
    except Unavailable as err:
        print(f"note: real head left out ({err})")
    return scans


def roc_auc(good: np.ndarray, bad: np.ndarray) -> float:
    """P(a good scan scores higher than a bad one), ties counted half (Mann-Whitney)."""
    g, b = good[:, None], bad[None, :]
    return float(((g > b).sum() + 0.5 * (g == b).sum()) / (g.size * b.size))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1], help="none: real head only")
    parser.add_argument("--n-subjects", type=int, default=24)
    parser.add_argument("--table", type=Path, help="also write every row to this CSV (as it goes)")
    parser.add_argument("--no-real-head", action="store_true", help="generated cohorts only")
    parser.add_argument(
        "--from-table", type=Path, nargs="+", help="summarise CSVs written by --table"
    )
    args = parser.parse_args(argv)
    if args.from_table is not None:
        tables = [pd.read_csv(path, keep_default_na=False) for path in args.from_table]
        summarise(pd.concat(tables, ignore_index=True), merge_config(), 0.0)
        return 0
    cfg = merge_config()
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nidl_dino_qc_") as tmp:
        scans = good_scans(args.seeds, args.n_subjects, Path(tmp), not args.no_real_head)
        for i, (source, path) in enumerate(scans):
            try:
                work, work_affine, head, transform = working_image(path, cfg)
            except ScanRejected as err:
                print(f"note: {path.name} rejected before QC ({err.reason})")
                continue
            measure = {
                "source": source,
                "scan": path.name,
                "kind": "good",
                "size": "",
                "large": False,
            }
            working = float(cfg["working_spacing_mm"])
            tick = time.perf_counter()
            optimum = local_optimum(work, work_affine, transform, working)
            measure["check_s"] = time.perf_counter() - tick
            scan_rows = [{**measure, **qc_measures(work, work_affine, head, transform, cfg)}]
            scan_rows[0].update(optimum)
            rng = np.random.default_rng(i)
            for kind, size, large, p in perturbations(rng):
                values = qc_measures(work, work_affine, head, transform @ p, cfg)
                values.update(local_optimum(work, work_affine, transform @ p, working))
                scan_rows.append({**measure, "kind": kind, "size": size, "large": large, **values})
            rows += scan_rows
            if args.table is not None:
                pd.DataFrame(rows).to_csv(args.table, index=False)
            print(f"{i + 1}/{len(scans)} {source} {path.name}", file=sys.stderr, flush=True)
    summarise(pd.DataFrame(rows), cfg, time.perf_counter() - start)
    return 0


def summarise(table: pd.DataFrame, cfg, elapsed: float) -> None:
    """Print the ROC summary and the rates of the shipped checks (see the module docstring)."""
    table["large"] = table["large"].astype(str) == "True"
    table["size"] = table["size"].astype(str)
    good = table[table.kind == "good"]
    large = table[table.large]
    print(f"Machine: {describe_machine()}")
    print(
        f"Good registrations: {len(good)} ({', '.join(f'{k}: {v}' for k, v in good.source.value_counts().items())}); "
        f"perturbed: {len(table) - len(good)}, of which large: {len(large)}; {elapsed:.0f} s\n"
    )
    print(
        "| measure | ROC AUC good vs large | AUC good vs all perturbed | good: min (1st pct) | large: max |"
    )
    print("|---|---|---|---|---|")
    for m in MEASURES:
        auc_large = roc_auc(good[m].to_numpy(), large[m].to_numpy())
        auc_all = roc_auc(good[m].to_numpy(), table[table.kind != "good"][m].to_numpy())
        print(
            f"| {m} | {auc_large:.4f} | {auc_all:.4f} | {good[m].min():.3f} "
            f"({good[m].quantile(0.01):.3f}) | {large[m].max():.3f} |"
        )
    for m in OPTIMUM:
        auc_large = roc_auc(-good[m].to_numpy(), -large[m].to_numpy())
        print(
            f"| {m} (lower is better) | {auc_large:.4f} | | {good[m].max():.3f} "
            f"({good[m].quantile(0.99):.3f}) worst | {large[m].min():.3f} best |"
        )
    qc = cfg["qc"]
    print(
        f"\nShipped checks (qc section): similarity >= {qc['min_similarity']}, local optimum: "
        f"gain <= {qc['max_optimum_gain']}, offsets <= {qc['max_optimum_offset']}"
    )
    table["excluded"] = [
        bool(registration_flags(row, qc)) for row in table.to_dict(orient="records")
    ]
    good = table[table.kind == "good"]
    large = table[table.large]
    small = table[(table.kind != "good") & ~table.large]
    print(f"- false exclusions: {int(good.excluded.sum())} of {len(good)} good scans")
    for source, group in good.groupby("source"):
        print(f"  - {source}: {int(group.excluded.sum())} of {len(group)}")
    print(
        f"- false acceptances: {int((~large.excluded).sum())} of {len(large)} large perturbations"
    )
    print(
        f"- small perturbations (<= 5 deg / 5 mm / 10 %) excluded: {int(small.excluded.sum())} of {len(small)}"
    )
    if "check_s" in good:
        print(
            f"- local-optimum check: {good.check_s.mean():.3f} s per scan (max {good.check_s.max():.3f})"
        )
    print("\nPer perturbation: share excluded, similarity (median) and gain, offsets (median)")
    print("| perturbation | n | excluded | similarity | gain | offset deg | offset mm | offset % |")
    print("|---|---|---|---|---|---|---|---|")
    for (kind, size), group in table.groupby(["kind", "size"], sort=False):
        print(
            f"| {kind} {size} | {len(group)} | {group.excluded.mean():.1%} | "
            f"{group.robust.median():.3f} | {group.gain.median():.3f} | "
            f"{group.offset_deg.median():.1f} | {group.offset_mm.median():.1f} | "
            f"{group.offset_pct.median():.1f} |"
        )
    wrong = pd.concat([good[good.excluded], large[~large.excluded]])
    if len(wrong):
        print("\nGood scans excluded and large perturbations accepted:")
        columns = ["source", "scan", "kind", "size", "robust", "gain", "offset_deg", "offset_mm"]
        print(wrong[columns + ["offset_pct"]].to_string(index=False))


def registration_flags(row: dict, qc: dict) -> list[str]:
    """The registration flags of :func:`nidl_dino.preprocessing.qc.qc_flags` for one row."""
    metrics = {
        "registration_similarity": row["similarity"],
        "registration_optimum": {k: row[k] for k in (*OPTIMUM, "mirror_gain") if k in row},
        "outside_fov_fraction": 0.0,
        "intensity": {"p99_over_p50": 2.0},
    }
    return qc_flags(metrics, qc)


if __name__ == "__main__":
    sys.exit(main())
