"""A corpus of bad inputs through the whole workflow: each gets its documented outcome.

Bad scans are excluded with their reason and the good ones still get features; bad cohort-level
inputs (duplicate ids, a participants.tsv that cannot be used) stop the run before any job with
one line. The dataset lives below a path with spaces and non-ASCII characters, and its
participants.tsv is semicolon-separated latin-1 that misses one subject.
"""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from workflow_helpers import snakemake, tiny_bids

TINY = {
    "preprocessing": {"resample": {"spacing_mm": 6.0}},
    "views": {"global_size": [16, 16, 16], "local_size": [8, 8, 8], "num_local_crops": 2},
    "data": {"batch_size": 2, "num_workers": 0},
    "dino": {"proj_hidden_dim": 32, "proj_bottleneck_dim": 16, "proj_output_dim": 64},
    "trainer": {"max_epochs": 1, "accelerator": "cpu"},
    "demo": {"enabled": False},
    "probes": {"targets": []},
}
GOOD = np.random.default_rng(0).random((40, 40, 40)).astype(np.float32)


def _save(path: Path, data, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(
        nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine),
        str(path),
    )
    return path


def _patched(path: Path, patch) -> None:
    _save(path, GOOD)
    raw = bytearray(path.read_bytes())
    patch(raw)
    path.write_bytes(bytes(raw))


def _zero_affine(raw: bytearray) -> None:
    struct.pack_into("<h", raw, 252, 0)  # qform_code
    struct.pack_into("<h", raw, 254, 1)  # sform_code
    struct.pack_into("<12f", raw, 280, *([0.0] * 12))  # srow_x, srow_y, srow_z


# subject label -> (how to write its file, words expected in the exclusion reason)
BAD = {
    "zerobyte": (lambda p: p.write_bytes(b""), "empty file"),
    "truncated": (
        lambda p: p.write_bytes(_save(p, GOOD).read_bytes()[:3000]),
        "truncated or corrupt gzip",
    ),
    "notnifti": (lambda p: p.write_bytes(gzip.compress(b"just some text")), "not a NIfTI"),
    "twod": (lambda p: _save(p, GOOD[:, :, 0]), "2D image"),
    "fourd": (lambda p: _save(p, np.stack([GOOD] * 3, -1)), "4D image with 3 volumes"),
    "nan": (lambda p: _save(p, np.where(GOOD > 0.99, np.nan, GOOD)), "NaN/inf"),
    "allzero": (lambda p: _save(p, np.zeros_like(GOOD)), "constant image"),
    "zeroaffine": (lambda p: _patched(p.with_suffix(""), _zero_affine), "singular affine"),
    "absurdvox": (lambda p: _save(p, GOOD, np.diag([25.0, 25.0, 25.0, 1.0])), "voxel size"),
    "hugedims": (
        lambda p: _patched(
            p.with_suffix(""), lambda raw: struct.pack_into("<4h", raw, 40, 3, 30000, 30000, 30000)
        ),
        "truncated file",
    ),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from nidl_dino.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("corpus") / "données IRM" / "my study"
    bids = root / "bids"
    make_demo_dataset(bids, n_subjects=4, seed=5, n_bad=0)
    for label, (write, _) in BAD.items():
        target = bids / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz"
        target.parent.mkdir(parents=True)
        write(target)
    participants = pd.read_csv(bids / "participants.tsv", sep="\t")
    participants["site"] = participants["site"].map(lambda s: f"Créteil-{s}")
    rows = [
        {"participant_id": f"sub-{label}", "age": 50, "sex": "F", "site": "Créteil-x"}
        for label in BAD
        if label != "allzero"
    ]  # sub-allzero is missing from the table
    table = pd.concat([participants, pd.DataFrame(rows)], ignore_index=True)
    (bids / "participants.tsv").write_bytes(table.to_csv(sep=";", index=False).encode("latin-1"))
    return root


def _overlay(root: Path, bids: Path, name: str) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**TINY, "bids_dir": str(bids), "output_dir": str(root / name)}))
    return path


def test_every_bad_scan_is_excluded_with_its_reason_and_nothing_else_is_lost(corpus):
    res = snakemake(
        corpus, "--cores", "2", "--configfile", str(_overlay(corpus, corpus / "bids", "out"))
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "1 scanned subject(s) not in" in res.stderr and "sub-allzero" in res.stderr
    out = corpus / "out"
    qc = pd.read_csv(out / "qc/qc.tsv", sep="\t", dtype=str, keep_default_na=False).set_index(
        "participant_id"
    )
    for label, (_, words) in BAD.items():
        row = qc.loc[f"sub-{label}"]
        assert row["status"] == "excluded", label
        assert words in row["reason"], (label, row["reason"])
        assert "\n" not in row["reason"]
    good = [p for p in qc.index if p.removeprefix("sub-") not in BAD]
    assert len(good) == 4 and (qc.loc[good, "status"] == "ok").all()
    for pid in good:
        assert (out / "features" / f"{pid}.tsv").exists()

    cohort = pd.read_csv(out / "features/cohort.tsv", sep="\t", keep_default_na=False)
    assert len(cohort) == len(BAD) + 4
    sites = dict(zip(cohort["participant_id"], cohort["site"], strict=True))
    assert sites[good[0]].startswith("Créteil-")  # latin-1, semicolons: read right
    assert sites["sub-allzero"] in ("", "n/a")  # missing from participants.tsv: kept, empty


def test_duplicate_scan_ids_stop_before_any_job(tmp_path):
    bids = tiny_bids(tmp_path / "bids", subjects=("01", "02"))
    extra = bids / "sub-01" / "anat" / "sub-01_run-2_T1w.nii.gz"
    shutil.copy(bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz", extra)
    res = snakemake(
        tmp_path, "-n", "--cores", "1", "--configfile", str(_overlay(tmp_path, bids, "o"))
    )
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("nidl-dino: error:")]
    assert len(errors) == 1 and "duplicate scan id 'sub-01'" in errors[0]
    assert "Traceback" not in res.stderr and not (tmp_path / "o").exists()


def test_duplicate_participants_stop_before_any_job(tmp_path):
    bids = tiny_bids(tmp_path / "bids", subjects=("01", "02"))
    with open(bids / "participants.tsv", "a") as table:
        table.write("sub-01\t40\tF\n")
    res = snakemake(
        tmp_path, "-n", "--cores", "1", "--configfile", str(_overlay(tmp_path, bids, "o"))
    )
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("nidl-dino: error:")]
    assert len(errors) == 1 and "participants.tsv" in errors[0] and "sub-01" in errors[0]
    assert "Traceback" not in res.stderr
