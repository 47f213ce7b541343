"""Feature distances of real-head acquisitions: is a skull-stripped or biased scan of a head
close to the untouched scan, in a trained teacher's feature space?

One command, one markdown table (the machine named above it)::

    python benchmarks/real_head_features.py [--teacher results/demo/model/teacher.pt]
        [--output-dir results/demo]

The teacher is a trained ``teacher.pt`` (by default the demo's: run ``snakemake --cores 2``
first); the reference cohort is that run's preprocessed scans (``--output-dir``). ``ch2``
(Debian's mricron-data, as in ``tests/real_head.py``) is preprocessed with the teacher's
grid as ``preprocess_scan`` does, untouched, skull-stripped (``ch2bet``) and under a strong
x0.6-1.6 field with each bias correction; each scan's features are compared with the untouched
head's. Distances are Euclidean after standardising each feature over the cohort, and are
given as a fraction of the median distance between two different subjects of the cohort (its
5th percentile beside it: the closest pairs of subjects).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's nidl_dino
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import nibabel as nib
import numpy as np

from nidl_dino.features.extract import extract_features
from nidl_dino.features.teacher import load_teacher
from nidl_dino.machine import describe_machine
from nidl_dino.preprocessing import merge_config, output_paths, preprocess_scan


def strong_field(img: nib.Nifti1Image) -> np.ndarray:
    """The field of the real-head tests (tests/preprocessing/test_real_head.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "preprocessing"))
    from test_real_head import strong_field as field

    return field(img)


def acquisitions(files: dict, folder: Path, spacing: float) -> dict[str, Path]:
    """Preprocess ch2 in every way compared; return name -> preprocessed volume."""
    head = nib.load(files["ch2.nii.gz"])
    data = np.asarray(head.get_fdata(dtype=np.float32))
    biased = folder / "ch2_biased.nii.gz"
    nib.save(nib.Nifti1Image(data * strong_field(head), head.affine), biased)
    base = {"resample": {"spacing_mm": spacing}}
    runs = {
        "ch2 (untouched)": (files["ch2.nii.gz"], {}),
        "ch2bet (skull-stripped)": (files["ch2bet.nii.gz"], {}),
        "ch2 + strong field, shipped correction": (biased, {}),
        "ch2 + strong field, N4 alone": (
            biased,
            {"bias_correction": {"template_fit": {"enabled": False}}},
        ),
        "ch2 + strong field, no correction": (biased, {"bias_correction": {"enabled": False}}),
    }
    volumes = {}
    for i, (name, (path, change)) in enumerate(runs.items()):
        config = merge_config({**base, **change})
        record = preprocess_scan(path, folder, f"scan{i}", config)
        if record["status"] != "ok":
            raise SystemExit(f"{name}: excluded ({record['reason']})")
        volumes[name] = output_paths(folder, f"scan{i}", config)["volume"]
    return volumes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="results/demo/model/teacher.pt")
    parser.add_argument("--output-dir", default="results/demo")
    args = parser.parse_args(argv)
    from real_head import mricron_files

    encoder, info = load_teacher(args.teacher)
    cohort = sorted(Path(args.output_dir).glob("sub-*/**/*_desc-preproc_T1w.nii.gz"))
    if len(cohort) < 5:
        raise SystemExit(f"{args.output_dir}: fewer than 5 preprocessed scans; run the workflow")
    spacing = float(nib.load(cohort[0]).header.get_zooms()[0])
    with tempfile.TemporaryDirectory() as tmp:
        volumes = acquisitions(mricron_files(), Path(tmp), spacing)
        paths = [str(p) for p in cohort] + [str(p) for p in volumes.values()]
        features = extract_features(encoder, paths, accelerator="cpu")
    ref, heads = features[: len(cohort)], features[len(cohort) :]
    mean, std = ref.mean(axis=0), ref.std(axis=0) + 1e-8
    ref, heads = (ref - mean) / std, (heads - mean) / std
    pairs = np.linalg.norm(ref[:, None] - ref[None], axis=-1)[np.triu_indices(len(ref), 1)]
    median, p5 = float(np.median(pairs)), float(np.percentile(pairs, 5))
    print(f"Machine: {describe_machine()}")
    print(
        f"Teacher {args.teacher} ({info.get('model_id')}); cohort: {len(cohort)} scans of "
        f"{args.output_dir} ({spacing:g} mm grid); between two subjects: median {median:.2f}, "
        f"5th percentile {p5:.2f} ({p5 / median:.2f} of the median)\n"
    )
    print("| scan | distance to the untouched head | / median between subjects |")
    print("|---|---|---|")
    for name, row in zip(volumes, heads, strict=True):
        distance = float(np.linalg.norm(row - heads[0]))
        print(f"| {name} | {distance:.2f} | {distance / median:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
