"""End-to-end runs of the workflow on a tiny generated cohort (CPU, tiny encoder, few steps)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from workflow_helpers import SNAKEFILE, snakemake

TINY = {
    "preprocessing": {"resample": {"spacing_mm": 6.0}},
    "views": {"global_size": [16, 16, 16], "local_size": [8, 8, 8], "num_local_crops": 2},
    "encoder": {"name": "small_cnn", "kwargs": {}},
    "data": {"batch_size": 2, "num_workers": 0, "cache": "memory"},
    "dino": {"proj_hidden_dim": 32, "proj_bottleneck_dim": 16, "proj_output_dim": 64},
    "trainer": {"max_epochs": 2, "accelerator": "cpu"},
    "demo": {"enabled": False},
    "probes": {"n_splits": 2, "n_repeats": 1, "inner_splits": 2, "pca": {"n_components": 1}},
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from nidl_dino.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("e2e")
    participants = make_demo_dataset(root / "bids", n_subjects=6, seed=3, n_bad=2)
    return root, participants


def _overlay(root: Path, name: str, **changes) -> Path:
    config = yaml.safe_load(yaml.safe_dump(TINY))
    for key, value in changes.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    config.update({"bids_dir": str(root / "bids"), "output_dir": str(root / name)})
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_tiny_end_to_end_run(cohort):
    root, participants = cohort
    res = snakemake(root, "--cores", "2", "--configfile", str(_overlay(root, "out")))
    assert res.returncode == 0, res.stderr[-3000:]
    out = root / "out"

    qc = pd.read_csv(out / "qc/qc.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(qc.columns[:4]) == ["participant_id", "session_id", "status", "reason"]
    assert len(qc) == 6
    bad = participants.loc[participants["bad_scan"] != "", "participant_id"].tolist()
    excluded = qc[qc["status"] == "excluded"]
    assert sorted(excluded["participant_id"]) == sorted(bad)
    assert all(reason.strip() for reason in excluded["reason"])
    ok = qc[qc["status"] == "ok"]
    assert (ok["reason"] == "").all() and len(ok) == 4

    for pid in ok["participant_id"]:
        table = pd.read_csv(out / "features" / f"{pid}.tsv", sep="\t", keep_default_na=False)
        assert list(table.columns[:5]) == [
            "participant_id",
            "session_id",
            "model_id",
            "scan_id",
            "feature_0000",
        ]
        assert len(table) == 1 and table["participant_id"][0] == pid
        assert table["model_id"][0].startswith("dino-small_cnn-")
    for pid in bad:
        assert not (out / "features" / f"{pid}.tsv").exists()

    cohort_tsv = pd.read_csv(out / "features/cohort.tsv", sep="\t")
    cohort_pq = pd.read_parquet(out / "features/cohort.parquet")
    assert len(cohort_tsv) == len(cohort_pq) == 6
    for column in ("participant_id", "session_id", "scan_id", "status", "reason", "age", "sex"):
        assert column in cohort_pq.columns
    features = [c for c in cohort_pq.columns if c.startswith("feature_")]
    # the default readout, per channel of every small_cnn stage (16, 32, 64, 128 channels):
    # std and mean, and with stages_quantiles 5 quantiles over the brain
    from nidl_dino.encoders.readout import DEFAULT_POOLING, STAGE_QUANTILES

    per_channel = {"stages_mean_std": 2, "stages_quantiles": 2 + len(STAGE_QUANTILES)}
    assert len(features) == per_channel[DEFAULT_POOLING] * (16 + 32 + 64 + 128)
    manifest = pd.read_csv(out / "features/manifest.tsv", sep="\t")
    assert set(manifest["pooling"]) == {DEFAULT_POOLING}
    is_ok = cohort_pq["status"] == "ok"
    assert cohort_pq.loc[is_ok, features].notna().all().all()
    assert cohort_pq.loc[~is_ok, features].isna().all().all()
    assert (out / "model/training_curves.png").stat().st_size > 1000
    # BIDS-derivatives names, as fMRIPrep writes them, in sub-<label>/anat/ (6 mm grid: res-6)
    for scan in ok["scan_id"]:
        anat = out / scan / "anat"
        for name in (
            "space-MNI152NLin2009aSym_res-6_desc-preproc_T1w.nii.gz",
            "space-MNI152NLin2009aSym_res-6_desc-brain_mask.nii.gz",
            "from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.mat",
            "desc-qc_T1w.png",
            "desc-qc_T1w.json",
        ):
            assert (anat / f"{scan}_{name}").exists(), name
    for scan in excluded["scan_id"]:
        names = sorted(p.name for p in (out / scan / "anat").iterdir())
        assert names == [
            f".{scan}.nidl-dino-done.json",
            f".{scan}.nidl-dino-qc.png",  # the picture's second name (jobs.py)
            f"{scan}_desc-qc_T1w.json",
            f"{scan}_desc-qc_T1w.png",
        ]
    assert not list((out / "preproc").glob("sub-*"))  # only the batch tables there
    assert "**/*_desc-qc_T1w.json" in (out / ".bidsignore").read_text().splitlines()

    # probes ran, or say in their table why a 4-scan cohort could not be probed
    assert (out / "probes/scores.tsv").exists() and (out / "probes/predictions.tsv").exists()
    comparison = pd.read_csv(out / "probes/comparison.tsv", sep="\t")
    assert "beats_by_spread" in comparison.columns
    assert "too small to judge the features" in (out / "probes/probe_table.md").read_text()

    report = (out / "report/report.html").read_text()
    assert "Excluded scans" in report or "excluded" in report
    assert all(pid in report for pid in bad)

    # nothing to do on a second run
    res = snakemake(root, "-n", "--cores", "1", "--configfile", str(_overlay(root, "out")))
    assert "Nothing to be done" in res.stdout + res.stderr

    # another readout re-extracts the features from the same teacher: no re-training
    other = _overlay(root, "out", extract={"pooling": "last"})
    res = snakemake(root, "-n", "--cores", "1", "--configfile", str(other))
    log = res.stdout + res.stderr
    assert (
        "rule extract:" in log and "rule train:" not in log and "rule preprocess_batch" not in log
    )


@pytest.mark.slow
def test_killed_training_job_resumes_from_its_checkpoint(cohort):
    root, _ = cohort
    overlay = _overlay(root, "killed", trainer={"max_epochs": 6})
    ckpt = root / "killed/model/work/checkpoints/last.ckpt"
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(SNAKEFILE),
        "--cores",
        "2",
        "--configfile",
        str(overlay),
    ]
    proc = subprocess.Popen(
        cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 600
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert ckpt.exists(), "no checkpoint before the deadline"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job tree, mid-training
    proc.wait()
    assert not (root / "killed/model/teacher.pt").exists()

    # Snakemake itself was killed: its lock stays, as after a power loss; the documented
    # recovery is --unlock, then the same command with --rerun-incomplete
    res = snakemake(root, "--unlock", "--configfile", str(overlay))
    assert res.returncode == 0, res.stderr[-3000:]
    res = snakemake(root, "--cores", "2", "--rerun-incomplete", "--configfile", str(overlay))
    assert res.returncode == 0, res.stderr[-3000:]
    log = (root / "killed/logs/train.log").read_text()
    assert "resuming training from" in log
    summary = yaml.safe_load((root / "killed/model/training_summary.json").read_text())
    assert summary["resumed_from"].endswith("last.ckpt")
    assert summary["epochs"] == 6
    # one log version per start; the killed start may have died before its first metrics flush
    # (metrics are logged every trainer.log_every_n_steps steps)
    versions = sorted((root / "killed/model/work/logs/csv").glob("version_*"))
    assert len(versions) == 2
    second = pd.read_csv(versions[1] / "metrics.csv")
    assert second["step"].min() > 0  # no step repeated from zero

    # the resumed run ends where an uninterrupted run with the same seed ends
    straight = _overlay(root, "straight", trainer={"max_epochs": 6})
    res = snakemake(root, "--cores", "2", "--configfile", str(straight), "--until", "train")
    assert res.returncode == 0, res.stderr[-3000:]

    def final_state(name):
        ckpt = torch.load(root / name / "model/work/checkpoints/last.ckpt", weights_only=True)[
            "state_dict"
        ]
        return {k: v for k, v in ckpt.items() if k.startswith(("teacher", "loss.center"))}

    resumed, uninterrupted = final_state("killed"), final_state("straight")
    assert resumed.keys() == uninterrupted.keys() and "loss.center" in resumed
    for key, value in resumed.items():
        assert torch.allclose(value.float(), uninterrupted[key].float(), atol=1e-5), key


def test_changed_preprocessing_trains_anew_instead_of_resuming(cohort):
    # A preprocessing setting that keeps every file name (the mask's margin) re-preprocesses the
    # scans; the training job that follows must train on the new volumes, not "resume" the
    # finished run of the old ones (same names, same model config: the old fingerprint matched)
    root, _ = cohort
    first = _overlay(root, "reprep", trainer={"max_epochs": 1})
    res = snakemake(root, "--cores", "2", "--configfile", str(first), "--until", "train")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = root / "reprep/model/training_summary.json"
    before = yaml.safe_load(summary.read_text())
    changed = _overlay(
        root,
        "reprep",
        trainer={"max_epochs": 1},
        preprocessing={"resample": {"spacing_mm": 6.0}, "mask": {"dilation_mm": 8.0}},
    )
    res = snakemake(root, "--cores", "2", "--configfile", str(changed), "--until", "train")
    assert res.returncode == 0, res.stderr[-3000:]
    after = yaml.safe_load(summary.read_text())
    assert after["resumed_from"] is None and after["global_step"] == before["global_step"]
    assert after["fingerprint"] != before["fingerprint"]
    assert after["model_id"] != before["model_id"]
    assert list((root / "reprep/model/work").glob("checkpoints.stale-*"))
