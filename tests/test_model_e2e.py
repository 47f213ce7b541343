"""End to end: train on cohort A, apply A's teacher to cohort B, grow B by two subjects.

Tiny on purpose (4 mm grid, small_cnn, 1 epoch, 4 + 3 + 2 demo subjects): the point is which jobs
run and which bytes change, not the quality of the features.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_model import check_bids_derivative_description

from workflow_helpers import snakemake

TINY = {
    "preprocessing": {"resample": {"spacing_mm": 4.0}},
    "views": {"global_size": [16, 16, 16], "local_size": [8, 8, 8], "num_local_crops": 2},
    "encoder": {"name": "small_cnn", "kwargs": {"channels": [4, 8]}},
    "data": {"batch_size": 2, "num_workers": 0, "cache": "memory"},
    "dino": {"proj_hidden_dim": 16, "proj_bottleneck_dim": 8, "proj_output_dim": 16},
    "trainer": {"max_epochs": 1, "accelerator": "cpu"},
    "demo": {"enabled": False},
    "probes": {"n_splits": 2, "n_repeats": 1, "inner_splits": 2, "pca": {"n_components": 1}},
}
LATE = ("sub-004", "sub-005")  # the subjects that join cohort B later


def _overlay(root: Path, name: str, bids: Path, **changes) -> Path:
    config = yaml.safe_load(yaml.safe_dump(TINY))
    for key, value in changes.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    config.update({"bids_dir": str(bids), "output_dir": str(root / name)})
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(root: Path, overlay: Path, *args: str):
    # targets before --configfile, which takes every argument after it
    res = snakemake(root, *args, "--cores", "2", "--configfile", str(overlay))
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout + res.stderr


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    from nidl_dino.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("model_e2e")
    make_demo_dataset(root / "A", n_subjects=4, seed=3, n_bad=0)
    make_demo_dataset(root / "B", n_subjects=5, seed=5, n_bad=0)
    # B starts without LATE: their folders and participants.tsv rows wait aside
    (root / "later").mkdir()
    lines = (root / "B/participants.tsv").read_text().splitlines(keepends=True)
    (root / "later/participants.tsv").write_text("".join(lines))
    (root / "B/participants.tsv").write_text(
        "".join(line for line in lines if not line.startswith(LATE))
    )
    for sub in LATE:
        shutil.move(root / "B" / sub, root / "later" / sub)
    return root


@pytest.fixture(scope="module")
def teacher_a(cohorts):
    root = cohorts
    overlay = _overlay(root, "outA", root / "A", model={"train_on": ["001", "sub-002", "003"]})
    _run(root, overlay, str(root / "outA/model/teacher.pt"))
    return root / "outA/model/teacher.pt"


def test_train_on_a_subset_records_it_in_the_model_card(teacher_a):
    res = subprocess.run(
        [sys.executable, "-m", "nidl_dino.model", "show", "--json", str(teacher_a)],
        capture_output=True,
        text=True,
        check=True,
    )
    card = json.loads(res.stdout)
    assert card["n_training_scans"] == 3  # of the 4 scans of A that passed QC
    assert card["train_on"] == ["001", "sub-002", "003"]
    assert card["preprocessing"]["resample.spacing_mm"] == 4.0
    assert card["training"]["epochs"] is not None and "train/loss_epoch" in str(card)
    log = (teacher_a.parents[1] / "logs/train.log").read_text()
    assert "training on 3 of 4 scans" in log


def test_apply_a_teacher_then_grow_the_study(cohorts, teacher_a):
    root = cohorts
    overlay = _overlay(root, "outB", root / "B", model={"teacher": str(teacher_a)})
    model_id = json.loads(
        subprocess.run(
            [sys.executable, "-m", "nidl_dino.model", "show", "--json", str(teacher_a)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )["model_id"]

    log = _run(root, overlay)
    out = root / "outB"
    assert "rule train:" not in log and not (out / "model/teacher.pt").exists()
    tables = sorted((out / "features").glob("sub-*.tsv"))
    assert [t.stem for t in tables] == ["sub-001", "sub-002", "sub-003"]
    for table in tables:
        assert pd.read_csv(table, sep="\t")["model_id"][0] == model_id
    card = json.loads((out / "model/model_card.json").read_text())
    assert card["model_id"] == model_id and card["n_training_scans"] == 3
    assert "Model card" in (out / "report/report.html").read_text()
    check_bids_derivative_description(json.loads((out / "dataset_description.json").read_text()))
    assert "features/" in (out / ".bidsignore").read_text()

    before = {t.name: (t.read_bytes(), t.stat().st_mtime_ns) for t in tables}
    cohort_before = (out / "features/cohort.tsv").read_text().splitlines()

    # two subjects join B: only they are preprocessed and extracted, nothing is trained
    for sub in LATE:
        shutil.move(root / "later" / sub, root / "B" / sub)
    shutil.copy(root / "later/participants.tsv", root / "B/participants.tsv")
    log = _run(root, overlay)
    assert "rule train:" not in log
    preprocess_log = (out / "logs/preprocess/batch-0001.log").read_text()
    assert "preprocessing 2 scan(s)" in preprocess_log and "3 already done" in preprocess_log
    extract_log = (out / "logs/extract.log").read_text()
    assert "features: 2 scan(s) to write, 3 unchanged" in extract_log
    for name, (data, mtime) in before.items():
        table = out / "features" / name
        assert table.read_bytes() == data and table.stat().st_mtime_ns == mtime, name
    for sub in LATE:
        assert pd.read_csv(out / f"features/{sub}.tsv", sep="\t")["model_id"][0] == model_id
    cohort_after = (out / "features/cohort.tsv").read_text().splitlines()
    assert cohort_after[0] == cohort_before[0]  # same columns
    old_rows = [r for r in cohort_after if not r.startswith(LATE)]
    assert old_rows == cohort_before and len(cohort_after) == 6


def test_a_teacher_of_another_grid_is_refused_before_any_job(cohorts, teacher_a):
    root = cohorts
    overlay = _overlay(
        root,
        "outC",
        root / "B",
        model={"teacher": str(teacher_a)},
        preprocessing={"resample": {"spacing_mm": 3.0}},
    )
    res = snakemake(root, "--cores", "1", "--configfile", str(overlay))
    assert res.returncode == 2
    line = [x for x in res.stderr.splitlines() if x.startswith("nidl-dino: error")]
    assert len(line) == 1
    assert "preprocessing.resample.spacing_mm = 4.0" in line[0] and "has 3.0" in line[0]
    assert not list((root / "outC").glob("sub-*")) and not (root / "outC/preproc").exists()
