"""Helpers for the workflow tests: tiny BIDS trees and a snakemake runner (not tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"


def tiny_nifti(path: Path, shape=(8, 8, 8), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).random(shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return path


def tiny_bids(root: Path, subjects=("01", "02", "03"), sessions=()) -> Path:
    """A BIDS tree of tiny T1w files with participants.tsv (content irrelevant to a dry-run)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text('{"Name": "tiny", "BIDSVersion": "1.9.0"}')
    rows = ["participant_id\tage\tsex"]
    for i, sub in enumerate(subjects):
        rows.append(f"sub-{sub}\t{30 + i}\t{'MF'[i % 2]}")
        for ses in sessions or [None]:
            folder = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
            name = f"sub-{sub}" + (f"_ses-{ses}" if ses else "") + "_T1w.nii.gz"
            tiny_nifti(folder / name, seed=i)
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    return root


def snakemake(
    workdir: Path, *args: str, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run snakemake on the project's Snakefile from ``workdir`` (outputs stay below it)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), *args]
    return subprocess.run(
        cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout, env=env
    )


def dry_run(
    workdir: Path, bids: Path, *config: str, output_dir: str = "out", **kwargs
) -> subprocess.CompletedProcess:
    """``snakemake -n --cores 1`` on ``bids`` into ``output_dir`` with more ``--config`` items."""
    return snakemake(
        workdir,
        "-n",
        "--cores",
        "1",
        "--config",
        f"bids_dir={bids}",
        f"output_dir={output_dir}",
        *config,
        **kwargs,
    )
