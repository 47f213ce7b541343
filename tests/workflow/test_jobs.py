"""Workflow jobs (nidl_dino.workflow.jobs): one-line errors, and a batch of scans preprocessed in one job
with each scan isolated in its own process."""

from __future__ import annotations

import json
import os
import signal

import nibabel as nib
import numpy as np
import pytest

from nidl_dino.errors import UserError
from nidl_dino.preprocessing.phantom import scanner_affine, synthetic_scan
from nidl_dino.workflow import jobs
from nidl_dino.workflow.layout import Layout

NO_REG = {"registration": {"enabled": False}, "resample": {"spacing_mm": 4.0}}


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Two valid heads, one all-zero volume, one that will crash its process."""
    folder = tmp_path_factory.mktemp("inputs")
    shape = (48, 56, 48)
    affine = scanner_affine(shape, (4.0, 4.0, 4.0), "RAS")
    affine[:3, 3] += [0.0, -17.0, 5.0]
    rows = []
    for i, kind in enumerate(["good", "good", "zero", "crash"]):
        data = synthetic_scan(shape, affine, head_spacing_mm=4.0, seed=i)
        if kind == "zero":
            data = np.zeros(shape, np.float32)
        path = folder / f"sub-{i:02d}_T1w.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), str(path))
        rows.append(
            {
                "scan_id": f"sub-{i:02d}",
                "path": str(path),
                "participant_id": f"sub-{i:02d}",
                "session_id": "",
            }
        )
    return rows


def test_job_turns_a_user_error_into_one_line_and_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        with jobs.job(str(tmp_path / "x.log"), "thing"):
            raise UserError("config key 'a.b' is wrong: fix it")
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "nidl-dino: error in thing: config key 'a.b' is wrong: fix it"


def test_batch_isolates_each_scan_and_redoes_only_what_is_missing(tmp_path, scans, monkeypatch):
    real = jobs.preprocess_or_exclude

    def crashing(in_file, out_dir, prefix, **kwargs):
        if prefix == "sub-03":  # a library crash: the process dies, nothing is caught
            os.kill(os.getpid(), signal.SIGKILL)
        return real(in_file, out_dir, prefix, **kwargs)

    # the children are forked after this: they run the patched function
    monkeypatch.setattr(jobs, "preprocess_or_exclude", crashing)
    out = tmp_path / "out"
    layout = Layout(out, 4.0)
    result = jobs.preprocess_batch(scans, out, NO_REG, workers=2, log_dir=tmp_path / "logs")
    by_scan = {r["scan_id"]: r for r in result}
    assert [r["scan_id"] for r in result] == [s["scan_id"] for s in scans]
    assert by_scan["sub-00"]["status"] == by_scan["sub-01"]["status"] == "ok"
    assert by_scan["sub-02"]["status"] == "excluded" and by_scan["sub-02"]["reason"]
    assert by_scan["sub-03"]["status"] == "excluded"
    assert "killed by signal 9" in by_scan["sub-03"]["reason"]
    crashed = json.loads((out / "sub-03/anat/sub-03_desc-qc_T1w.json").read_text())
    assert crashed["status"] == "excluded" and crashed["scan_id"] == "sub-03"
    assert (out / "sub-03/anat/sub-03_desc-qc_T1w.png").is_file()  # every scan has its picture
    assert (tmp_path / "logs" / "sub-00.log").exists()
    for scan in ("sub-00", "sub-01"):
        files = layout.scan(scan)
        assert files.volume.exists() and files.mask.exists() and files.transform.exists()
        assert files.signature.exists()
    assert not layout.scan("sub-03").signature.exists()
    assert not any(r["skipped"] for r in result)

    # a re-run skips every finished scan and retries the crashed one (it left no signature)
    monkeypatch.setattr(jobs, "preprocess_or_exclude", real)
    volume = layout.scan("sub-00").volume
    before = volume.stat().st_mtime_ns
    again = {r["scan_id"]: r for r in jobs.preprocess_batch(scans, out, NO_REG, workers=2)}
    assert again["sub-00"]["skipped"] and again["sub-01"]["skipped"] and again["sub-02"]["skipped"]
    assert not again["sub-03"]["skipped"] and again["sub-03"]["status"] == "ok"
    assert volume.stat().st_mtime_ns == before

    # Snakemake deletes a rerun job's declared outputs (QC record and picture): a finished scan's
    # are restored as they were, not recomputed
    files = layout.scan("sub-02")  # the all-zero volume: an excluded scan
    kept = {path: path.read_bytes() for path in (files.qc_json, files.qc_png)}
    for path in kept:
        path.unlink()
    restored = {r["scan_id"]: r for r in jobs.preprocess_batch(scans, out, NO_REG, workers=2)}
    assert all(row["skipped"] for row in restored.values())
    assert restored["sub-02"]["status"] == "excluded"
    assert {path: path.read_bytes() for path in kept} == kept
    assert volume.stat().st_mtime_ns == before

    # another preprocessing configuration redoes every scan
    other = {**NO_REG, "normalization": {"method": "zscore"}}
    redone = jobs.preprocess_batch(scans[:1], out, other, workers=1)
    assert not redone[0]["skipped"]
    # and a changed input file too
    os.utime(scans[1]["path"], ns=(1, 1))
    assert not jobs.preprocess_batch(scans[1:2], out, NO_REG, workers=1)[0]["skipped"]
    # and a file of the scan that went missing (its signature alone does not do)
    layout.scan("sub-01").mask.unlink()
    assert not jobs.preprocess_batch(scans[1:2], out, NO_REG, workers=1)[0]["skipped"]
    assert layout.scan("sub-01").mask.exists()


def test_batch_names_files_after_the_scans_bids_entities(tmp_path, scans):
    # sub-00's one scan is sub-00_acq-fast_run-2: its scan id drops the entities, its files keep
    # them; the record keeps the scan id
    layout = Layout(tmp_path / "out", 4.0, {"sub-00": "sub-00_acq-fast_run-2"})
    [row] = jobs.preprocess_batch(scans[:1], layout, NO_REG, workers=1)
    assert row["status"] == "ok" and not row["skipped"]
    folder = tmp_path / "out" / "sub-00" / "anat"
    assert sorted(p.name for p in folder.iterdir()) == [
        ".sub-00_acq-fast_run-2.nidl-dino-done.json",
        ".sub-00_acq-fast_run-2.nidl-dino-qc.png",
        "sub-00_acq-fast_run-2_desc-qc_T1w.json",
        "sub-00_acq-fast_run-2_desc-qc_T1w.png",
        "sub-00_acq-fast_run-2_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.mat",
        "sub-00_acq-fast_run-2_space-MNI152NLin2009aSym_res-4_desc-brain_mask.nii.gz",
        "sub-00_acq-fast_run-2_space-MNI152NLin2009aSym_res-4_desc-preproc_T1w.nii.gz",
    ]
    record = json.loads(layout.scan("sub-00").qc_json.read_text())
    assert record["scan_id"] == "sub-00" and record["participant_id"] == "sub-00"
    assert jobs.preprocess_batch(scans[:1], layout, NO_REG, workers=1)[0]["skipped"]
    with pytest.raises(ValueError, match="grid"):  # files named after another grid
        jobs.preprocess_batch(scans[:1], Layout(tmp_path / "out", 3.0), NO_REG)
